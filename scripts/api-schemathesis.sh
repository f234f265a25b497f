#!/usr/bin/env bash
# Fuzzes the server API of a live node against its OpenAPI document with
# schemathesis (PyPI): a debug node on the in-memory backend with an API
# key, a bounded number of examples per operation, and every check but
# positive_data_acceptance (the API keeps the WebSocket's rules, under
# which 5.0 is not an integer). Fails on any 5xx, any response that does
# not match the document (status, headers, content type, schema), a
# method or a missing key that is not refused as documented.
#
# The virtualenv is cached in target/schemathesis/venv.
#
# Environment:
#   GATEWAY_BIN       the node binary (default target/debug/gateway-node)
#   MAX_EXAMPLES      test cases per operation and phase (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=scripts/lib-processes.sh
source scripts/lib-processes.sh

SCHEMATHESIS_VERSION=4.32.5
VENV="$REPO/target/schemathesis/venv"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

BIN="${GATEWAY_BIN:-$REPO/target/debug/gateway-node}"
[ -x "$BIN" ] || { echo "api-schemathesis: no node binary at $BIN (cargo build -p gateway-node)" >&2; exit 2; }
PORT="$(free_port)"
KEY="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
GATEWAY_LISTEN="127.0.0.1:$PORT" GATEWAY_API_KEYS="$KEY" GATEWAY_LOG=warn \
  "$BIN" serve >"$TMP/node.log" 2>&1 &
PIDS+=($!)

rc=0
(cd "$TMP" && timeout 300 "$VENV/bin/schemathesis" \
  --config-file "$REPO/scripts/schemathesis.toml" run \
  "http://127.0.0.1:$PORT/api/v1/openapi.json" \
  --wait-for-schema 30 \
  -H "Authorization: Bearer $KEY" \
  --max-examples "${MAX_EXAMPLES:-30}" \
  --checks all --exclude-checks positive_data_acceptance \
  --request-timeout 10 \
  --no-color) || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "api-schemathesis: FAILED (exit $rc); last lines of the node's log:" >&2
  tail -n 30 "$TMP/node.log" >&2 || true
fi
exit "$rc"
