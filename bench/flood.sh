#!/usr/bin/env bash
# Floods one gateway node with abusive connections while a well-behaved
# client chats, and prints the chat's latency, the node's RSS and how each
# abuse was cut off (docs/DEPLOY.md, "Security and abuse limits").
# Loopback only; bounded by the counts and the duration.
#
#   cargo build --release -p gateway-node
#   bench/flood.sh [flood.py flags…]
#   bench/flood.sh --slowloris 800 --never-present 800 --forged 200 --never-read 1000 --duration-s 40
#
# ROUNDS=N runs the flood N times against the same node (does memory come
# back?), e.g. ROUNDS=3 bench/flood.sh --after-s 65.
#
# The node runs on the in-memory backend with its default limits (header
# timeout 10 s, hb_int 20 s, outbound limit 1024) except two: the rate limit
# is raised (GATEWAY_RATE_LIMIT_COUNT=1000000, so that the chat client is
# never the one limited) and logs are errors only (GATEWAY_LOG=error); both,
# and any other GATEWAY_* setting, can be given in the environment
# (GATEWAY_JWT_SECRET, GATEWAY_NODE_ID and GATEWAY_LISTEN are the script's).
# BIN=path runs another build of the node.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/gateway-node}"
[ -x "$BIN" ] || { echo "build $BIN first: cargo build --release -p gateway-node" >&2; exit 2; }

source scripts/lib-processes.sh
SECRET=flood-secret-flood-secret-flood-secret-0123
start_node node "$BIN" GATEWAY_JWT_SECRET="$SECRET" GATEWAY_NODE_ID=flood \
  GATEWAY_RATE_LIMIT_COUNT="${GATEWAY_RATE_LIMIT_COUNT:-1000000}" GATEWAY_LOG="${GATEWAY_LOG:-error}"
NODE=$NODE_PID
port=$NODE_PORT
echo "node pid $NODE on 127.0.0.1:$port, $(nproc) cores, open files per process $(ulimit -n)"
for round in $(seq 1 "${ROUNDS:-1}"); do
  [ "${ROUNDS:-1}" = 1 ] || echo "== flood $round of $ROUNDS against the same node"
  python3 bench/flood.py --addr "127.0.0.1:$port" --secret "$SECRET" --node-pid "$NODE" "$@"
done
kill -0 "$NODE" 2>/dev/null || { echo "the node died:" >&2; tail -20 "$TMP/node.log" >&2; exit 1; }
echo "node alive after the flood"
