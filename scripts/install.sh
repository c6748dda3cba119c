#!/usr/bin/env bash
# Installs podsweep into .venv from a lock in requirements/ (exact versions, hashes checked), then podsweep itself.
#   bash scripts/install.sh embedded   # what `podsweep up` needs (the README's first command)
#   bash scripts/install.sh dev        # what the tests need (scripts/test.sh)
# VENV=path overrides the venv's location.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock="requirements/${1:?usage: install.sh runtime|embedded|dev}.txt"
[[ -f "$lock" ]] || { echo "install.sh: no lock $lock (runtime, embedded or dev)" >&2; exit 2; }
venv="${VENV:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$lock"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
