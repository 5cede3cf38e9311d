# Sourced by the other scripts: makes sure .venv exists and holds the project
# (editable) with the extras named in $MT_EXTRAS, reinstalling only when
# pyproject.toml changed. Needs Python 3.11+ and pip; torch==2.13.0 is pinned.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.monolith-torch-${MT_EXTRAS:-base}-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  spec="$ROOT"
  [ -n "${MT_EXTRAS:-}" ] && spec="$ROOT[$MT_EXTRAS]"
  echo "installing monolith-torch${MT_EXTRAS:+[$MT_EXTRAS]} into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi
