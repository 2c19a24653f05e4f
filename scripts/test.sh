#!/usr/bin/env bash
# The checks: lint (ruff), types (mypy) and the test suite (slow tests left out; run them
# with: bash scripts/test.sh -m slow). Arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
echo "harmless checks: ruff ..." >&2
ruff check --quiet src tests benchmarks
echo "harmless checks: mypy ..." >&2
mypy
exec python -m pytest "$@"
