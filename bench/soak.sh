#!/usr/bin/env bash
# A soak: churn and fan-out against two gateway nodes on a Redis of its own
# for DURATION seconds, sampling every SOAK_SAMPLE_S (10) seconds each
# node's RSS and open files and Redis' memory into
# bench/results/soak-NAME.csv (SOAK_OUT sets the folder). At the end:
# loadtest's verdict (nothing lost, duplicated or out of order; resumes
# that work) and the drift of each sampled series after warm-up. Loopback only; bounded in time.
#
#   bench/soak.sh DURATION_S [NAME]          # e.g. bench/soak.sh 3600 1h
#
# Binaries: target/release (cargo build --release -p gateway-node -p
# gateway-loadtest) when present, else target/debug; BIN_DIR overrides.
# Drift is "flat" when the median of the last 3 samples is within 5 % of
# the median of the 3 samples right after warm-up (the first fifth of the
# run, at least 60 s). It fails the run when SOAK_CHECK_FLAT=1, the default
# for runs of 10 minutes or more; shorter runs (CI's two minutes) report it
# and check correctness and liveness only.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:?usage: bench/soak.sh DURATION_S [NAME]}"
NAME="${2:-${DURATION}s}"
SAMPLE_S="${SOAK_SAMPLE_S:-10}"
CHECK_FLAT="${SOAK_CHECK_FLAT:-$([ "$DURATION" -ge 600 ] && echo 1 || echo 0)}"
if [ -z "${BIN_DIR:-}" ]; then
  BIN_DIR=target/release
  [ -x "$BIN_DIR/gateway-node" ] && [ -x "$BIN_DIR/loadtest" ] || BIN_DIR=target/debug
fi
for bin in gateway-node loadtest; do
  [ -x "$BIN_DIR/$bin" ] || { echo "build $BIN_DIR/$bin first" >&2; exit 2; }
done

source scripts/lib-processes.sh
start_redis
SECRET=soak-secret-soak-secret-soak-secret-0123
for i in 1 2; do
  start_node "node$i" "$BIN_DIR/gateway-node" GATEWAY_JWT_SECRET="$SECRET" \
    GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" GATEWAY_NODE_ID="soak-$i" \
    GATEWAY_RATE_LIMIT_COUNT=1000000 GATEWAY_LOG=warn GATEWAY_DEMO=false
done

OUT="${SOAK_OUT:-bench/results}"
mkdir -p "$OUT"
CSV="$OUT/soak-$NAME.csv"
echo "t_s,node1_rss_kib,node2_rss_kib,node1_fds,node2_fds,redis_used_memory_b,redis_rss_b" >"$CSV"
sample() {
  local t="$1" row="$1"
  for pid in "${NODE_PIDS[@]}"; do
    row="$row,$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
  done
  for pid in "${NODE_PIDS[@]}"; do
    row="$row,$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)"
  done
  row="$row,$(redis-cli -p "$REDIS_PORT" info memory | tr -d '\r' |
    awk -F: '$1 == "used_memory" { u = $2 } $1 == "used_memory_rss" { r = $2 } END { print u "," r }')"
  echo "$row" >>"$CSV"
}
(
  start=$(date +%s)
  while :; do
    sample $(($(date +%s) - start))
    sleep "$SAMPLE_S"
  done
) &
SAMPLER=$!
PIDS+=($SAMPLER)

# 400 clients in 4 channels (so each channel's Redis log reaches its
# 10,000-event cap within the warm-up), 20 publishers at 200 msg/s in all,
# 5 connection drops a second, each client away up to 1 s, then resuming.
echo "soak: $DURATION s against 2 nodes ($BIN_DIR), samples in $CSV" >&2
rc=0
"$BIN_DIR/loadtest" churn --urls "$URLS" --jwt-secret "$SECRET" \
  --clients 400 --channels 4 --publishers 20 --rate 200 --duration-s "$DURATION" \
  --drops-per-s 5 --down-ms-max 1000 --json "$OUT/soak-$NAME.json" --quiet || rc=$?
kill "$SAMPLER" 2>/dev/null || true
for i in "${!NODE_PIDS[@]}"; do
  if ! kill -0 "${NODE_PIDS[$i]}" 2>/dev/null; then
    echo "node $((i + 1)) died during the soak:" >&2
    tail -n 20 "$TMP/node$((i + 1)).log" >&2
    rc=1
  fi
done

python3 - "$CSV" "$DURATION" "$CHECK_FLAT" "$OUT/soak-$NAME.json" <<'PY' || rc=1
import csv, json, statistics, sys
path, duration, check = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
report = json.load(open(sys.argv[4]))
print(f"  sent {report.get('sent')}, delivered {report.get('delivered')} of {report.get('expected')}, "
      f"lost {report.get('lost')}, duplicated {report.get('duplicated')}, out of order {report.get('out_of_order')}, "
      f"resumes {report.get('resumes')}, resumed:false {report.get('resumed_false')}")
if report.get("lost") or report.get("violations"):
    print(f"  FAILED: lost {report.get('lost')}, violations {report.get('violations')}")
    sys.exit(1)
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(path))]
warm = max(60.0, duration / 5)
after = [r for r in rows if r["t_s"] >= warm]
if len(after) < 6:
    print(f"  drift: too few samples after the {warm:.0f} s warm-up to judge")
    sys.exit(0)
bad = []
for key in rows[0]:
    if key == "t_s":
        continue
    first = statistics.median(r[key] for r in after[:3])
    last = statistics.median(r[key] for r in after[-3:])
    drift = (last - first) / first * 100 if first else 0.0
    peak = max(r[key] for r in after)
    print(f"  {key:22} after warm-up {first:>14,.0f}  end {last:>14,.0f}  drift {drift:+6.1f} %  peak {peak:>14,.0f}")
    if abs(drift) > 5:
        bad.append(key)
if bad and check:
    print(f"  NOT FLAT: {', '.join(bad)} drifted more than 5 % after warm-up")
    sys.exit(1)
print("  flat within 5 % after warm-up" if not bad else f"  drifted (not checked in a run this short): {', '.join(bad)}")
PY
exit "$rc"
