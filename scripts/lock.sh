#!/usr/bin/env bash
# Refreshes the locked installs in requirements/ from pyproject.toml's ranges: exact versions with hashes, for every
# platform, for Python 3.11. Run it after changing a dependency; review the diff; commit it with the change.
#   bash scripts/lock.sh            # keep what is locked where the ranges still allow it
#   bash scripts/lock.sh --upgrade  # take the newest versions the ranges allow
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV_VERSION=0.13.8
tool="${XDG_CACHE_HOME:-$HOME/.cache}/podsweep/uv-$UV_VERSION"
if [[ ! -x "$tool/bin/uv" ]]; then
  python3 -m venv "$tool"
  "$tool/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
compile() {  # lock name, extras...
  local name="$1"; shift
  local extras=()
  for e in "$@"; do extras+=(--extra "$e"); done
  "$tool/bin/uv" pip compile pyproject.toml "${extras[@]}" --generate-hashes --universal --python-version 3.11 \
    --no-header --quiet ${UPGRADE:+--upgrade} -o "requirements/$name.txt"
  sed -i "1i # Locked by scripts/lock.sh from pyproject.toml (${*:-runtime}); do not edit by hand." "requirements/$name.txt"
}
UPGRADE=""; [[ "${1:-}" == "--upgrade" ]] && UPGRADE=1
mkdir -p requirements
compile runtime
compile embedded embedded
compile dev dev
echo "lock.sh: requirements/{runtime,embedded,dev}.txt written"
