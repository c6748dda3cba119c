#!/usr/bin/env bash
# Installs the test dependencies (a venv, the dev extra, the Kubernetes test binaries built from Go modules or
# reused from their cache) and runs everything CI runs: lint, format check, type check, schema freshness, tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
# The dev lock (requirements/dev.txt) unless PODSWEEP_TEST_LATEST=1 (scripts/test-latest.sh): then the newest
# versions pyproject.toml allows, in a venv of their own, to see a dependency's drift before users do.
venv="${VENV:-.venv}"
if [[ "${PODSWEEP_TEST_LATEST:-}" == 1 ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -e '.[dev]'
  "$venv/bin/python" -m pip freeze --exclude-editable > "$venv/versions.txt"
  echo "test.sh: newest allowed versions (see $venv/versions.txt)"
else
  VENV="$venv" bash scripts/install.sh dev
fi
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
# Helm 4 and 3 for tests/integration/test_helm.py, promtool for test_prometheus_rules.py and prometheus for
# test_deployed_e2e.py, built from their Go modules and cached the same way (promtool's and prometheus's cold builds
# are the long ones: docs/testing.md).
for tool in helm helm3 promtool prometheus; do
  echo "test.sh: $(bash tests/harness/toolbins/build.sh $tool) after $(( $(date +%s) - start ))s"
done
export VIRTUAL_ENV="$PWD/$venv" PATH="$PWD/$venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
podsweep schemas export --check
podsweep deploy nats-accounts --check
pytest -q -p no:cacheprovider "$@"
echo "test.sh: done in $(( $(date +%s) - start ))s"
