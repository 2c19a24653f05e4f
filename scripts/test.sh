#!/usr/bin/env bash
# The test suite (slow tests left out; run them with: bash scripts/test.sh -m slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
