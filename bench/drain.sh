#!/usr/bin/env bash
# How long a node takes to drain CLIENTS sessions (docs/BENCHMARKS.md,
# "Draining a node"): a redis-server of its own, one node on it, loadtest
# holding CLIENTS sessions in 10 channels (presence off), then SIGTERM;
# prints the time from SIGTERM to the node's exit and how many sessions it
# parked. Loopback only; loadtest stops itself after its hold.
#
#   cargo build --release -p gateway-node -p gateway-loadtest
#   bench/drain.sh [CLIENTS]              # default 5000; at most ~18,000 (open files)
#
# BIN=path drains another build of the node.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${1:-5000}"
BIN="${BIN:-target/release/gateway-node}"
for bin in "$BIN" target/release/loadtest; do
  [ -x "$bin" ] || { echo "build $bin first" >&2; exit 2; }
done
source scripts/lib-processes.sh
start_redis
SECRET=drain-secret-drain-secret-drain-secret-0123
start_node node "$BIN" GATEWAY_JWT_SECRET="$SECRET" GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" \
  GATEWAY_NODE_ID=drain-1 GATEWAY_LOG=info GATEWAY_LOG_FORMAT=json GATEWAY_DRAIN_GRACE_S=120 \
  GATEWAY_PRESENCE_THRESHOLD=0
node_pid=$NODE_PID
target/release/loadtest connect --urls "ws://127.0.0.1:$NODE_PORT/gateway" --jwt-secret "$SECRET" \
  --clients "$CLIENTS" --channels 10 --ramp-per-s 5000 --hold-s 60 --quiet >/dev/null 2>&1 &
PIDS+=($!)
live=0
for _ in $(seq 1 600); do
  live="$(curl -s "http://127.0.0.1:$NODE_PORT/metrics" |
    sed -n 's/^gateway_sessions{state="live"[^}]*} //p')"
  [ "${live:-0}" -ge "$CLIENTS" ] && break
  sleep 0.1
done
[ "${live:-0}" -ge "$CLIENTS" ] || { echo "only ${live:-0} of $CLIENTS sessions came up" >&2; exit 1; }
start="$(date +%s.%N)"
kill -TERM "$node_pid"
while kill -0 "$node_pid" 2>/dev/null; do sleep 0.01; done
end="$(date +%s.%N)"
parked="$(sed -n 's/.*"parked":\([0-9]*\).*/\1/p' "$TMP/node.log" | tail -1)"
printf 'drain of %s sessions: %.2f s from SIGTERM to exit, %s parked\n' \
  "$CLIENTS" "$(echo "$end - $start" | bc)" "${parked:-0}"
