#!/usr/bin/env bash
# Create .venv and install the project for CPU use (idempotent; re-runs only when inputs change).
# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.launcher-installed"
want=$(cat pyproject.toml requirements-lock.txt scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (torch CPU build, DeepSpeed, Ray, transformers)..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q "$(grep '^torch==' requirements-lock.txt)"
"$VENV/bin/python" -m pip install -q -c requirements-lock.txt -e '.[dev]'
echo "$want" > "$stamp"
echo "environment ready: $VENV"
