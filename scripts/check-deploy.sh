#!/usr/bin/env bash
# Offline checks of everything under helm/ and deploy/ (run by `make test`):
#   Helm chart   real Helm v4 library (PyPI helm-sdkpy): lint + install into a fake API server,
#                per values file; manifests validated with kubernetes-validate (strict);
#                negative values files must be refused
#   Prometheus   promtool check config / check rules / test rules
#   Grafana      tsc --strict against @grafana/schema; promtool parses every panel query;
#                queries read only metrics listed in docs/metrics.md
# Tools are installed once into ${TRELLIS_CACHE:-~/.cache/trellis}/deploy-tools/, keyed by
# version, never inside the repository. One line per check; exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HELM_SDKPY_VERSION=0.1.32
KUBERNETES_VALIDATE_VERSION=1.31.0   # schemas up to Kubernetes 1.31
KUBE_VERSION=1.31.0
GRAFANA_SCHEMA_VERSION=13.2.3
TYPESCRIPT_VERSION=5.9.3

CACHE=${TRELLIS_CACHE:-$HOME/.cache/trellis}
TOOLS=$CACHE/deploy-tools
WORK=$(mktemp -d "${TMPDIR:-/tmp}/trellis-deploy-check.XXXXXX")
LOG=$WORK/tools.log
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$TOOLS"

passed=0
failed=0
count() {  # count the ok/FAIL lines a checker printed (and pass them through)
  local line fails=0
  while IFS= read -r line; do
    case $line in
      "ok   "*) passed=$((passed + 1)) ;;
      "FAIL "*) failed=$((failed + 1)); fails=$((fails + 1)) ;;
      __rc=*)  # a checker that crashed without saying FAIL still fails
        if [ "${line#__rc=}" != 0 ] && [ "$fails" = 0 ]; then
          failed=$((failed + 1))
          printf 'FAIL %s exited with status %s\n' "${CHECKER:-checker}" "${line#__rc=}"
        fi
        continue ;;
    esac
    printf '%s\n' "$line"
  done
}
# checker NAME CMD...: run a Python checker that prints ok/FAIL lines itself.
checker() {
  CHECKER=$1
  shift
  count < <("$@"; echo "__rc=$?")
}
ok() { count <<<"ok   $*"; }
fail() { count <<<"FAIL $*"; }
# check NAME CMD...: run CMD, one line; on failure its last output lines follow, indented.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    ok "$name"
  else
    fail "$name"
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/       /'
  fi
}

# --- tools -----------------------------------------------------------------------------------
if ! command -v promtool >/dev/null; then
  echo "check-deploy: installing promtool (Debian package prometheus)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus; } >>"$LOG" 2>&1
fi

# helm-sdkpy needs Python >= 3.12. Debian 12 ships 3.11; look for a newer interpreter
# (PATH, then pyenv's versions, as on the project's machines).
find_python() {
  local c
  for c in python3.13 python3.12 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
           /root/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$(command -v "$c" 2>/dev/null)" ] || continue
    # a pyenv shim exists even when that version is not selected: make sure it runs
    if "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

PY=""
if PY312=$(find_python); then
  PYVER=$("$PY312" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  VENV=$TOOLS/py$PYVER-helm-sdkpy$HELM_SDKPY_VERSION-kv$KUBERNETES_VALIDATE_VERSION
  if ! [ -f "$VENV/.complete" ]; then
    echo "check-deploy: installing helm-sdkpy $HELM_SDKPY_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV (once)"
    rm -rf "$VENV"
    if "$PY312" -m venv "$VENV" >>"$LOG" 2>&1 &&
       "$VENV/bin/pip" install -q --disable-pip-version-check \
         "helm-sdkpy==$HELM_SDKPY_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" PyYAML >>"$LOG" 2>&1; then
      touch "$VENV/.complete"
    fi
  fi
  [ -f "$VENV/.complete" ] && PY=$VENV/bin/python
fi

NODE_TOOLS=$TOOLS/npm-grafana-schema$GRAFANA_SCHEMA_VERSION-ts$TYPESCRIPT_VERSION
if command -v npm >/dev/null && ! [ -f "$NODE_TOOLS/.complete" ]; then
  echo "check-deploy: installing @grafana/schema $GRAFANA_SCHEMA_VERSION and typescript $TYPESCRIPT_VERSION into $NODE_TOOLS (once)"
  rm -rf "$NODE_TOOLS"
  mkdir -p "$NODE_TOOLS"
  echo '{"name": "trellis-deploy-tools", "private": true}' >"$NODE_TOOLS/package.json"
  if (cd "$NODE_TOOLS" && npm install --no-audit --no-fund --loglevel=error \
        "@grafana/schema@$GRAFANA_SCHEMA_VERSION" "typescript@$TYPESCRIPT_VERSION") >>"$LOG" 2>&1; then
    touch "$NODE_TOOLS/.complete"
  fi
fi

# --- Prometheus --------------------------------------------------------------------------------
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml

# --- structure, copies, docs -------------------------------------------------------------------
STATIC_PY=${PY:-python3}
checker static_checks.py "$STATIC_PY" scripts/deploy/static_checks.py 2>&1

for f in deploy/local-stack.sh scripts/check-deploy.sh; do
  [ -f "$f" ] && check "bash -n $f" bash -n "$f"
done

# --- Helm chart --------------------------------------------------------------------------------
if [ -z "$PY" ]; then
  fail "helm chart checks — need Python >= 3.12 for helm-sdkpy (none found on PATH or in pyenv; see $LOG)"
else
  checker helm_check.py "$PY" scripts/deploy/helm_check.py --kube-version "$KUBE_VERSION" --work "$WORK/helm" 2>>"$LOG"
  # the PrometheusRule the chart rendered carries the same, valid, rules
  for f in "$WORK"/helm/promrule*.yml; do
    [ -f "$f" ] && check "promtool check rules on the chart's rendered PrometheusRule" promtool check rules "$f"
  done
fi

# --- Grafana -------------------------------------------------------------------------------------
if ! [ -f "$NODE_TOOLS/.complete" ]; then
  fail "Grafana dashboard checks — @grafana/schema/typescript not installed (npm missing or failed; see $LOG)"
else
  checker dashboards_check.py "$STATIC_PY" scripts/deploy/dashboards_check.py --node-modules "$NODE_TOOLS/node_modules" --work "$WORK/dash" 2>&1
fi

echo "check-deploy: $passed passed, $failed failed"
if [ "$failed" -gt 0 ] && [ -s "$LOG" ]; then
  echo "check-deploy: tool output (last lines of $LOG):"
  tail -n 20 "$LOG" | sed 's/^/       /'
fi
[ "$failed" -eq 0 ]
