#!/usr/bin/env bash
# Create .venv and install the project for CPU use (idempotent; re-runs only when inputs change).
# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# --sky also builds .venv-sky (SkyPilot's parser, ~460 MB): only the tests need it, not the demo.
set -euo pipefail
with_sky=0
[ "${1:-}" = "--sky" ] && with_sky=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SKYPILOT_VERSION=0.14.1
VENV=${VENV:-.venv}
stamp="$VENV/.launcher-installed"
want=$(cat pyproject.toml requirements-lock.txt scripts/setup-env.sh | sha256sum | cut -c1-16)
sky_venv=${SKY_VENV:-.venv-sky}
sky_stamp="$sky_venv/.launcher-installed"
setup_main() {
  echo "setting up $VENV (torch CPU build, DeepSpeed, Ray, transformers)..."
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' requirements-lock.txt)"
  "$VENV/bin/python" -m pip install -q -c requirements-lock.txt -e '.[dev]'
  echo "$want" > "$stamp"
  echo "environment ready: $VENV"
}

# SkyPilot pins click<8.2, which huggingface_hub 2.x refuses, so it cannot share .venv. Its own
# venv holds SkyPilot and its dependencies and sees the project and .venv's packages after its
# own (`.pth` files), so that the tests can run SkyPilot's task parser on what we render.
setup_sky() {
  echo "setting up $sky_venv (SkyPilot $SKYPILOT_VERSION, for its task parser in the tests)..."
  [ -x "$sky_venv/bin/python" ] || "$PY" -m venv "$sky_venv"
  "$sky_venv/bin/python" -m pip install -q "skypilot==$SKYPILOT_VERSION"
  site=$("$sky_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  main_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PWD" > "$site/zz_launcher_src.pth"
  echo "$main_site" > "$site/zz_launcher_venv.pth"
  echo "$want" > "$sky_stamp"
  echo "environment ready: $sky_venv"
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
sky_pid=
if [ "$with_sky" = 1 ] && { ! [ -f "$sky_stamp" ] || [ "$(cat "$sky_stamp")" != "$want" ]; }; then
  # the two venvs share nothing but .venv's path: install them side by side (mostly waiting on
  # downloads and unpacking), which saves minutes on a fresh clone
  setup_sky & sky_pid=$!
fi
if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  setup_main
fi
if [ -n "$sky_pid" ]; then
  wait "$sky_pid" || { echo "setup-env: setting up $sky_venv failed (see above)" >&2; exit 1; }
fi
