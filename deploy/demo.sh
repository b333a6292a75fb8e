#!/usr/bin/env bash
# One command, fresh machine: install, then run the demo on the embedded broker.
# Extra arguments go to `breakwater dev` (e.g. --duration 60).
set -euo pipefail
# setup.sh takes the pip extras as its argument: pass "" explicitly, else bash hands it this
# script's own arguments (`--duration 60` would become the extras).
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""
exec breakwater dev "$@"
