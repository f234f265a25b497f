#!/usr/bin/env bash
# 100,000 concurrent presented sessions on one box, reproducible: a
# redis-server of its own, six release gateway nodes on it, and
# `loadtest connect --fanout-at-end` over several worker processes and
# source addresses: every session is opened (HELLO, PRESENT, READY) at a
# ramp, held with heartbeats, then ONE message sent into the default
# channel must reach every one of them. Loopback only; bounded by loadtest
# (--max-run-s); everything is stopped afterwards.
#
#   flock /tmp/bench.lock bash bench/100k.sh
#
# Knobs (environment): NAME (100k: bench/results/NAME.json and
# NAME-samples.csv), NODES (6), CLIENTS (100000), WORKERS (loadtest worker
# processes, 6), RAMP (sessions/s, 1500: about what two shared cores set
# up), HOLD_S (60), SOURCE_IPS (127.0.0.2-127.0.0.9), WORKER_THREADS
# (runtime threads per node, 1: the nodes share two cores).
#
# Open files: every process here is held to the open-file limit (20,000 on
# the benchmark machine; the script raises the soft limit to the hard one).
# A node needs one descriptor per session plus 14 of its own (measured:
# stdio, runtime, listener, Redis) and one per /metrics scrape; a loadtest
# worker one per client. So five nodes hold at most 5 × 19,985 sessions
# under a limit of 20,000, not 100,000: the default is six nodes
# (NODES=5 CLIENTS=99900 is the five-node run). The script refuses a plan
# that cannot fit.
#
# Besides loadtest's report, a sampler reads every node's RSS and open
# files from /proc every 2 s (the nodes' own /metrics need a free
# descriptor, which a node at its limit does not have), with Redis'
# used_memory, the tester's RSS and the kernel's TCP memory, into
# bench/results/NAME-samples.csv; the peaks go into the report under
# "bench".
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="${NAME:-100k}"
NODES="${NODES:-6}"
CLIENTS="${CLIENTS:-100000}"
WORKERS="${WORKERS:-6}"
RAMP="${RAMP:-1500}"
HOLD_S="${HOLD_S:-60}"
SOURCE_IPS="${SOURCE_IPS:-127.0.0.2-127.0.0.9}"
WORKER_THREADS="${WORKER_THREADS:-1}"
LT=target/release/loadtest
GW=target/release/gateway-node
for bin in "$LT" "$GW"; do
  [ -x "$bin" ] || { echo "build $bin first: cargo build --release -p gateway-node -p gateway-loadtest" >&2; exit 2; }
done

# As many open files as allowed: the soft limit up to the hard one.
hard="$(ulimit -Hn)"
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"
limit="$(ulimit -n)"
per_node=$(( (CLIENTS + NODES - 1) / NODES ))
per_worker=$(( (CLIENTS + WORKERS - 1) / WORKERS ))
NODE_FDS_OWN=20 # measured: 14 of a node's own, one per /metrics scrape, a margin
if [ $((per_node + NODE_FDS_OWN)) -gt "$limit" ]; then
  echo "100k: $per_node sessions per node do not fit in $limit open files (plus ~$NODE_FDS_OWN of the node's own);" \
       "use more NODES or fewer CLIENTS (at most $(( (limit - NODE_FDS_OWN) * NODES )) with $NODES nodes)" >&2
  exit 2
fi
if [ $((per_worker + 64)) -gt "$limit" ]; then
  echo "100k: $per_worker clients per loadtest worker do not fit in $limit open files; raise WORKERS" >&2
  exit 2
fi

source scripts/lib-processes.sh
start_redis
# The sessions' state (and the channel's members) live in Redis; it holds
# one connection or two per node.
redis-cli -p "$REDIS_PORT" config set maxclients 1000 >/dev/null

SECRET=bench-secret-bench-secret-bench-secret-0123
for i in $(seq 1 "$NODES"); do
  # Per-address limit off: all clients come from 127.0.0.x. Rate limit up:
  # the final message is one execute, but nothing here should hit 4008.
  start_node "node$i" "$GW" GATEWAY_JWT_SECRET="$SECRET" \
    GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" GATEWAY_NODE_ID="bench-$i" GATEWAY_LOG=warn \
    GATEWAY_MAX_CONNECTIONS_PER_IP=0 GATEWAY_MAX_CONNECTIONS=$((per_node + 1000)) \
    GATEWAY_RATE_LIMIT_COUNT=1000000 GATEWAY_DEMO=false GATEWAY_WORKER_THREADS="$WORKER_THREADS"
done
REDIS_PID="${PIDS[0]}"

mkdir -p bench/results
SAMPLES="bench/results/$NAME-samples.csv"
# One line every 2 s: seconds, then per node RSS (KiB) and open files,
# Redis used_memory (bytes), the tester's RSS (KiB, all its processes),
# kernel TCP memory (pages) and TCP sockets in use.
sampler() {
  local t0 header line pid rss fds lt_rss tcp
  t0=$(date +%s%N)
  header="t_s"
  for i in $(seq 1 "$NODES"); do header="$header,node${i}_rss_kib,node${i}_fds"; done
  echo "$header,redis_used_memory,redis_rss_kib,loadtest_rss_kib,tcp_mem_pages,tcp_inuse" >"$SAMPLES"
  while :; do
    line="$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
    for pid in "${NODE_PIDS[@]}"; do
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
      line="$line,$rss,$fds"
    done
    line="$line,$(redis-cli -p "$REDIS_PORT" info memory 2>/dev/null | tr -d '\r' | awk -F: '$1 == "used_memory" {print $2}')"
    line="$line,$(awk '/^VmRSS:/ {print $2}' "/proc/$REDIS_PID/status" 2>/dev/null || echo 0)"
    lt_rss=0
    # This run's tester only: /usr/bin/time, its loadtest, the workers.
    local tp="" driver=""
    [ -f "$TMP/lt.pid" ] && tp="$(cat "$TMP/lt.pid")"
    [ -n "$tp" ] && driver="$(pgrep -P "$tp" || true)"
    for pid in $driver $([ -n "$driver" ] && pgrep -P "$driver" || true); do
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      lt_rss=$((lt_rss + ${rss:-0}))
    done
    tcp=$(awk '$1 == "TCP:" {for (i = 2; i < NF; i++) if ($i == "mem") m = $(i + 1); else if ($i == "inuse") u = $(i + 1); print m "," u}' /proc/net/sockstat)
    echo "$line,$lt_rss,$tcp" >>"$SAMPLES"
    sleep 2
  done
}
sampler &
SAMPLER_PID=$!
PIDS+=($SAMPLER_PID)

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_of() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
RSS0="$(for pid in "${NODE_PIDS[@]}"; do rss_of "$pid"; done | paste -sd' ')"
node_cpu() { local out=""; for pid in "${NODE_PIDS[@]}"; do out="$out $(cpu_of "$pid")"; done; echo "$out"; }
CPU0="$(node_cpu)"
RCPU0="$(cpu_of "$REDIS_PID")"
echo "100k: $CLIENTS sessions on $NODES nodes ($per_node each, open-file limit $limit)," \
     "$WORKERS loadtest workers, from $SOURCE_IPS, ramp $RAMP/s, hold ${HOLD_S}s" >&2
rc=0
/usr/bin/time -f "%e %U %S %M" -o "$TMP/lt.time" \
  "$LT" --workers "$WORKERS" connect --clients "$CLIENTS" --ramp-per-s "$RAMP" --hold-s "$HOLD_S" \
    --fanout-at-end --source-ips "$SOURCE_IPS" \
    --urls "$URLS" --jwt-secret "$SECRET" --redis "redis://127.0.0.1:$REDIS_PORT" \
    --json "bench/results/$NAME.json" &
LT_PID=$!
PIDS+=($LT_PID)
echo "$LT_PID" >"$TMP/lt.pid"
wait "$LT_PID" || rc=$?
CPU1="$(node_cpu)"
RCPU1="$(cpu_of "$REDIS_PID")"
redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep '^cmdstat_' >"$TMP/commandstats" || true
kill "$SAMPLER_PID" 2>/dev/null || true
# The tester closed every session (close 1000) as it finished; let the
# nodes finish ending them before stopping them: wait until the default
# channel's member count reaches 0 or stops falling for 5 s (at most
# 120 s). A node does not retry a session end that timed out.
members() { redis-cli -p "$REDIS_PORT" hlen 'gw:{c:general}:members'; }
AT_EXIT="$(members)"
prev=-1; still=0; WAITED=0
while [ "$WAITED" -lt 120 ]; do
  now="$(members)"
  [ "$now" = 0 ] && break
  if [ "$now" = "$prev" ]; then
    still=$((still + 1))
    [ "$still" -ge 5 ] && break
  else
    still=0
  fi
  prev="$now"; sleep 1; WAITED=$((WAITED + 1))
done
# Nodes first, while their Redis is still there (the cleanup stops
# processes in the order they started, Redis first).
for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${NODE_PIDS[@]}"; do
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
# What the sessions left in the default channel once every node has
# stopped: members and presence entries of sessions whose end did not
# reach Redis (0 and 0 when every leave happened).
LEFT="$(redis-cli -p "$REDIS_PORT" hlen 'gw:{c:general}:members') $(redis-cli -p "$REDIS_PORT" zcard 'gw:{c:general}:presence')"
echo "100k: default channel members when the tester exited: $AT_EXIT; after ${WAITED}s and the nodes' stop (members, presence): $LEFT" >&2
# The nodes' warnings and errors, counted by message (session ids and
# timestamps left out), into the report: a node that struggled says so.
for i in $(seq 1 "$NODES"); do
  sed 's/\x1b\[[0-9;]*m//g' "$TMP/node$i.log" | grep -E " (WARN|ERROR) " |
    sed -E 's/^[^ ]+ +//; s/session=[0-9]+/session=N/g' || true
done | sort | uniq -c | sort -rn >"$TMP/node-warnings"
if [ -s "$TMP/node-warnings" ]; then
  echo "100k: warnings and errors in the nodes' logs (all nodes, by message):" >&2
  head -5 "$TMP/node-warnings" >&2
fi
[ -f "bench/results/$NAME.json" ] || { echo "100k: no report (loadtest exit $rc)" >&2; exit "${rc:-1}"; }

python3 - "bench/results/$NAME.json" "$SAMPLES" "$CPU0" "$CPU1" "$RCPU0" "$RCPU1" "$TMP/lt.time" \
  "$NODES" "$WORKERS" "$SOURCE_IPS" "$limit" "$WORKER_THREADS" "$RSS0" "$TMP/commandstats" "$TMP/node-warnings" "$LEFT" "$AT_EXIT" "$WAITED" <<'PY'
import csv, json, os, sys
(path, samples, c0, c1, r0, r1, lt_time, nodes, workers, source_ips, limit, threads, rss0, cmdstats, warns, left,
 at_exit, waited) = sys.argv[1:]
rss0 = [int(x) for x in rss0.split()]
tick = os.sysconf("SC_CLK_TCK")
nodes = int(nodes)
c0 = [int(x) for x in c0.split()]
c1 = [int(x) for x in c1.split()]
rows = list(csv.DictReader(open(samples)))
r = json.load(open(path))
elapsed, user, sys_, maxrss = open(lt_time).read().split()[-4:]
per_node = []
for i in range(nodes):
    rss = [int(row[f"node{i + 1}_rss_kib"] or 0) for row in rows]
    fds = [int(row[f"node{i + 1}_fds"] or 0) for row in rows]
    opened = r["nodes"][i]["sessions_opened"] if i < len(r["nodes"]) else None
    peak, before = max(rss, default=0), rss0[i]
    per_node.append({
        "rss_before_kib": before, "rss_peak_kib": peak, "fds_peak": max(fds, default=0),
        "sessions_opened": opened, "cpu_s": round((c1[i] - c0[i]) / tick, 2),
        "kib_per_session_peak": round((peak - before) / opened, 2) if opened else None,
    })
col = lambda k: [int(row[k] or 0) for row in rows if row.get(k)]
r["bench"] = {
    "nodes": nodes, "workers": int(workers), "source_ips": source_ips, "open_file_limit": int(limit),
    "node_worker_threads": int(threads), "per_node": per_node,
    "node_cpu_s": round((sum(c1) - sum(c0)) / tick, 2),
    "redis_cpu_s": round((int(r1) - int(r0)) / tick, 2),
    "redis_used_memory_peak": max(col("redis_used_memory"), default=None),
    "redis_rss_peak_kib": max(col("redis_rss_kib"), default=None),
    "loadtest_rss_peak_kib": max(col("loadtest_rss_kib"), default=None),
    "loadtest_cpu_s": round(float(user) + float(sys_), 2),
    "tcp_mem_peak_pages": max(col("tcp_mem_pages"), default=None),
    "tcp_inuse_peak": max(col("tcp_inuse"), default=None),
}
# cmdstat_evalsha:calls=26600,usec=…: Redis' commands over the whole run.
stats = {}
for line in open(cmdstats):
    name, _, fields = line.strip().partition(":")
    f = dict(kv.split("=", 1) for kv in fields.split(","))
    stats[name.removeprefix("cmdstat_")] = {"calls": int(f["calls"]), "usec": int(f["usec"])}
r["bench"]["redis_commands"] = dict(sorted(stats.items(), key=lambda kv: -kv[1]["usec"]))
members_left, presence_left = (int(x) for x in left.split())
r["bench"]["default_channel_left"] = {
    "members_at_tester_exit": int(at_exit), "waited_s": int(waited),
    "members": members_left, "presence": presence_left,
}
r["bench"]["node_log_warnings"] = {
    msg: int(n) for n, msg in (line.strip().split(" ", 1) for line in open(warns) if line.strip())
}
json.dump(r, open(path, "w"), indent=2)
for i, n in enumerate(per_node):
    print(f"  node {i + 1} (/proc)        rss {n['rss_before_kib'] / 1024:.1f} -> peak {n['rss_peak_kib'] / 1024:.1f} MiB, "
          f"{n['kib_per_session_peak']} KiB per session over {n['sessions_opened']}, fds peak {n['fds_peak']}, cpu {n['cpu_s']} s")
b = r["bench"]
print(f"  redis                  cpu {b['redis_cpu_s']} s, used_memory peak {b['redis_used_memory_peak'] / 2**20:.1f} MiB")
print(f"  loadtest               cpu {b['loadtest_cpu_s']} s, rss peak {b['loadtest_rss_peak_kib'] / 1024:.1f} MiB (all processes)")
print("  redis commands (by time) " + ", ".join(f"{k} {v['calls']} calls {v['usec'] / 1e6:.1f} s" for k, v in list(b["redis_commands"].items())[:6]))
print(f"  kernel tcp             peak {b['tcp_mem_peak_pages'] * 4 / 1024:.1f} MiB, {b['tcp_inuse_peak']} sockets")
PY
exit "$rc"
