#!/usr/bin/env bash
# A separate environment for the peer benchmark (TRL pins its own stack; keep it out of rl_fp16's).
# Usage: bash experiments/benchmark/peers/setup_trl.sh [VENV_DIR]   (default: ~/.venvs/trl-peer);
# prints the venv's python last: pass it as --config.trl_python to experiments.benchmark.
# Offline machines: PIP_FIND_LINKS=/opt/wheels (a local torch 2.13.0 wheel) is passed to uv.
set -euo pipefail
venv=${1:-$HOME/.venvs/trl-peer}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "uv>=0.5"
"$venv/bin/python" -m uv pip install -q --python "$venv/bin/python" ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
  "torch==2.13.0" "transformers==5.19.*" "trl==1.16.0" datasets accelerate
"$venv/bin/python" -c "import trl, transformers, torch; print('peer venv ok: trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "$venv/bin/python"
