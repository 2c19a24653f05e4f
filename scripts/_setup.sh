# Sourced by scripts/main.sh and scripts/test.sh: builds .venv/ once, and again only
# when pyproject.toml changes (a stamp holds its hash). Idempotent and fast when done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.harmless-setup-stamp"
PY="${HARMLESS_PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "harmless set-up: Python 3.11 is required (set HARMLESS_PYTHON to its path)" >&2
  exit 1
fi
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "harmless set-up: building $VENV (once) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # pip's output is kept and shown (less a harmless notice about this machine's extra package
  # folder); a failed install stops the set-up with its message, it is never hidden.
  pip_install() {
    local out
    if ! out="$("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1)"; then
      printf '%s\n' "$out" >&2
      echo "harmless set-up: pip install $* failed" >&2
      exit 1
    fi
    printf '%s\n' "$out" | grep -v -e "is ignored: it is neither" -e '^$' >&2 || :
  }
  pip_install "torch==2.13.0"
  pip_install -e "$ROOT[test]"
  "$VENV/bin/python" -c "import harmless, torch, scipy, hypothesis" >/dev/null
  echo "$want" > "$STAMP"
fi
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist. The library only reads
# the installed files (a library call never changes the system), so the package is installed
# here, once: `apt-get update` only when apt has no candidate for it.
FASHION_PKG=dataset-fashion-mnist
fashion_status=""
if command -v dpkg-query >/dev/null 2>&1; then
  # not installed: dpkg-query fails, which is the answer, not an error
  fashion_status="$(dpkg-query -W -f='${Status}' "$FASHION_PKG" 2>/dev/null)" || fashion_status="missing"
fi
if [ "$fashion_status" != "" ] && [ "$fashion_status" != "install ok installed" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "harmless set-up: installing the Debian package $FASHION_PKG (Fashion-MNIST, once) ..." >&2
  candidate="$(apt-cache policy "$FASHION_PKG" 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    $SUDO apt-get update -qq >&2
  fi
  # -qq and stdout to /dev/null: apt's progress is noise here; its errors still reach stderr.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$FASHION_PKG" >/dev/null
fi
export PATH="$VENV/bin:$PATH"
