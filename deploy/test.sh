#!/usr/bin/env bash
# One command, fresh machine: install with test extras, then run every test
# (unit, doctests, fuzz, and integration tests against the real embedded broker).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" test
exec python -m pytest "$@"
