#!/usr/bin/env bash
# Runs each cargo fuzz target (fuzz/) for FUZZ_SECONDS seconds (default 60)
# from its seed corpus, and fails on a crash, a panic, a hang or (but for
# the stateful connection target) a leak.
# The corpus grows in a temporary copy; fuzz/corpus keeps the seeds
# (fuzz/make_seeds.py). A crash leaves its input in
# fuzz/artifacts/<target>/: replay it with `cargo +nightly fuzz run
# <target> <file>`, then add a regression test. Nightly is used for
# fuzzing only.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=3600 scripts/fuzz.sh connection
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_reader connection token)

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain (for cargo fuzz only)"
  rustup toolchain install nightly --profile minimal >/dev/null ||
    { echo "no nightly toolchain and none could be installed: fuzzing SKIPPED" >&2; exit 0; }
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked --quiet
fi

cargo +nightly fuzz build 2>&1 | tail -n 2
for target in "${targets[@]}"; do
  work="$(mktemp -d)"
  cp corpus/"$target"/* "$work"/
  echo "==> fuzzing $target for ${seconds}s"
  # The connection target keeps one node across inputs (its sessions and
  # messages are state, not leaks): LeakSanitizer would scan after each.
  leaks=1
  [ "$target" = connection ] && leaks=0
  if ! cargo +nightly fuzz run "$target" "$work" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -max_len=8192 -detect_leaks="$leaks" \
    -print_final_stats=1 >"$work.log" 2>&1; then
    tail -n 60 "$work.log" >&2
    echo "fuzz target $target failed: its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)|^#[0-9]+.*(DONE|cov:)' "$work.log" | tail -n 4
  rm -rf "$work" "$work.log"
done
