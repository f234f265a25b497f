#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, protocol and
# Redis tests, most Redis tests on one Redis and on a Redis Cluster), the
# black-box conformance suite against a single node, the JavaScript client
# (against real nodes, and the chat page in Chromium), schemathesis against
# the server API, the conformance suite against two nodes on one Redis and
# against two nodes on a Redis Cluster, the Prometheus alert rules' unit
# tests, the Helm chart checks, a two-minute soak, and a minute of each
# fuzz target. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# Redis tests start their own redis-server processes (and clusters of
# them) on free ports; the TLS test makes its certificates with openssl;
# the JavaScript client's tests run on Node.js.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# promtool (Debian's prometheus package) checks and tests the alert rules.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# The network fault tests cut links with nftables in network namespaces.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (Debian packages)"
  if can_apt; then
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}: install them (e.g. 'sudo apt-get install ${missing[*]}')" >&2
    exit 1
  fi
fi

# The chat page's browser test drives Debian's Chromium; without it that
# one test is skipped, and says why.
if ! command -v chromium >/dev/null 2>&1; then
  step "installing chromium (Debian package) for the browser test"
  if can_apt; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
      echo "chromium could not be installed from Debian's packages: the browser test will be SKIPPED" >&2
  else
    echo "chromium is missing and this is not root with apt-get: the browser test will be SKIPPED" >&2
  fi
fi

# Without the right to make network namespaces (not root, or a container
# without CAP_NET_ADMIN) the link-cut test skips; say so up front.
probe_ns="gw-probe-$$"
if ip netns add "$probe_ns" 2>/dev/null; then
  ip netns del "$probe_ns"
else
  echo "network namespaces are not permitted here: the Redis link-cut test (faults.rs) will be SKIPPED" >&2
fi

step "cargo test --workspace"
cargo test --workspace --locked

step "conformance suite (independent Python client) against a single node"
cargo build --locked -p gateway-node
bash conformance/run.sh

step "JavaScript client: types, then node --test against real nodes, and the chat page in Chromium"
(
  cd clients/js
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent typecheck
  npm test
)

step "server API: schemathesis against the OpenAPI document (live node, bounded examples)"
bash scripts/api-schemathesis.sh

step "conformance suite against two nodes on one Redis (resume across nodes, drain)"
bash scripts/cluster-conformance.sh

step "conformance suite against two nodes on a Redis Cluster (3 masters + 3 replicas, sharded pub/sub)"
REDIS_MODE=cluster bash scripts/cluster-conformance.sh

step "Prometheus alert rules: promtool check and unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "Helm chart: lint, render, strict schema validation"
bash scripts/check-chart.sh

step "soak: two minutes of churn and fan-out against two nodes on one Redis"
cargo build --locked -p gateway-loadtest
SOAK_OUT=target/soak bash bench/soak.sh 120 ci

step "fuzzing: each cargo fuzz target for ${FUZZ_SECONDS:-60} s (nightly toolchain, for fuzzing only)"
bash scripts/fuzz.sh
