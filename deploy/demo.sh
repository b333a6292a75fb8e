#!/usr/bin/env bash
# One command, fresh machine: install, then run the demo on the embedded broker.
# Extra arguments go to `breakwater dev` (e.g. --duration 60).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec breakwater dev "$@"
