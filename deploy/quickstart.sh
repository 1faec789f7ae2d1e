#!/usr/bin/env bash
# Quick start: install sglang-pd, make a tiny local model, start a prefill/decode cluster on CPU
# (one prefill worker, one decode worker, the router in front) and print ready-to-paste curl lines.
#
#   bash deploy/quickstart.sh [--port N] [--model-path DIR] [--no-install] [--colocated]
#
# Runs on a fresh Linux machine with Python 3.11+ and no GPU; nothing is downloaded except the
# Python packages. Everything stays in the foreground; Ctrl-C (or SIGTERM) drains and stops it all.
#
# Options and environment:
#   --port N          the cluster's entry point: the router (env PORT, default 8000); with
#                     --colocated, the single server (default 30000)
#   --model-path DIR  serve this HF model directory instead of making a tiny one
#   --no-install      skip the pip installs (the package is already installed)
#   --colocated       the old single-server mode: one colocated worker, no router
#   PYTHON            interpreter to use (default python3)
#   MODEL_DIR         where the tiny model goes (default ${TMPDIR:-/tmp}/sglang-pd-tiny-llama)
#   SERVED_MODEL_NAME the API's model id (default tiny-llama, or the --model-path directory's name)
#   STARTUP_TIMEOUT   seconds to wait for each /health (default 300)
#
# Layout: one function per step. PD mode: start_worker prefill + start_worker decode (HTTP and
# bootstrap ports picked free), wait for both, start_router on --port, wait for its /health; every
# process is tracked in PIDS/LOGS/NAMES and stopped by stop_all (router first).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PORT=${PORT:-}
COLOCATED=0
HOST=127.0.0.1
MODEL_PATH=""
SERVED_NAME=${SERVED_MODEL_NAME:-}
INSTALL=1
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
WORK_DIR=${TMPDIR:-/tmp}
MODEL_DIR=${MODEL_DIR:-$WORK_DIR/sglang-pd-tiny-llama}
LOG_DIR=""
TOPOLOGY=""
PIDS=()   # every process this script started, in start order
LOGS=()   # their log files, same order
NAMES=()  # their roles, same order

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { printf '[quickstart] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT=$2; shift 2 ;;
            --port=*) PORT=${1#*=}; shift ;;
            --model-path) [[ $# -ge 2 ]] || die "--model-path needs a value"; MODEL_PATH=$2; shift 2 ;;
            --model-path=*) MODEL_PATH=${1#*=}; shift ;;
            --no-install) INSTALL=0; shift ;;
            --colocated) COLOCATED=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
    done
    if [[ -z $PORT ]]; then
        if [[ $COLOCATED == 1 ]]; then PORT=30000; else PORT=8000; fi
    fi
    [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
}

install() {
    [[ $INSTALL == 1 ]] || { say "skipping install (--no-install)"; return; }
    command -v "$PY" >/dev/null || die "$PY not found; install Python 3.11+ or set PYTHON"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ needed, $PY is $("$PY" -V 2>&1)"
    say "installing torch (CPU) and sglang-pd with $PY -m pip (a few minutes on a fresh machine)"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
    # torch first: the local CPU wheel, so that the project's deps do not pull a CUDA build.
    "$PY" -m pip install -q "torch==2.13.0"
    (cd "$REPO" && "$PY" -m pip install -q -e .)
}

make_model() {
    if [[ -n $MODEL_PATH ]]; then
        [[ -f $MODEL_PATH/config.json ]] || die "--model-path $MODEL_PATH has no config.json"
        SERVED_NAME=${SERVED_NAME:-$(basename "$MODEL_PATH")}
        return
    fi
    MODEL_PATH=$MODEL_DIR
    SERVED_NAME=${SERVED_NAME:-tiny-llama}
    if [[ -f $MODEL_PATH/config.json ]]; then
        say "using the tiny model already at $MODEL_PATH"
        return
    fi
    say "making a tiny random-weight llama model at $MODEL_PATH"
    "$PY" -m sglang_pd.tools.make_tiny_model "$MODEL_PATH" --arch llama >/dev/null
}

require_free_port() {  # a port someone else holds would answer our /health polls
    "$PY" - "$HOST" "$1" 2>/dev/null <<'EOF' || die "port $1 on $HOST is in use; pick another with --port"
import socket, sys
with socket.socket() as s:  # SO_REUSEADDR as aiohttp: TIME_WAIT leftovers are fine
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
EOF
}

free_ports() {  # free_ports N: N distinct free TCP ports on HOST, one per line
    "$PY" - "$HOST" "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[2]))]
for s in socks:  # all bound at once, so the ports differ
    s.bind((sys.argv[1], 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# start_worker ROLE PORT [extra launch_server flags...]: background a worker, remember pid and log.
start_worker() {
    local role=$1 port=$2 log
    shift 2
    require_free_port "$port"
    log=$LOG_DIR/$role-$port.log
    say "starting $role on http://$HOST:$port (log: $log)"
    "$PY" -m sglang_pd.launch_server --model-path "$MODEL_PATH" --host "$HOST" --port "$port" "$@" >"$log" 2>&1 &
    PIDS+=("$!")
    LOGS+=("$log")
    NAMES+=("$role")
}

# start_router PREFILL_URL BOOTSTRAP_PORT DECODE_URL: background the PD router on PORT.
start_router() {
    local log=$LOG_DIR/router-$PORT.log
    say "starting router on http://$HOST:$PORT (log: $log)"
    "$PY" -m router.launch_router --pd-disaggregation --prefill "$1" "$2" --decode "$3" \
        --host "$HOST" --port "$PORT" --health-check-interval-secs 1 >"$log" 2>&1 &
    PIDS+=("$!")
    LOGS+=("$log")
    NAMES+=("router")
}

http_status() {  # http_status URL -> the HTTP status code, 000 when nothing answers
    "$PY" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

fail_with_logs() {
    say "error: $1"
    local i
    for i in "${!PIDS[@]}"; do
        say "last lines of ${NAMES[$i]} log ${LOGS[$i]}:"
        tail -n 30 "${LOGS[$i]}" >&2 || true
    done
    exit 1
}

# wait_healthy URL: poll URL/health until 200; fail loudly if a started process dies or time runs out.
wait_healthy() {
    local url=$1 deadline=$((SECONDS + STARTUP_TIMEOUT)) i
    say "waiting for $url/health (up to ${STARTUP_TIMEOUT}s)"
    while true; do
        for i in "${!PIDS[@]}"; do
            kill -0 "${PIDS[$i]}" 2>/dev/null || fail_with_logs "${NAMES[$i]} (pid ${PIDS[$i]}) exited during startup"
        done
        [[ $(http_status "$url/health") == 200 ]] && return
        ((SECONDS < deadline)) || fail_with_logs "$url/health not ready after ${STARTUP_TIMEOUT}s"
        sleep 1
    done
}

print_examples() {
    local url=$1 model=$2
    cat <<EOF

sglang-pd is serving $MODEL_PATH as "$model" at $url
$TOPOLOGY
Try it (paste into another terminal):

curl -s $url/generate -H 'Content-Type: application/json' -d '{"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}'

curl -s $url/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "$model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'

EOF
    [[ $MODEL_PATH != "$MODEL_DIR" ]] || echo "(The tiny model has random weights: expect random text.)"
    echo "Logs: $LOG_DIR. Ctrl-C stops everything."
}

stop_all() {  # SIGTERM everything started (last first: router before workers), then wait
    trap - INT TERM EXIT
    local i
    [[ ${#PIDS[@]} -gt 0 ]] || return 0
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    say "stopping (draining in-flight requests)"
    wait || true
}

main() {
    parse_args "$@"
    install
    make_model
    LOG_DIR=$(mktemp -d "$WORK_DIR/sglang-pd-quickstart.XXXXXX")
    trap stop_all EXIT
    trap 'stop_all; exit 130' INT
    trap 'stop_all; exit 143' TERM
    export UCX_WARN_UNUSED_ENV_VARS=${UCX_WARN_UNUSED_ENV_VARS:-n}
    require_free_port "$PORT"
    if [[ $COLOCATED == 1 ]]; then
        start_worker server "$PORT" --served-model-name "$SERVED_NAME" --enable-metrics
        wait_healthy "http://$HOST:$PORT"
        TOPOLOGY="(one colocated worker, no router)"
    else
        local ports p_port d_port b_port
        mapfile -t ports < <(free_ports 3)
        p_port=${ports[0]} d_port=${ports[1]} b_port=${ports[2]}
        start_worker prefill "$p_port" --served-model-name "$SERVED_NAME" --enable-metrics \
            --disaggregation-mode prefill --disaggregation-bootstrap-port "$b_port"
        start_worker decode "$d_port" --served-model-name "$SERVED_NAME" --enable-metrics \
            --disaggregation-mode decode
        wait_healthy "http://$HOST:$p_port"
        wait_healthy "http://$HOST:$d_port"
        start_router "http://$HOST:$p_port" "$b_port" "http://$HOST:$d_port"
        wait_healthy "http://$HOST:$PORT"
        TOPOLOGY="(router in front of prefill http://$HOST:$p_port, bootstrap port $b_port, and decode http://$HOST:$d_port; KV over UCX)"
    fi
    print_examples "http://$HOST:$PORT" "$SERVED_NAME"
    serve_foreground
}

serve_foreground() {  # until Ctrl-C/SIGTERM (the traps) or until any started process exits
    local rc=0
    wait -n || rc=$?  # the only background jobs are the PIDS
    [[ $rc -eq 0 ]] || fail_with_logs "a process exited with status $rc"
    say "a process exited; stopping the rest"
    exit 0  # the EXIT trap stops the others
}

main "$@"
