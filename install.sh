#!/usr/bin/env bash
# One-step set-up on a fresh machine: the pinned stack (requirements/lock.txt) and this package.
# torch 2.13.0+cpu comes from the wheel directory pip/uv are pointed at (PIP_FIND_LINKS, /opt/wheels
# on these machines); point PIP_FIND_LINKS at a directory holding that wheel elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q "uv>=0.5"
FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"
# Install into the interpreter that runs this script: the active virtual environment if there is
# one, else the system Python.
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"
python3 -m uv pip install --python "$PYTHON" --no-deps --find-links "$FIND_LINKS" \
  -r requirements/lock.txt
python3 -m uv pip install --python "$PYTHON" --no-deps -e .
