#!/usr/bin/env bash
# A local Trellis stack on loopback: coordinator (embedded file store) + 2 CPU workers (WORKERS) + a real
# Prometheus (Debian's) scraping the coordinator's /metrics with deploy/prometheus/alerts.yml
# loaded.
#
#   deploy/local-stack.sh [JOB.toml]          run until Ctrl-C (under runs/local-stack/)
#   deploy/local-stack.sh --check [JOB.toml]  the live dashboard test: run a short job (default: a
#       shortened copy of deploy/jobs/demo.toml, growth included) to completion with Prometheus
#       scraping every second, then evaluate every `targets[].expr` of deploy/grafana/dashboards/*.json
#       through Prometheus' /api/v1/query; exit 1 listing each expression without series.
#       Free loopback ports, own run dir (runs/local-stack-check.*; kept on failure), < 3 min.
#
# Needs the release binaries (make build) and promtool/prometheus (scripts/setup.sh installs
# them). Ports: GRPC_PORT (50151), METRICS_PORT (19090), PROM_PORT (19091), all on 127.0.0.1;
# --check picks free ones unless these are set.
# For scripts that drive the stack themselves (scripts/check-ops-doc.sh): RUN_DIR=DIR uses DIR
# as the run dir (created, never removed), SUBMIT=0 starts the stack without submitting JOB, and
# DIR/stack.env (GRPC_PORT, METRICS_PORT, PROM_PORT, COORDINATOR_PID, PROMETHEUS_PID,
# WORKER_PIDS) appears once everything is started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=/dev/null
source scripts/env.sh

CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
WORKERS=${WORKERS:-2}
BIN=${TRELLIS_BIN:-$CARGO_TARGET_DIR/release}
for b in trellis-coordinator trellis-worker coordctl; do
  [ -x "$BIN/$b" ] || { echo "local-stack: $BIN/$b missing; run 'make build' first" >&2; exit 2; }
done
command -v prometheus >/dev/null || { echo "local-stack: prometheus missing; run scripts/setup.sh (Debian package prometheus)" >&2; exit 2; }

if [ "$CHECK" = 1 ]; then
  mkdir -p "$ROOT/runs"
  RUN=$(mktemp -d "$ROOT/runs/local-stack-check.XXXXXX")
  SCRAPE=1s
  # Free loopback ports, chosen now (all bound at once, so they differ).
  read -r p1 p2 p3 < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
  GRPC_PORT=${GRPC_PORT:-$p1} METRICS_PORT=${METRICS_PORT:-$p2} PROM_PORT=${PROM_PORT:-$p3}
elif [ -n "${RUN_DIR:-}" ]; then
  RUN=$RUN_DIR
  SCRAPE=${SCRAPE:-1s}
  GRPC_PORT=${GRPC_PORT:-50151} METRICS_PORT=${METRICS_PORT:-19090} PROM_PORT=${PROM_PORT:-19091}
else
  RUN=$ROOT/runs/local-stack
  rm -rf "$RUN"
  SCRAPE=5s
  GRPC_PORT=${GRPC_PORT:-50151} METRICS_PORT=${METRICS_PORT:-19090} PROM_PORT=${PROM_PORT:-19091}
fi
mkdir -p "$RUN/logs" "$RUN/prometheus"

if [ "$CHECK" = 1 ] && [ -z "${1:-}" ] && [ -z "${JOB:-}" ]; then
  # demo.toml, shortened: grows x4 at step 40 of 100 (about 30 s on 2 cores), paths absolute.
  JOB=$RUN/demo-short.toml
  sed -e "s#\"\.\./\.\./#\"$ROOT/#" \
      -e "s#^dir = .*#dir = \"$RUN/checkpoints\"#" \
      -e 's#^max_steps = .*#max_steps = 100#' \
      -e 's#^at_step = .*#at_step = 40#' \
      -e 's#^eval_interval = .*#eval_interval = 20#' \
      -e 's#^interval = .*#interval = 30#' \
      deploy/jobs/demo.toml >"$JOB"
else
  JOB=${1:-${JOB:-deploy/jobs/tiny-cpu.toml}}
fi
[ -f "$JOB" ] || { echo "local-stack: job spec $JOB not found; pass one: deploy/local-stack.sh JOB.toml" >&2; exit 2; }
ranks=$(python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb")).get("parallel", {}); print(p.get("dp", 1) * p.get("tp", 1))' "$JOB")
if [ "$ranks" != "$WORKERS" ]; then
  echo "local-stack: warning: $JOB wants $ranks ranks (parallel.dp x tp) and $WORKERS workers start (WORKERS=...); extra workers stay idle, missing ones keep the job waiting" >&2
fi

ENDPOINT=http://127.0.0.1:$GRPC_PORT
METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics
PROM_URL=http://127.0.0.1:$PROM_PORT
pids=()
PASSED=0
cleanup() {
  local p i
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do  # up to 10 s for a clean exit, then SIGKILL
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "$PASSED" = 1 ] && rm -rf "$RUN"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prometheus config: the scrape job of deploy/prometheus/prometheus.yml, pointed at loopback.
cat >"$RUN/prometheus.yml" <<YAML
global:
  scrape_interval: $SCRAPE
  evaluation_interval: $SCRAPE
rule_files:
  - $ROOT/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: trellis-coordinator
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
YAML
promtool check config "$RUN/prometheus.yml" >/dev/null

echo "local-stack: coordinator on $ENDPOINT, metrics on 127.0.0.1:$METRICS_PORT; run dir $RUN"
"$BIN/trellis-coordinator" --listen "127.0.0.1:$GRPC_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  --store "file:$RUN/store" >"$RUN/logs/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  rc=0; "$BIN/coordctl" --endpoint "$ENDPOINT" --timeout 2 status >/dev/null 2>&1 || rc=$?
  [ "$rc" -ne 3 ] && break   # 3 = unreachable; anything else means it answers
  kill -0 "${pids[0]}" 2>/dev/null || { echo "local-stack: coordinator exited; see $RUN/logs/coordinator.log" >&2; tail -n 20 "$RUN/logs/coordinator.log" >&2; exit 1; }
  sleep 0.2
done

echo "local-stack: Prometheus on $PROM_URL (scrape every $SCRAPE)"
prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$RUN/logs/prometheus.log" 2>&1 &
pids+=($!)

worker_pids=()
for i in $(seq 0 $((WORKERS - 1))); do
  "$BIN/trellis-worker" --coordinator "$ENDPOINT" --device cpu >"$RUN/logs/worker-$i.log" 2>&1 &
  pids+=($!)
  worker_pids+=($!)
done

if [ "${SUBMIT:-1}" != 0 ]; then
  "$BIN/coordctl" --endpoint "$ENDPOINT" job submit "$JOB"
  echo "local-stack: submitted $JOB; logs in $RUN/logs"
fi
cat >"$RUN/stack.env.tmp" <<ENV
GRPC_PORT=$GRPC_PORT
METRICS_PORT=$METRICS_PORT
PROM_PORT=$PROM_PORT
COORDINATOR_PID=${pids[0]}
PROMETHEUS_PID=${pids[1]}
WORKER_PIDS="${worker_pids[*]}"
ENV
mv "$RUN/stack.env.tmp" "$RUN/stack.env"

if [ "$CHECK" = 1 ]; then
  start=$SECONDS
  deadline=$((SECONDS + ${CHECK_TIMEOUT:-150}))
  fail() {
    echo "local-stack: FAIL: $*; logs in $RUN/logs" >&2
    for f in "$RUN"/logs/*.log; do echo "--- tail $f" >&2; tail -n 8 "$f" >&2; done
    exit 1
  }
  # 1. The job runs to completion (growth included), read off the coordinator's own /metrics.
  phase=
  while :; do
    m=$(curl -fsS --max-time 2 "$METRICS_URL" 2>/dev/null || true)
    phase=$(sed -n 's/^trellis_job_phase{phase="\([a-z_]*\)"} 1$/\1/p' <<<"$m" | head -n 1)
    [ "$phase" = done ] && break
    [ "$phase" = failed ] && fail "the job failed"
    [ $SECONDS -lt $deadline ] || fail "job not done after $((SECONDS - start)) s (phase=${phase:-?} $(grep -E '^trellis_(step|generation) ' <<<"$m" | tr '\n' ' '))"
    sleep 1
  done
  gen=$(sed -n 's/^trellis_generation \([0-9]*\)$/\1/p' <<<"$m")
  [ "${gen:-0}" -ge 1 ] || fail "the job finished without growing (trellis_generation=${gen:-?})"
  echo "local-stack: job done in $((SECONDS - start)) s: $(grep -E '^trellis_(step|generation|model_layers) ' <<<"$m" | tr '\n' ' ')"
  # 2. Prometheus has scraped the finished job, with a few more samples for rate()/increase().
  while :; do
    n=$(curl -fsS --max-time 2 --get "$PROM_URL/api/v1/query" \
          --data-urlencode 'query=trellis_job_phase{job="trellis-coordinator",phase="done"} == 1' 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' 2>/dev/null || echo 0)
    [ "$n" -ge 1 ] && break
    [ $SECONDS -lt $deadline ] || fail "Prometheus never scraped the finished job"
    sleep 1
  done
  sleep 5
  # 3. Every dashboard expression, with Grafana's variables made concrete, returns series.
  python3 - "$PROM_URL" "127.0.0.1:$METRICS_PORT" "$((SECONDS - start + 30))" deploy/grafana/dashboards/*.json <<'PY'
import json, re, sys, urllib.error, urllib.parse, urllib.request
prom, instance, range_s, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
# Scrape interval 1 s: Grafana's $__rate_interval = max(4 x scrape, $__interval + scrape); a
# little slack over that.
subst = {"__rate_interval": "10s", "__interval": "2s", "__range": f"{range_s}s",
         "__range_s": str(range_s), "instance": instance, "job": "trellis-coordinator"}

def var(m):
    name = m.group(1) or m.group(2)
    if name not in subst:
        raise SystemExit(f"local-stack: unknown Grafana variable ${name}")
    return subst[name]

def exprs(node, where):
    """(title, expr, is_annotation) of every panel target and annotation query."""
    if isinstance(node, dict):
        title = node.get("title", node.get("name", where))
        for t in node.get("targets", []) or []:
            if isinstance(t, dict) and t.get("expr"):
                yield title, t["expr"], False
        t = node.get("target")
        if isinstance(t, dict) and t.get("expr"):
            yield title, t["expr"], True
        for k, v in node.items():
            if k not in ("targets", "target"):
                yield from exprs(v, title)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v, where)

def query(q):
    """Number of series (an error, e.g. a 400 for bad PromQL, is raised)."""
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        r = json.load(urllib.request.urlopen(url, timeout=10))
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"HTTP {err.code}: {err.read().decode(errors='replace').strip()}")
    res = r["data"]["result"]
    return len(res) if isinstance(res, list) else 1

total, ok, empty, notes = 0, 0, [], []
for f in files:
    for title, e, anno in exprs(json.load(open(f)), "?"):
        q = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", var, e)
        where = f"{f.split('/')[-1]}: {'annotation ' if anno else ''}{title}: {q}"
        try:
            n = query(q)
        except Exception as err:
            total += 0 if anno else 1
            empty.append(f"{where}  [{err}]")
            continue
        if anno:
            # Event markers (`... > 0`): empty unless the event just happened; must be valid PromQL.
            notes.append(f"  annotation {'fires' if n else 'quiet'}  {where}")
            continue
        total += 1
        if n == 0:
            empty.append(where)
        else:
            ok += 1
print(f"local-stack: {ok}/{total} dashboard panel expressions return data; "
      f"{len(notes)} annotation queries are valid PromQL", flush=True)
print("\n".join(notes), flush=True)
for line in empty:
    print(f"  NO DATA  {line}", file=sys.stderr)
sys.exit(1 if empty or total == 0 else 0)
PY
  echo "local-stack: PASS in $((SECONDS - start)) s"
  PASSED=1
  exit 0
fi

echo "local-stack: running; try: coordctl --endpoint $ENDPOINT status | coordctl --endpoint $ENDPOINT grow --factor 4"
echo "local-stack: Ctrl-C stops everything"
wait "${pids[0]}"
