#!/usr/bin/env bash
# Installs the test dependencies (a venv, the dev extra, the Kubernetes test binaries built from Go modules or
# reused from their cache) and runs everything CI runs: lint, format check, type check, schema freshness, tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "test.sh: python deps ready after $(( $(date +%s) - start ))s"
# Headless Chromium opens the parser's HTML index in tests/integration/test_parser.py (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q chromium >/dev/null
fi
PODSWEEP_KUBE_BIN_DIR="$(bash tests/harness/kubebins/build.sh)"
export PODSWEEP_KUBE_BIN_DIR
echo "test.sh: kubernetes binaries in $PODSWEEP_KUBE_BIN_DIR after $(( $(date +%s) - start ))s"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/podsweep schemas export --check
.venv/bin/podsweep deploy nats-accounts --check
.venv/bin/pytest -q -p no:cacheprovider "$@"
echo "test.sh: done in $(( $(date +%s) - start ))s"
