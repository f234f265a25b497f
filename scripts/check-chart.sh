#!/usr/bin/env bash
# Checks the Helm chart helm/gateway without a cluster:
#
#   1. installs helm and kubernetes-validate (scripts/install-chart-tools.sh)
#   2. for every values file helm/ci/*.yaml (default.yaml = the defaults,
#      all-features.yaml = every option on, alternatives.yaml = the other
#      branches):
#        - helm lint --strict (values.schema.json applies)
#        - helm template, once per Kubernetes version in $KUBE_VERSIONS
#        - kubernetes-validate --strict of everything rendered
#        - the ServiceMonitor against helm/ci/schemas/ (see below)
#        - chart invariants (grace period, GATEWAY_* env, probes, ...)
#   3. renders that must FAIL (several nodes without Redis, bad values, ...)
#
# Exits non-zero if anything failed, and ends with "N passed, N failed".
#
# Environment:
#   TOOLS_DIR       where the tools live (default <repo>/.tools)
#   KUBE_VERSIONS   Kubernetes versions to render and validate against.
#                   Default: 1.30.0 (oldest with the `sleep` preStop action,
#                   which the chart uses by default, on by default) and the newest
#                   schema bundled with kubernetes-validate.
#   KEEP_RENDERED   set to a directory to keep the rendered manifests there.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1
export TOOLS_DIR="${TOOLS_DIR:-$REPO_ROOT/.tools}"
CHART="helm/gateway"
CI_DIR="helm/ci"
CRD_SCHEMA_DIR="$CI_DIR/schemas"

if ! bash scripts/install-chart-tools.sh; then
  echo "check-chart: FAILED to install the chart tools" >&2
  exit 1
fi
HELM_BIN="$TOOLS_DIR/bin/helm"
KV_BIN="$TOOLS_DIR/bin/kubernetes-validate"
PY="$TOOLS_DIR/venv/bin/python"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RENDER_DIR="${KEEP_RENDERED:-$WORK/rendered}"
mkdir -p "$RENDER_DIR" "$WORK/home"

# helm with a throwaway HOME: no user config, cache, repos or plugins.
helm() {
  HOME="$WORK/home" XDG_CACHE_HOME="$WORK/home/.cache" \
    XDG_CONFIG_HOME="$WORK/home/.config" XDG_DATA_HOME="$WORK/home/.local/share" \
    "$HELM_BIN" "$@"
}

if [[ -z "${KUBE_VERSIONS:-}" ]]; then
  newest="$("$PY" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
  KUBE_VERSIONS="1.30.0 ${newest}"
fi

PASSED=0
FAILED=0
declare -a RESULTS=()
pass() { PASSED=$((PASSED + 1)); RESULTS+=("PASS  $1"); echo "PASS  $1"; }
fail() {
  FAILED=$((FAILED + 1)); RESULTS+=("FAIL  $1"); echo "FAIL  $1"
  # shellcheck disable=SC2001
  if [[ -n "${2:-}" ]]; then sed 's/^/      | /' <<<"$2"; fi
}

echo "check-chart: helm $(helm version --short), kubernetes-validate $("$KV_BIN" --version), Kubernetes ${KUBE_VERSIONS}"
echo

# ---------------------------------------------------------------------------
# Structural checks on rendered manifests that neither helm nor the
# Kubernetes schemas make: the ServiceMonitor CRD schema, and the chart's
# own invariants. Prints problems, one per line; exit 1 if any.
# ---------------------------------------------------------------------------
cat > "$WORK/chart_checks.py" <<'PY'
import json, sys
import jsonschema, yaml

manifest, crd_dir = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
problems = []

# ServiceMonitor: kubernetes-validate has no schema for CRDs (it only warns
# "Couldn't find schema"), so validate it here against our own strict
# schema of the fields the chart renders.
crd_schemas = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        "servicemonitor-monitoring.coreos.com-v1.json",
}
for d in docs:
    key = (d.get("apiVersion"), d.get("kind"))
    if key in crd_schemas:
        schema = json.load(open(f"{crd_dir}/{crd_schemas[key]}"))
        v = jsonschema.Draft202012Validator(schema)
        for e in v.iter_errors(d):
            path = ".".join(str(p) for p in e.absolute_path)
            problems.append(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")

def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}

# The settings every node must receive (GATEWAY_REDIS_URL only with a
# Redis; exactly one of GATEWAY_JWT_SECRET / GATEWAY_JWT_SECRET_FILE).
required_env = """GATEWAY_NODE_ID GATEWAY_LISTEN GATEWAY_REDIS_CLUSTER GATEWAY_HB_INT_MS
GATEWAY_RESUME_WINDOW_S GATEWAY_REPLAY_BUFFER GATEWAY_RATE_LIMIT_COUNT
GATEWAY_RATE_LIMIT_WINDOW_S GATEWAY_SESSION_STARTS_PER_USER GATEWAY_OUTBOUND_LIMIT GATEWAY_MAX_CONNECTIONS
GATEWAY_MAX_CONNECTIONS_PER_IP GATEWAY_HTTP_HEADER_TIMEOUT_MS GATEWAY_TCP_SEND_BUFFER
GATEWAY_DRAIN_GRACE_S GATEWAY_DEFAULT_CHANNEL GATEWAY_PRESENCE_THRESHOLD
GATEWAY_MAX_CHANNELS GATEWAY_HISTORY_RETAIN GATEWAY_LOG_FORMAT GATEWAY_LOG GATEWAY_REDIS_PUBLISH_BATCH_US
GATEWAY_DIRECT_WRITES GATEWAY_DEMO""".split()

deployments = [d for d in docs if d["kind"] == "Deployment"
               and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"]
if len(deployments) != 1:
    problems.append(f"expected 1 gateway Deployment, found {len(deployments)}")
for dep in deployments:
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "gateway")
    env = env_of(c)
    for name in required_env:
        if name not in env:
            problems.append(f"gateway container lacks env {name}")
    if env.get("GATEWAY_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append("GATEWAY_NODE_ID must come from the pod name (downward API)")
    if ("GATEWAY_JWT_SECRET" in env) == ("GATEWAY_JWT_SECRET_FILE" in env):
        problems.append("exactly one of GATEWAY_JWT_SECRET / GATEWAY_JWT_SECRET_FILE must be set")
    if "GATEWAY_JWT_SECRET" in env and "secretKeyRef" not in env["GATEWAY_JWT_SECRET"].get("valueFrom", {}):
        problems.append("GATEWAY_JWT_SECRET must come from a secretKeyRef")
    if "GATEWAY_API_KEYS" in env and "secretKeyRef" not in env["GATEWAY_API_KEYS"].get("valueFrom", {}):
        problems.append("GATEWAY_API_KEYS must come from a secretKeyRef")
    if "GATEWAY_REDIS_PASSWORD" in env and "secretKeyRef" not in env["GATEWAY_REDIS_PASSWORD"].get("valueFrom", {}):
        problems.append("GATEWAY_REDIS_PASSWORD must come from a secretKeyRef")
    for name, e in env.items():
        if "value" in e and not isinstance(e["value"], str):
            problems.append(f"env {name} value is not a string")
    # Grace period must cover preStop sleep + drain grace.
    drain = int(env["GATEWAY_DRAIN_GRACE_S"]["value"])
    pre = 0
    hook = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        pre = int(hook["sleep"]["seconds"])
    elif "exec" in hook:
        pre = int(hook["exec"]["command"][-1])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= drain + pre:
        problems.append(f"terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {pre}")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("liveness probe must GET /healthz")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readiness probe must GET /readyz")
    sc = c.get("securityContext", {})
    for k, want in (("allowPrivilegeEscalation", False), ("readOnlyRootFilesystem", True), ("runAsNonRoot", True)):
        if sc.get(k) is not want:
            problems.append(f"container securityContext.{k} must be {want}")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("container must drop ALL capabilities")
    ru = dep["spec"]["strategy"].get("rollingUpdate", {})
    if str(ru.get("maxUnavailable")) not in ("0", "0%"):
        problems.append("rolling update maxUnavailable should be 0 (no session-less gap)")
    # Selector must not also match the in-chart Redis.
    if dep["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") != "gateway":
        problems.append("gateway selector must include app.kubernetes.io/component=gateway")

tests = [d for d in docs if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]
for t in tests:
    args = t["spec"]["containers"][0].get("args", [])
    cmd = t["spec"]["containers"][0].get("command", [])
    if cmd != ["loadtest"] or args[:1] != ["smoke"] or "--urls" not in args or "--jwt-secret" not in args:
        problems.append(f"test pod {t['metadata']['name']} must run `loadtest smoke --urls ... --jwt-secret ...`")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY

# ---------------------------------------------------------------------------
# 1. Lint, render and validate every values file.
# ---------------------------------------------------------------------------
shopt -s nullglob
values_files=("$CI_DIR"/*.yaml)
if [[ ${#values_files[@]} -eq 0 ]]; then
  fail "no values files in $CI_DIR"
fi

for values in "${values_files[@]}"; do
  name="$(basename "$values" .yaml)"

  # helm lint renders in "lint mode", where a template `fail` is only an
  # [INFO] line and lint still passes, so look for those lines as well.
  if out="$(helm lint --strict "$CHART" -f "$values" 2>&1)" \
     && ! grep -qE '\[(ERROR|WARNING)\]|\[INFO\] Fail' <<<"$out"; then
    pass "lint      $name"
  else
    fail "lint      $name" "$out"
  fi

  for kv in $KUBE_VERSIONS; do
    rendered="$RENDER_DIR/$name-k$kv.yaml"
    if ! out="$(helm template gw "$CHART" -f "$values" --namespace gateway \
                  --kube-version "$kv" 2>&1 >"$rendered")"; then
      fail "template  $name (k8s $kv)" "$out"
      continue
    fi
    pass "template  $name (k8s $kv)"

    # kubernetes-validate --strict: the Kubernetes OpenAPI schema of that
    # version, rejecting unknown fields. For a kind it has no schema for
    # (every CRD, here the ServiceMonitor) it prints
    # "WARN ... Couldn't find schema for kind ..." and exits 0: there is no
    # option to make that an error or to load a CRD schema. So: accept that
    # warning only for the CRD kinds listed below (they are validated by
    # chart_checks.py against helm/ci/schemas/), and treat any other WARN as
    # a failure, so that a mistyped apiVersion/kind cannot pass unchecked.
    out="$("$KV_BIN" --strict --kubernetes-version "$kv" "$rendered" 2>&1)"
    rc=$?
    unexpected="$(grep -E '^(WARN|ERROR|FATAL)' <<<"$out" \
      | grep -vE "^WARN .*Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 " || true)"
    n_ok="$(grep -c '^INFO .* passed for resource' <<<"$out" || true)"
    if [[ $rc -eq 0 && -z "$unexpected" && "$n_ok" -gt 0 ]]; then
      pass "validate  $name (k8s $kv, $n_ok objects, --strict)"
    else
      fail "validate  $name (k8s $kv)" "rc=$rc${unexpected:+$'\n'$unexpected}"
    fi

    if out="$("$PY" "$WORK/chart_checks.py" "$rendered" "$CRD_SCHEMA_DIR" 2>&1)"; then
      pass "checks    $name (k8s $kv: CRD schemas, chart invariants)"
    else
      fail "checks    $name (k8s $kv)" "$out"
    fi
  done
done

# ---------------------------------------------------------------------------
# 2. Renders that must be refused, with the message a user should see.
# ---------------------------------------------------------------------------
expect_failure() {
  local label="$1" pattern="$2"; shift 2
  local out
  if out="$(helm template gw "$CHART" --namespace gateway "$@" 2>&1)"; then
    fail "refuses   $label" "rendered, but should have failed"
  elif grep -qE -- "$pattern" <<<"$out"; then
    pass "refuses   $label"
  else
    fail "refuses   $label" "failed without the expected message /$pattern/:"$'\n'"$out"
  fi
}
expect_failure "replicaCount=3 without Redis" "needs a shared Redis" --set replicaCount=3
expect_failure "autoscaling without Redis" "needs a shared Redis" --set autoscaling.enabled=true
expect_failure "redis.cluster with in-chart Redis" "needs a Redis Cluster" \
  --set redis.enabled=true --set redis.cluster=true
expect_failure "redis.url and redis.existingSecret" "either redis.url or redis.existingSecret" \
  --set redis.url=redis://r:6379 --set redis.existingSecret=s
expect_failure "jwt.secret shorter than 32 bytes" "jwt.secret must be at least 32 bytes" \
  --set jwt.secret=tooshort
expect_failure "jwt.previousSecretKey without existingSecret" "needs jwt.existingSecret" \
  --set jwt.previousSecretKey=old
expect_failure "jwt.previousSecretKey equal to secretKey" "must differ" \
  --set jwt.existingSecret=s --set jwt.previousSecretKey=jwt-secret
expect_failure "server API on with an ingress path / (Prefix)" "would expose the server API" \
  --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
  --set 'ingress.hosts[0].paths[0].path=/' --set 'ingress.hosts[0].paths[0].pathType=Prefix'
expect_failure "server API on with an ingress path /api (ImplementationSpecific)" "would expose the server API" \
  --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
  --set 'ingress.hosts[0].paths[0].path=/api' --set 'ingress.hosts[0].paths[0].pathType=ImplementationSpecific'
expect_failure "server API on with an ingress path /a (ImplementationSpecific: a string prefix to ingress-nginx)" \
  "would expose the server API" \
  --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
  --set 'ingress.hosts[0].paths[0].path=/a' --set 'ingress.hosts[0].paths[0].pathType=ImplementationSpecific'
expect_failure "server API on with an ingress regex path /(.*) (ImplementationSpecific)" "would expose the server API" \
  --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
  --set 'ingress.hosts[0].paths[0].path=/(.*)' --set 'ingress.hosts[0].paths[0].pathType=ImplementationSpecific'
for path in '/(api|x)/v1/users' '/API/v1/' '/ap.'; do
  expect_failure "server API on with an ingress path $path (ImplementationSpecific, as a regex)" \
    "would expose the server API" \
    --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
    --set "ingress.hosts[0].paths[0].path=$path" --set 'ingress.hosts[0].paths[0].pathType=ImplementationSpecific'
done
expect_failure "server API on with an ingress regex path /API/v1/.+ (case-insensitive to ingress-nginx)" \
  "would expose the server API" \
  --set api.keysSecret=k --set ingress.enabled=true --set 'ingress.hosts[0].host=g' \
  --set 'ingress.hosts[0].paths[0].path=/API/v1/.+' --set 'ingress.hosts[0].paths[0].pathType=ImplementationSpecific'
expect_failure "unknown value key (schema)" "additional propert|unknownKey" --set unknownKey=1
expect_failure "bad log format (schema)" "logFormat" --set gateway.logFormat=xml
expect_failure "PDB with minAvailable and maxUnavailable" "not both" \
  --set podDisruptionBudget.minAvailable=1 --set podDisruptionBudget.maxUnavailable=1
expect_failure "sleep preStop on Kubernetes 1.29 (action alpha, off by default)" "sleep.*lifecycle action" --kube-version 1.29.0
expect_failure "autoscaling with no metric" "needs at least one metric" \
  --set redis.enabled=true --set autoscaling.enabled=true \
  --set autoscaling.targetCPUUtilizationPercentage=null

# ---------------------------------------------------------------------------
# 3. Defaults that matter: the demo page and its development tokens are for
#    trying the gateway on a laptop, so the chart leaves them off.
# ---------------------------------------------------------------------------
# The value the gateway container gets for env variable $1 (helm args after it).
env_value() {
  local name="$1"
  shift
  helm template gw "$CHART" --namespace gateway "$@" 2>&1 |
    grep -A1 -- "- name: $name\$" | sed -n 's/^ *value: //p'
}
demo_env() { env_value GATEWAY_DEMO "$@"; }
if [[ "$(demo_env)" == '"false"' && "$(demo_env --set gateway.demo=true)" == '"true"' ]]; then
  pass "defaults  demo page off unless gateway.demo=true"
else
  fail "defaults  demo page off unless gateway.demo=true" \
    "GATEWAY_DEMO was $(demo_env) by default and $(demo_env --set gateway.demo=true) when asked"
fi

# The API check lets through what does not reach /api/: /gateway as a
# Prefix, a regex for /gateway, /apiary as a Prefix (whole path elements).
api_ok=1
for path_type in "/gateway Prefix" "/gateway(/|$)(.*) ImplementationSpecific" "/gateway ImplementationSpecific" "/apiary Prefix" "/ Exact"; do
  if ! out="$(helm template gw "$CHART" --namespace gateway --set api.keysSecret=k --set ingress.enabled=true \
    --set 'ingress.hosts[0].host=g' --set "ingress.hosts[0].paths[0].path=${path_type% *}" \
    --set "ingress.hosts[0].paths[0].pathType=${path_type##* }" 2>&1)"; then
    api_ok=0
    fail "values    ingress paths that do not reach /api/ render with the server API on" "$path_type: $out"
  fi
done
[[ $api_ok == 1 ]] && pass "values    ingress paths that do not reach /api/ render with the server API on"

# Numbers from a values file reach templates as float64, which Go prints
# as 1e+06 from a million up: the node would refuse "1e+06". Each integer
# setting must render as digits.
big_values="$RENDER_DIR/big-numbers.yaml"
cat >"$big_values" <<'YAML'
gateway:
  maxConnections: 1000000
  tcpSendBuffer: 4194304
  rateLimit:
    count: 1000000
    windowSeconds: 60
  resumeWindowSeconds: 86400
  workerThreads: 16
YAML
big_ok=1
for pair in GATEWAY_MAX_CONNECTIONS=1000000 GATEWAY_TCP_SEND_BUFFER=4194304 \
  GATEWAY_RATE_LIMIT_COUNT=1000000 GATEWAY_RESUME_WINDOW_S=86400 GATEWAY_WORKER_THREADS=16; do
  got="$(env_value "${pair%%=*}" -f "$big_values")"
  if [[ "$got" != "\"${pair#*=}\"" ]]; then
    big_ok=0
    fail "values    integers from a values file render as digits" "${pair%%=*} rendered as $got"
  fi
done
[[ $big_ok == 1 ]] && pass "values    integers from a values file render as digits"

# A cluster that requires iss/aud: the smoke test's tokens carry them.
smoke_args="$(helm template gw "$CHART" --namespace gateway --set jwt.issuer=https://auth.example \
  --set jwt.audience=chat --show-only templates/tests/smoke.yaml 2>&1)"
if grep -q -- '- --jwt-issuer' <<<"$smoke_args" && grep -q -- '- "chat"' <<<"$smoke_args"; then
  pass "values    helm test's tokens carry jwt.issuer and jwt.audience"
else
  fail "values    helm test's tokens carry jwt.issuer and jwt.audience" "$smoke_args"
fi

# Rolling updates: old pods drain one after another (minReadySeconds =
# preStop + drain grace by default); an explicit jwt.secret rolls the pods
# when it changes (checksum annotation).
rendered_default="$(helm template gw "$CHART" --namespace gateway 2>&1)"
rendered_secret="$(helm template gw "$CHART" --namespace gateway \
  --set jwt.secret=0123456789abcdef0123456789abcdef-check 2>&1)"
if grep -q '^  minReadySeconds: 15$' <<<"$rendered_default" &&
  ! grep -q 'checksum/jwt' <<<"$rendered_default" &&
  grep -q 'checksum/jwt: [0-9a-f]\{64\}$' <<<"$rendered_secret"; then
  pass "defaults  minReadySeconds 15; checksum/jwt only with jwt.secret"
else
  fail "defaults  minReadySeconds 15; checksum/jwt only with jwt.secret" \
    "$(grep -E 'minReadySeconds|checksum/jwt' <<<"$rendered_default$rendered_secret")"
fi

# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
echo
echo "================ check-chart summary ================"
printf '%s\n' "${RESULTS[@]}"
echo "-----------------------------------------------------"
if [[ -n "${KEEP_RENDERED:-}" ]]; then echo "rendered manifests kept in $RENDER_DIR"; fi
echo "chart: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
