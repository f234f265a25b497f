#!/usr/bin/env bash
# One benchmark run, reproducible: a redis-server of its own (free port,
# temporary directory), two gateway nodes on it, one loadtest scenario
# against both, the JSON report kept in bench/results/NAME.json, and
# everything stopped afterwards. Loopback only; bounded by loadtest.
#
#   bench/run.sh NAME rust|node|bun SCENARIO [loadtest flags…]
#   bench/run.sh fanout-1x2000-r150 rust fanout --clients 2000 --channels 1 --publishers 10 --rate 150 --duration-s 10
#
# `rust` runs target/release/gateway-node, or $GATEWAY_BIN (build it first:
# cargo build --release -p gateway-node -p gateway-loadtest); `node` runs
# bench/node-peer (npm ci there first); `bun` runs bench/bun-peer on the Bun
# binary its npm ci installs (npm ci there first). NODES=1 runs a single node;
# WORKER_THREADS=N gives each Rust node N runtime threads; REDIS_MODE=cluster
# puts the Rust nodes on a Redis Cluster of 3 masters and 3 replicas instead
# of one Redis (the report then has Redis CPU per server); REDIS_MODE=none
# runs them without Redis, on the in-memory backend (with NODES=1);
# REDIS_TRANSPORT=unix connects the Rust nodes to the one Redis over its
# Unix socket instead of TCP loopback.
# Profiling while loadtest runs (both cost CPU: do not take such a run's CPU
# figures): PERF_DATA=FILE records the first node with `perf record -g`;
# SYSCALLS=1 counts the nodes' system calls and context switches with
# `perf stat` (in the report as bench.node_syscalls, and per delivery).
# REDIS_CPUS=LIST pins the one Redis to those CPUs and everything else the
# run starts (nodes, tester) to BENCH_CPUS (taskset lists, e.g.
# REDIS_CPUS=1 BENCH_CPUS=0: Redis with a core of its own, as on a host of
# its own).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="$1"; IMPL="$2"; shift 2
NODES="${NODES:-2}"
LT=target/release/loadtest
[ -x "$LT" ] || { echo "build target/release/loadtest first" >&2; exit 2; }

source scripts/lib-processes.sh
if [ "${REDIS_MODE:-single}" = none ]; then
  REDIS_PORTS=""
  REDIS_ENV=()
elif [ "${REDIS_MODE:-single}" = cluster ]; then
  start_redis_cluster
  REDIS_PORTS="$REDIS_CLUSTER_PORTS"
  REDIS_ENV=(GATEWAY_REDIS_URL="$REDIS_CLUSTER_URLS" GATEWAY_REDIS_CLUSTER=true)
else
  start_redis
  REDIS_PORTS="$REDIS_PORT"
  if [ -n "${REDIS_CPUS:-}" ]; then
    taskset -apc "$REDIS_CPUS" "${PIDS[-1]}" >/dev/null
    taskset -pc "${BENCH_CPUS:?REDIS_CPUS needs BENCH_CPUS}" $$ >/dev/null
  fi
  if [ "${REDIS_TRANSPORT:-tcp}" = unix ]; then
    REDIS_ENV=(GATEWAY_REDIS_URL="unix://$REDIS_SOCKET")
  else
    REDIS_ENV=(GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/")
  fi
fi

SECRET=bench-secret-bench-secret-bench-secret-0123
for i in $(seq 1 "$NODES"); do
  if [ "$IMPL" = rust ]; then
    start_node "node$i" "${GATEWAY_BIN:-target/release/gateway-node}" GATEWAY_JWT_SECRET="$SECRET" "${REDIS_ENV[@]}" \
      GATEWAY_RATE_LIMIT_COUNT=1000000 GATEWAY_NODE_ID="bench-$i" GATEWAY_LOG=warn \
      ${WORKER_THREADS:+GATEWAY_WORKER_THREADS=$WORKER_THREADS}
    continue
  fi
  # The peers: no /readyz, so /metrics tells that they listen.
  port="$(free_port)"
  if [ "$IMPL" = bun ]; then
    BUN=bench/bun-peer/node_modules/@oven/bun-linux-x64/bin/bun
    [ -x "$BUN" ] || { echo "run npm ci in bench/bun-peer first" >&2; exit 2; }
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" JWT_SECRET="$SECRET" PORT="$port" \
      "$BUN" bench/bun-peer/server.js >"$TMP/node$i.log" 2>&1 &
  else
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" JWT_SECRET="$SECRET" PORT="$port" \
      node bench/node-peer/server.js >"$TMP/node$i.log" 2>&1 &
  fi
  PIDS+=($!)
  NODE_PIDS+=($!)
  until curl -fsS "http://127.0.0.1:$port/metrics" >/dev/null 2>&1; do
    kill -0 "$!" 2>/dev/null || { echo "node $i exited:" >&2; cat "$TMP/node$i.log" >&2; exit 2; }
    sleep 0.05
  done
  URLS="${URLS:+$URLS,}ws://127.0.0.1:$port/gateway"
done

cpu() { # CPU seconds used so far by the node processes (from /proc, in ticks)
  local ticks=0
  for pid in "${NODE_PIDS[@]}"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    ticks=$((ticks + t))
  done
  python3 -c "import os; print($ticks / os.sysconf('SC_CLK_TCK'))"
}

redis_cpu() { # CPU seconds so far (user + sys, from INFO cpu) of each Redis server, "port=s ..."
  for port in $REDIS_PORTS; do
    redis-cli -p "$port" info cpu | tr -d '\r' |
      awk -F: -v p="$port" '$1 == "used_cpu_sys" || $1 == "used_cpu_user" { t += $2 } END { printf "%s=%.3f ", p, t }'
  done
}

mkdir -p bench/results
echo "bench: $NAME ($IMPL, $NODES node(s)): loadtest $*" >&2
for port in $REDIS_PORTS; do redis-cli -p "$port" config resetstat >/dev/null; done
RCPU0=$(redis_cpu)
CPU0=$(cpu)
PERF_PIDS=()
if [ -n "${PERF_DATA:-}" ]; then
  perf record -g -o "$PERF_DATA" -p "${NODE_PIDS[0]}" >"$TMP/perf-record.log" 2>&1 &
  PERF_PIDS+=($!)
fi
if [ -n "${SYSCALLS:-}" ]; then
  events=context-switches
  for call in sendto write writev sendmsg recvfrom read readv epoll_wait futex; do
    events="$events,syscalls:sys_enter_$call"
  done
  perf stat -x, -e "$events" -o "$TMP/perf-stat.csv" -p "$(IFS=,; echo "${NODE_PIDS[*]}")" >/dev/null 2>&1 &
  PERF_PIDS+=($!)
fi
PIDS+=("${PERF_PIDS[@]}")
sleep "${PERF_PIDS:+0.5}0"
rc=0
REDIS_URLS="$(for port in $REDIS_PORTS; do echo "redis://127.0.0.1:$port"; done | paste -sd, -)"
# The tester's own CPU (with its worker processes): on one box it competes
# with the nodes for the same cores.
TIMEFORMAT='%U %S'
{ time "$LT" "$@" --urls "$URLS" --jwt-secret "$SECRET" ${REDIS_URLS:+--redis "$REDIS_URLS"} \
  --json "bench/results/$NAME.json" --quiet 2>&3 || rc=$?; } 3>&2 2>"$TMP/tester-time"
CPU1=$(cpu)
for pid in "${PERF_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
[ -f "$TMP/perf-stat.csv" ] || : >"$TMP/perf-stat.csv"
RCPU1=$(redis_cpu)
for port in $REDIS_PORTS; do
  redis-cli -p "$port" info commandstats | tr -d '\r' | grep '^cmdstat_' || true
done >"$TMP/commandstats"
# Node and Redis CPU per delivered / published message, added to the report.
python3 - "bench/results/$NAME.json" "$CPU0" "$CPU1" "$IMPL" "$NODES" "$RCPU0" "$RCPU1" "$TMP/commandstats" "${REDIS_MODE:-single}" "$TMP/perf-stat.csv" "$TMP/tester-time" <<'PY'
import json, sys
path, c0, c1, impl, nodes = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
per0 = dict(kv.split("=") for kv in sys.argv[6].split())
per1 = dict(kv.split("=") for kv in sys.argv[7].split())
per = {port: round(float(per1[port]) - float(per0[port]), 3) for port in per1}
r0, r1 = 0.0, sum(per.values())
r = json.load(open(path))
r["bench"] = {"impl": impl, "nodes": nodes, "redis_mode": sys.argv[9], "node_cpu_s": round(c1 - c0, 3),
              "redis_cpu_s": round(r1 - r0, 3), "redis_cpu_s_per_server": per}
if r.get("delivered"):
    r["bench"]["node_cpu_us_per_delivery"] = round((c1 - c0) / r["delivered"] * 1e6, 3)
if r.get("sent"):
    r["bench"]["redis_cpu_us_per_message"] = round((r1 - r0) / r["sent"] * 1e6, 3)
# cmdstat_evalsha:calls=26600,usec=…,usec_per_call=…,rejected_calls=0,failed_calls=0
stats = {}
for line in open(sys.argv[8]):
    name, _, fields = line.strip().partition(":")
    f = dict(kv.split("=", 1) for kv in fields.split(","))
    s = stats.setdefault(name.removeprefix("cmdstat_"), {"calls": 0, "usec": 0})
    s["calls"] += int(f["calls"])
    s["usec"] += int(f["usec"])
tester = open(sys.argv[11]).read().split()
if len(tester) == 2:
    r["bench"]["tester_cpu_s"] = round(float(tester[0]) + float(tester[1]), 3)
r["bench"]["redis_commands"] = dict(sorted(stats.items(), key=lambda kv: -kv[1]["calls"]))
# perf stat -x, lines: value,unit,event,… (SYSCALLS=1)
calls = {}
for line in open(sys.argv[10]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].isdigit():
        calls[f[2].removeprefix("syscalls:sys_enter_")] = int(f[0])
if calls:
    r["bench"]["node_syscalls"] = calls
    if r.get("delivered"):
        r["bench"]["node_syscalls_per_delivery"] = {k: round(v / r["delivered"], 4) for k, v in calls.items()}
json.dump(r, open(path, "w"), indent=2)
print(f"  node cpu               {c1 - c0:.2f} s" + (f" ({r['bench']['node_cpu_us_per_delivery']} us per delivery)" if r.get("delivered") else ""))
if "tester_cpu_s" in r["bench"]:
    print(f"  tester cpu             {r['bench']['tester_cpu_s']:.2f} s")
print(f"  redis cpu              {r1 - r0:.2f} s" + (f" ({r['bench']['redis_cpu_us_per_message']} us per message sent)" if r.get("sent") else ""))
if len(per) > 1:
    print("  redis cpu per server   " + ", ".join(f":{p} {v:.2f} s" for p, v in per.items()))
if calls and r.get("delivered"):
    print("  node calls/delivery    " + ", ".join(f"{k} {v}" for k, v in r["bench"]["node_syscalls_per_delivery"].items() if v))
print("  redis commands         " + ", ".join(f"{k} {v['calls']}" for k, v in list(r["bench"]["redis_commands"].items())[:8]))
PY
exit "$rc"
