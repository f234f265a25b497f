# Sourced by scripts that start their own redis-server and gateway nodes on
# loopback: free ports, a temporary directory, and a cleanup that stops
# every process they started (SIGTERM, then SIGKILL after 15 s).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

# Starts a gateway node (`BIN serve`) on a free loopback port with the
# given environment (VAR=value …), its log in $TMP/NAME.log, and waits
# until it answers /readyz (at most 30 s; it exits with the node's log if
# the node dies or never gets ready). Sets NODE_PORT and NODE_PID, adds
# the node to PIDS (stopped on exit) and NODE_PIDS, and its WebSocket URL
# to URLS (comma-separated).
NODE_PIDS=()
URLS=""
start_node() {
  local name="$1" bin="$2"
  shift 2
  NODE_PORT="$(free_port)"
  env "$@" GATEWAY_LISTEN="127.0.0.1:$NODE_PORT" "$bin" serve >"$TMP/$name.log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  NODE_PIDS+=("$NODE_PID")
  for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$NODE_PORT/readyz" >/dev/null 2>&1; then
      URLS="${URLS:+$URLS,}ws://127.0.0.1:$NODE_PORT/gateway"
      return 0
    fi
    kill -0 "$NODE_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "node $name did not become ready:" >&2
  tail -n 30 "$TMP/$name.log" >&2
  exit 2
}

# Starts a redis-server without persistence on a free port and on a Unix
# socket in $TMP; sets REDIS_PORT and REDIS_SOCKET.
start_redis() {
  command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 2; }
  REDIS_PORT="$(free_port)"
  REDIS_SOCKET="$TMP/redis.sock"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
    --unixsocket "$REDIS_SOCKET" --unixsocketperm 700 \
    >"$TMP/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis-server did not start:" >&2
  cat "$TMP/redis.log" >&2
  exit 2
}

# Prints N distinct free ports for Redis Cluster nodes: each below 55536 with
# port+10000 (its cluster bus port) free too, none equal to another's bus port.
# All sockets stay bound until the N are chosen, so the N are distinct.
free_cluster_ports() {
  python3 - "$1" <<'PY'
import socket, sys
n, held, ports = int(sys.argv[1]), [], []
for _ in range(10000):
    if len(ports) == n:
        break
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
    port = s.getsockname()[1]
    if port >= 55536:
        continue
    bus = socket.socket()
    try:
        bus.bind(("127.0.0.1", port + 10000))
    except OSError:
        bus.close(); continue
    held.append(bus); ports.append(port)
if len(ports) < n:
    sys.exit("no free ports below 55536 with a free bus port")
print(" ".join(map(str, ports)))
PY
}

# Starts a Redis Cluster of 3 masters and 3 replicas without persistence, each
# node in its own directory under $TMP, and waits until every node reports
# cluster_state:ok with all 16384 slots and every replica's link is up. Sets
# REDIS_CLUSTER_URLS (comma-separated redis://127.0.0.1:P of the masters, the
# seed list GATEWAY_REDIS_URL takes) and REDIS_CLUSTER_PORTS (the six ports,
# masters first, space-separated).
start_redis_cluster() {
  command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 2; }
  command -v redis-cli >/dev/null || { echo "redis-cli is missing" >&2; exit 2; }
  local ports port dir ok info masters replicas links
  ports="$(free_cluster_ports 6)"
  for port in $ports; do
    dir="$TMP/redis-cluster-$port"
    mkdir -p "$dir"
    # No diskless-sync delay: replicas sync at once instead of after 5 s.
    redis-server --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --port "$port" --bind 127.0.0.1 --save "" --appendonly no --repl-diskless-sync-delay 0 \
      --dir "$dir" >"$dir/redis.log" 2>&1 &
    PIDS+=($!)
  done
  for port in $ports; do
    ok=""
    for _ in $(seq 1 100); do
      if redis-cli -p "$port" ping >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.1
    done
    [ -n "$ok" ] || { echo "redis-server :$port did not start:" >&2; cat "$TMP/redis-cluster-$port/redis.log" >&2; exit 2; }
  done
  # shellcheck disable=SC2086 # one argument per node
  if ! redis-cli --cluster create $(printf '127.0.0.1:%s ' $ports) --cluster-replicas 1 --cluster-yes \
      >"$TMP/redis-cluster-create.log" 2>&1; then
    echo "redis-cli --cluster create failed:" >&2; cat "$TMP/redis-cluster-create.log" >&2; exit 2
  fi
  ok=""
  for _ in $(seq 1 300); do
    masters=0; replicas=0; links=0; ok=1
    for port in $ports; do
      info="$(redis-cli -p "$port" cluster info 2>/dev/null | tr -d '\r')"
      case "$info" in *cluster_state:ok*) ;; *) ok=""; break ;; esac
      case "$info" in *cluster_slots_ok:16384*) ;; *) ok=""; break ;; esac
      case "$info" in *cluster_known_nodes:6*) ;; *) ok=""; break ;; esac
      # Roles reach the other nodes by gossip after --cluster create returns:
      # every node must see 3 masters serving slots and 3 replicas, none failing.
      info="$(redis-cli -p "$port" cluster nodes 2>/dev/null | tr -d '\r' | awk '
        $3 ~ /fail|handshake|noaddr/ { next }
        $3 ~ /master/ && NF > 8 { m++ } $3 ~ /slave/ { s++ }
        END { print m + 0, s + 0 }')"
      [ "$info" = "3 3" ] || { ok=""; break; }
      info="$(redis-cli -p "$port" info replication 2>/dev/null | tr -d '\r')"
      case "$info" in *role:master*) masters=$((masters + 1)) ;; *role:slave*) replicas=$((replicas + 1)) ;; esac
      case "$info" in *master_link_status:up*) links=$((links + 1)) ;; esac
    done
    [ -n "$ok" ] && [ "$masters" = 3 ] && [ "$replicas" = 3 ] && [ "$links" = 3 ] && break
    ok=""
    sleep 0.1
  done
  [ -n "$ok" ] || {
    echo "redis cluster on ports $ports was not ok within 30 s:" >&2
    redis-cli -p "${ports%% *}" cluster nodes >&2 || true
    exit 2
  }
  masters="$(redis-cli -p "${ports%% *}" cluster nodes | tr -d '\r' |
    awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "[:@]"); print a[2] }' | sort -n)"
  REDIS_CLUSTER_PORTS="$(echo $masters) $(for port in $ports; do
    echo "$masters" | grep -qx "$port" || echo "$port"; done | tr '\n' ' ')"
  REDIS_CLUSTER_PORTS="${REDIS_CLUSTER_PORTS% }"
  REDIS_CLUSTER_URLS="$(for port in $masters; do echo "redis://127.0.0.1:$port"; done | paste -sd, -)"
}
