#!/usr/bin/env bash
# Runs the black-box conformance suite against two gateway nodes sharing a
# Redis of their own: one redis-server on a free port in a temporary
# directory, or with REDIS_MODE=cluster a Redis Cluster of 3 masters and 3
# replicas (sharded pub/sub). Clients spread over both nodes; resumes go to
# the other node; the last test drains one node (SIGTERM) and checks that
# its clients resume on the other with nothing lost.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${GATEWAY_BIN:-target/debug/gateway-node}"
[ -x "$BIN" ] || { echo "cluster-conformance: build $BIN first" >&2; exit 2; }
source scripts/lib-processes.sh
if [ "${REDIS_MODE:-single}" = cluster ]; then
  start_redis_cluster
  REDIS_ENV=(GATEWAY_REDIS_URL="$REDIS_CLUSTER_URLS" GATEWAY_REDIS_CLUSTER=true)
  WHERE="redis cluster $REDIS_CLUSTER_URLS"
else
  start_redis
  REDIS_ENV=(GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/")
  WHERE="redis :$REDIS_PORT"
fi

SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
for i in 1 2; do
  start_node "node$i" "$BIN" GATEWAY_JWT_SECRET="$SECRET" GATEWAY_HB_INT_MS=3000 \
    "${REDIS_ENV[@]}" GATEWAY_NODE_ID="conformance-$i"
done

echo "cluster-conformance: nodes $URLS on $WHERE"
GATEWAY_URLS="$URLS" GATEWAY_NODE_PIDS="$(IFS=,; echo "${NODE_PIDS[*]}")" GATEWAY_JWT_SECRET="$SECRET" GATEWAY_HB_INT_MS=3000 \
  bash conformance/run.sh "$@"
