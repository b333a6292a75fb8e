#!/usr/bin/env bash
# Shared by demo.sh and test.sh: a project-local virtualenv with Breakwater installed.
# Usage: source deploy/setup.sh EXTRAS   (EXTRAS: "" for none, "test" for the test dependencies;
# always pass it: without an argument, `source` hands setup.sh the caller's own arguments)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
case "$EXTRAS" in
  *[!a-z0-9_,-]* | -*)
    echo "deploy/setup.sh: bad extras '$EXTRAS' (expected e.g. \"\" or \"test\"; pass \"\" when sourcing it from a script)" >&2
    exit 2 ;;
esac
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "Breakwater needs Python 3.11 (found: $("$PY" --version 2>&1))" >&2; exit 1; }
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "setup: creating the virtualenv .venv ($("$PY" --version 2>&1))" >&2
  "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.breakwater-installed${EXTRAS:+-$EXTRAS}"
fresh() { [ -f "$1" ] && ! [ "$ROOT/pyproject.toml" -nt "$1" ]; }
installed=0
if fresh "$STAMP"; then
  installed=1
elif [ -z "$EXTRAS" ]; then  # an install with any extras includes the plain one
  for _stamp in "$ROOT"/.venv/.breakwater-installed-*; do
    if fresh "$_stamp"; then installed=1; break; fi
  done
fi
if [ "$installed" = 0 ]; then
  echo "setup: installing Breakwater${EXTRAS:+ [$EXTRAS]} into .venv (first run: about a minute) …" >&2
  python -m pip install --quiet --disable-pip-version-check --upgrade pip
  python -m pip install --quiet --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
  echo "setup: installed." >&2
fi
unset -f fresh
unset installed _stamp
cd "$ROOT"
