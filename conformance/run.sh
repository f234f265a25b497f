#!/usr/bin/env bash
# Run the black-box conformance suite against a gateway node.
#
#   GATEWAY_URL=ws://127.0.0.1:8080/gateway GATEWAY_JWT_SECRET=... GATEWAY_HB_INT_MS=3000 ./run.sh
#   GATEWAY_URLS=ws://127.0.0.1:8080/gateway,ws://127.0.0.1:8081/gateway GATEWAY_JWT_SECRET=... ./run.sh
#   ./run.sh            # starts $GATEWAY_BIN (default target/debug/gateway-node) itself
#
# Extra arguments go to pytest (e.g. ./run.sh -k resume -x).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv"

# ---- virtualenv
if [ ! -x "$VENV/bin/python" ]; then
    PY="${PYTHON:-}"
    if [ -z "$PY" ]; then
        for cand in python3.11 python3; do
            if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
        done
    fi
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"

# ---- the node(s) under test
NODE_PID=""
cleanup() {
    if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
        kill -TERM "$NODE_PID" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$NODE_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$NODE_PID" 2>/dev/null; then
            echo "run.sh: node $NODE_PID still alive 15 s after SIGTERM, sending SIGKILL" >&2
            kill -KILL "$NODE_PID" 2>/dev/null || true
        fi
        wait "$NODE_PID" 2>/dev/null || true
    fi
    NODE_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${GATEWAY_URL:-}" ] && [ -n "${GATEWAY_URLS:-}" ]; then
    GATEWAY_URL="${GATEWAY_URLS%%,*}"
    export GATEWAY_URL
fi

if [ -z "${GATEWAY_URL:-}" ]; then
    BIN="${GATEWAY_BIN:-$REPO/target/debug/gateway-node}"
    case "$BIN" in /*) ;; *) BIN="$REPO/$BIN" ;; esac
    if [ ! -x "$BIN" ]; then
        echo "run.sh: no GATEWAY_URL and no node binary at $BIN (build it, or set GATEWAY_BIN)" >&2
        exit 2
    fi
    SECRET="$("$VENV/bin/python" -c 'import secrets, string; a = string.ascii_letters + string.digits; print("".join(secrets.choice(a) for _ in range(48)))')"
    PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    LOG="$HERE/node.log"
    echo "run.sh: starting $BIN serve on 127.0.0.1:$PORT (log: $LOG)"
    GATEWAY_JWT_SECRET="$SECRET" GATEWAY_HB_INT_MS=3000 GATEWAY_LISTEN="127.0.0.1:$PORT" \
        "$BIN" serve >"$LOG" 2>&1 &
    NODE_PID=$!

    healthy=""
    deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$NODE_PID" 2>/dev/null; then
            echo "run.sh: the node exited during startup; last lines of its log:" >&2
            tail -n 30 "$LOG" >&2 || true
            NODE_PID=""
            exit 2
        fi
        if "$VENV/bin/python" - "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
        then
            healthy=yes
            break
        fi
        sleep 0.1
    done
    if [ -z "$healthy" ]; then
        echo "run.sh: the node did not answer GET /healthz with 200 within 30 s; last lines of its log:" >&2
        tail -n 30 "$LOG" >&2 || true
        exit 2
    fi
    export GATEWAY_URL="ws://127.0.0.1:$PORT/gateway"
    export GATEWAY_JWT_SECRET="$SECRET"
    export GATEWAY_HB_INT_MS=3000
    export GATEWAY_NODE_PID="$NODE_PID"  # lets the last test check the node's shutdown
    unset GATEWAY_URLS
fi

if [ -z "${GATEWAY_JWT_SECRET:-}" ]; then
    echo "run.sh: GATEWAY_JWT_SECRET must be set to the node's secret" >&2
    exit 2
fi

echo "run.sh: testing ${GATEWAY_URLS:-$GATEWAY_URL} (hb_int ${GATEWAY_HB_INT_MS:-unknown} ms)"
rc=0
(cd "$HERE" && "$VENV/bin/python" -m pytest "$@") || rc=$?
exit "$rc"
