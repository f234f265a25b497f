#!/usr/bin/env bash
# One shard that stops answering while two nodes publish under load
# (docs/ARCHITECTURE.md, "A shard that stops answering"): a Redis Cluster
# (3 masters, 3 replicas, cluster-require-full-coverage no), two release
# nodes, `loadtest fanout`; then one replica is stopped (SIGSTOP: it
# accepts connections and never answers) and its master killed, so that
# shard's slots stay with a dead master. Prints node 1's publish and error
# counters every 2 s: the publish count keeps rising (channels on the live
# shards) while the errors count the dead shard's refusals.
#
# Needs: cargo build --release -p gateway-node -p gateway-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-processes.sh
start_redis_cluster
echo "cluster: $REDIS_CLUSTER_PORTS"
for p in $REDIS_CLUSTER_PORTS; do redis-cli -p "$p" config set cluster-require-full-coverage no >/dev/null; done
SECRET=stall-secret-stall-secret-stall-secret-0123
NODE_PORTS=()
for i in 1 2; do
  start_node "node$i" target/release/gateway-node GATEWAY_JWT_SECRET="$SECRET" GATEWAY_REDIS_URL="$REDIS_CLUSTER_URLS" \
    GATEWAY_REDIS_CLUSTER=true GATEWAY_RATE_LIMIT_COUNT=1000000 GATEWAY_NODE_ID="stall-$i" \
    GATEWAY_LOG="${GATEWAY_LOG:-info}"
  NODE_PORTS+=("$NODE_PORT")
done
read -r -a replicas <<<"$(echo "$REDIS_CLUSTER_PORTS" | cut -d' ' -f4-)"
target/release/loadtest fanout --urls "$URLS" --jwt-secret "$SECRET" --clients 200 --channels 10 \
  --publishers 10 --rate 100 --duration-s 40 --json "$TMP/r.json" >"$TMP/lt.log" 2>&1 &
LT=$!
sleep 10
pid=$(pgrep -f "redis-server 127.0.0.1:${replicas[0]}" | head -1)
master=$(redis-cli -p "${replicas[0]}" info replication | tr -d '\r' | awk -F: '$1=="master_port"{print $2}')
echo "stopping replica :${replicas[0]} (pid $pid), then killing its master :$master"
kill -STOP "$pid"
sleep 1
kill -KILL "$(pgrep -f "redis-server 127.0.0.1:$master" | head -1)"
for s in $(seq 1 12); do
  sleep 2
  m=$(curl -s "http://127.0.0.1:${NODE_PORTS[0]}/metrics" \
    | grep -E '^gateway_broker_publish_seconds_count|^gateway_broker_errors_total' \
    | awk '{print $1"="$2}' | sed 's/{[^}]*}//' | tr '\n' ' ')
  echo "t+$((s * 2))s node1: $m"
done
grep -cE "stopped answering; replacing it" "$TMP/node1.log" | sed 's/^/node1 connection replacements: /' || true
kill -CONT "$pid"
echo "continued replica"
wait $LT || true
grep -E "sent|delivered|lost|latency|errors|closed" "$TMP/lt.log" | tail -12 || true
