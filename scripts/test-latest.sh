#!/usr/bin/env bash
# The test command with the newest dependency versions that pyproject.toml allows instead of the lock, in a venv of
# its own (.venv-latest): run it before refreshing the lock (scripts/lock.sh --upgrade) to see what a new release
# breaks before a user installing the library sees it. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .venv-latest
PODSWEEP_TEST_LATEST=1 VENV=.venv-latest exec bash scripts/test.sh "$@"
