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

# Starts a redis-server without persistence on a free port; sets REDIS_PORT.
start_redis() {
  command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 2; }
  REDIS_PORT="$(free_port)"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
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
