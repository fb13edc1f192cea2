#!/usr/bin/env bash
# bench/run.sh - the whole lmtp-proxy benchmark in one command (`make bench`).
#
#   bench/run.sh [--quick] [--no-proxy] [BENCH.PY OPTIONS...]
#
# 1. bench/bench.py   throughput matrix: direct sink / our proxy / Dovecot's
#                     LMTP proxy, interleaved per cell, sink counters checked
# 2. bench/memory.py  RSS relaying one 50 MB message, RSS with 1000 idle
#                     sessions, added latency per message (median, p99)
# 3. bench/reload.py  reload of a 100,000-user config: reload time and the
#                     longest event-loop stall seen by a NOOP ticker
# 4. bench/bench.py --tls  the matrix with STARTTLS on both sides, ours and
#                     Dovecot's, each also without TLS (overhead per message)
# 5. bench/curves.py  cost curves: sessions, recipients, routing-table size,
#                     message size (and bench/curves.png with matplotlib)
# Results go to bench/RESULTS.md.  Every server is started by these scripts
# on 127.0.0.1 and stopped by its own PID (also on error or ^C).
#
# Environment:
#   VENV=DIR      venv holding the proxy (default: .venv at the repo root;
#                 `make bench` creates it)
#   BASELINE_VENV=DIR  a second venv with the proxy "before" a change (e.g.
#                 an older commit, installed with pip install): steps 1 and 2
#                 also measure it as target "base", interleaved with ours,
#                 and report ours/base and the run-to-run noise of both
#   BASELINE_LABEL=TEXT  what the baseline is, e.g. its commit (default: the
#                 venv directory's name)
#   QUICK=1       small message counts, one run per cell (a few minutes)
#   NO_PROXY=1    direct and Dovecot only (skips steps 2 and 3)
#   RUNS, MSGS, MSGS_LARGE   override runs per cell / messages per run
#   SKIP_MEMORY=1, SKIP_RELOAD=1, SKIP_MATRIX=1, SKIP_TLS=1, SKIP_CURVES=1
#   WORKERS=N     our proxy's serving processes (default 1, as shipped)
#   BENCH_PYTHON=PATH  the Python that runs the steps (default python3; one
#                 with matplotlib makes curves.py draw bench/curves.png)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
export VENV=${VENV:-$repo/.venv}
# Resolved before the cd below, so that a relative path means what it says.
if [ -n "${BASELINE_VENV:-}" ]; then
    if [ ! -x "$BASELINE_VENV/bin/twistd" ]; then
        echo "bench/run.sh: BASELINE_VENV=$BASELINE_VENV has no bin/twistd" >&2
        exit 1
    fi
    BASELINE_VENV=$(cd "$BASELINE_VENV" && pwd)
    export BASELINE_VENV
fi
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export BENCH_CMDLINE="bench/run.sh${*:+ $*}"
cd "$repo"

no_proxy=${NO_PROXY:-}
for arg in "$@"; do
    case $arg in --no-proxy) no_proxy=1 ;; --quick) export QUICK=1 ;; esac
done
[ "$no_proxy" = 0 ] && no_proxy=""

# Each step is a Python child that stops its own servers by PID on exit or
# on SIGINT/SIGTERM; a signal to this script is passed on to that child.
child=""
on_signal() {
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
    echo "bench/run.sh: interrupted" >&2
    exit 130
}
trap on_signal INT TERM HUP
step() {
    "${BENCH_PYTHON:-python3}" "$@" &
    child=$!
    wait "$child"
    local st=$?
    child=""
    return $st
}

rc=0
if [ -z "${SKIP_MATRIX:-}" ]; then
    step "$here/bench.py" "$@" || rc=1
fi
if [ -z "$no_proxy" ]; then
    if [ -z "${SKIP_MEMORY:-}" ]; then
        step "$here/memory.py" ${QUICK:+--quick} || rc=1
    fi
    if [ -z "${SKIP_RELOAD:-}" ]; then
        step "$here/reload.py" ${QUICK:+--quick} || rc=1
    fi
    if [ -z "${SKIP_TLS:-}" ]; then
        step "$here/bench.py" --tls ${QUICK:+--quick} || rc=1
    fi
    if [ -z "${SKIP_CURVES:-}" ]; then
        step "$here/curves.py" ${QUICK:+--quick} || rc=1
    fi
fi
if [ $rc -ne 0 ]; then
    echo "bench/run.sh: *** FAIL (see above and bench/RESULTS.md)" >&2
else
    echo "bench/run.sh: all steps passed; results in bench/RESULTS.md" >&2
fi
exit $rc
