#!/usr/bin/env bash
# The main job on the embedded default: fetch MNIST, train (or reuse) MLP-5, analyse it.
# Extra arguments go to `harmless demo` (see `harmless demo --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
exec harmless demo "$@"
