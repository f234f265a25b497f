#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, protocol and
# Redis tests, each Redis test on one Redis and on a Redis Cluster), the
# black-box conformance suite against a single node, against two nodes on
# one Redis and against two nodes on a Redis Cluster, schemathesis against
# the server API, and the Helm chart checks. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Redis tests start their own redis-server processes (and clusters of
# them) on free ports; the TLS test makes its certificates with openssl.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (Debian packages)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}: install them (e.g. 'sudo apt-get install ${missing[*]}')" >&2
    exit 1
  fi
fi

step "cargo test --workspace"
cargo test --workspace --locked

step "conformance suite (independent Python client) against a single node"
cargo build --locked -p gateway-node
bash conformance/run.sh

step "server API: schemathesis against the OpenAPI document (live node, bounded examples)"
bash scripts/api-schemathesis.sh

step "conformance suite against two nodes on one Redis (resume across nodes, drain)"
bash scripts/cluster-conformance.sh

step "conformance suite against two nodes on a Redis Cluster (3 masters + 3 replicas, sharded pub/sub)"
REDIS_MODE=cluster bash scripts/cluster-conformance.sh

step "Helm chart: lint, render, strict schema validation"
bash scripts/check-chart.sh
