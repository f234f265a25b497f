#!/usr/bin/env bash
# CPU per delivery of the gateway beside the floor, in one run
# (docs/BENCHMARKS.md, "CPU per delivery against the floor"):
#
# 1. the floor: target/release/floor writes one pre-built MESSAGE_CREATE
#    frame per write() to CLIENTS loopback sockets at RATE deliveries/s,
#    with a blocking write loop on one thread, then with one tokio task per
#    socket on a current-thread runtime and on two runtime threads (what a
#    node runs by default on this 2-core machine: one per CPU;
#    FLOOR_MODES="blocking tokio:1 tokio:2"), FLOOR_DURATION seconds each
#    (default 10);
#    its writer threads' CPU / deliveries;
# 2. the gateway: two nodes on one Redis (bench/run.sh), one channel of
#    CLIENTS members, PUBLISHERS publishers at RATE / CLIENTS msg/s, sending
#    for each of DURATIONS seconds; ΔCPU / Δdeliveries between the shortest
#    and the longest run (so that connecting and joining cancel out), the
#    nodes' CPU from the report's nodes[].cpu_s;
# 3. with MAX_RATES="R1 R2 …" (msg/s), one gateway run of MAX_DURATION
#    seconds at each, for the highest lossless rate and its p99, and the
#    floor at --rate 0 (as fast as it goes).
#
#   bench/floor.sh [RATE]                     # default 40000 deliveries/s
#   MAX_RATES="100 125 150" bench/floor.sh 40000
#
# Take the machine's benchmark lock around it if others measure too:
# flock /tmp/bench.lock bench/floor.sh. Results: bench/results/TAG-*.json
# (TAG=floor by default; set TAG to keep runs apart).
# Build first: cargo build --release -p gateway-node -p gateway-loadtest.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${1:-40000}"
CLIENTS="${CLIENTS:-2000}"
PUBLISHERS="${PUBLISHERS:-20}"
DURATIONS="${DURATIONS:-10 20}"
FLOOR_DURATION="${FLOOR_DURATION:-10}"
MAX_RATES="${MAX_RATES:-}"
FLOOR_MODES="${FLOOR_MODES:-blocking tokio:1 tokio:2}"
MAX_DURATION="${MAX_DURATION:-10}"
TAG="${TAG:-floor}"
for bin in floor loadtest gateway-node; do
  [ -x "target/release/$bin" ] || { echo "build target/release/$bin first" >&2; exit 2; }
done
mkdir -p bench/results
# Other work on the machine moves every figure here: say how busy it was.
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
MSG_RATE=$(python3 -c "print(round($RATE / $CLIENTS, 6))")

echo "floor: $CLIENTS sockets, $RATE deliveries/s, ${FLOOR_DURATION} s" >&2
FLOOR_FILES=()
for m in $FLOOR_MODES; do
  mode="${m%%:*}"; threads=1
  [ "$mode" = "$m" ] || threads="${m#*:}"
  f="bench/results/$TAG-$mode$([ "$threads" = 1 ] || echo "-t$threads")-r$RATE.json"
  target/release/floor --mode "$mode" --threads "$threads" --sockets "$CLIENTS" --rate "$RATE" \
    --duration-s "$FLOOR_DURATION" >"$f"
  FLOOR_FILES+=("$f")
done

GW_FILES=()
for d in $DURATIONS; do
  name="$TAG-gw-r$RATE-d$d"
  bench/run.sh "$name" rust fanout --clients "$CLIENTS" --channels 1 --publishers "$PUBLISHERS" \
    --rate "$MSG_RATE" --duration-s "$d" >&2
  GW_FILES+=("bench/results/$name.json")
done

MAX_FILES=()
if [ -n "$MAX_RATES" ]; then
  f="bench/results/$TAG-blocking-max.json"
  target/release/floor --mode blocking --sockets "$CLIENTS" --rate 0 --duration-s "$FLOOR_DURATION" >"$f"
  MAX_FILES+=("$f")
  i=0
  for r in $MAX_RATES; do # a rate may repeat: each run has its own file
    i=$((i + 1))
    name="$TAG-gw-max-$i-m$r"
    bench/run.sh "$name" rust fanout --clients "$CLIENTS" --channels 1 --publishers "$PUBLISHERS" \
      --rate "$r" --duration-s "$MAX_DURATION" >&2 || true
    MAX_FILES+=("bench/results/$name.json")
  done
fi

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$RATE" "${FLOOR_FILES[*]}" "${GW_FILES[*]}" "${MAX_FILES[*]}" <<'PY'
import json, sys
rate = float(sys.argv[1])
floors = [json.load(open(f)) for f in sys.argv[2].split()]
gws = [json.load(open(f)) for f in sys.argv[3].split()]
maxes = [json.load(open(f)) for f in sys.argv[4].split()]

def node_cpu(r):  # the nodes' CPU over the run, from loadtest's scrape
    cpus = [n.get("cpu_s") for n in r["nodes"]]
    return sum(cpus) if all(c is not None for c in cpus) else r["bench"]["node_cpu_s"]

print(f"\nCPU per delivery at {rate:.0f} deliveries/s ({floors[0]['sockets']} sockets, frame {floors[0]['frame_bytes']} bytes)\n")
print(f"{'':44} {'deliveries':>10} {'deliv/s':>8} {'CPU s':>6} {'µs/deliv':>8} {'× floor':>7}")
base = floors[0]["us_per_delivery"]
def row(label, deliveries, per_s, cpu, note=""):
    us = cpu / deliveries * 1e6
    print(f"{label:44} {deliveries:>10} {per_s:>8} {cpu:>6.2f} {us:>8.2f} {us / base:>7.2f}" + (f"  {note}" if note else ""))
for f in floors:
    label = f"floor, {f['mode']}" + (f" ({f['threads']} threads)" if f["threads"] > 1 else "")
    row(label, f["deliveries"], f"{f['deliveries_per_s']:.0f}", f["cpu_s"], "" if f["lossless"] else "NOT LOSSLESS")
for r in gws:
    row(f"gateway, 2 nodes, {r['rate']:g} msg/s, {r['traffic_s']:.0f} s, with setup", r["delivered"],
        f"{r['deliveries_per_s']:.0f}", node_cpu(r), f"lost {r['lost']}, p99 {r['latency_ms']['p99']:.1f} ms")
if len(gws) >= 2:
    a, b = gws[0], gws[-1]
    dcpu, dd = node_cpu(b) - node_cpu(a), b["delivered"] - a["delivered"]
    row("gateway, ΔCPU / Δdeliveries", dd, "", dcpu)
    us = dcpu / dd * 1e6
    print(f"\ngoal ≤ 1.2× the {floors[0]['mode']} floor: {'met' if us / base <= 1.2 else 'MISSED'} ({us / base:.2f}×)")
if maxes:
    print(f"\nMaximum throughput, one channel of {gws[0]['clients'] if gws else '?'} members, two nodes")
    for r in maxes:
        if "mode" in r:
            print(f"  floor, {r['mode']}, --rate 0: {r['deliveries_per_s']:.0f} deliveries/s, {r['us_per_delivery']:.2f} µs/delivery")
            continue
        ok = r["lost"] == 0 and r["duplicated"] == 0 and r["out_of_order"] == 0
        print(f"  gateway {r['rate']:g} msg/s: {r['deliveries_per_s']:.0f} deliveries/s, lost {r['lost']}, p50 {r['latency_ms']['p50']:.1f} p99 {r['latency_ms']['p99']:.1f} max {r['latency_ms']['max']:.1f} ms"
              f", {node_cpu(r) / max(r['delivered'], 1) * 1e6:.2f} µs/delivery (with setup)" + ("" if ok else "  NOT LOSSLESS")
              + ("  ← meets ≥ 200k lossless, p99 < 50 ms" if ok and r["deliveries_per_s"] >= 200000 and r["latency_ms"]["p99"] < 50 else ""))
PY
