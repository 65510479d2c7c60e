#!/usr/bin/env bash
# A local Trellis stack on loopback: coordinator (embedded file store) + 2 CPU workers (WORKERS) + a real
# Prometheus (Debian's) scraping the coordinator's /metrics with deploy/prometheus/alerts.yml
# loaded. Everything lives under runs/local-stack/.
#
#   deploy/local-stack.sh [JOB.toml]        run until Ctrl-C
#   deploy/local-stack.sh --check [JOB.toml]  run until Prometheus has scraped training metrics
#                                            (or 180 s pass), print what it saw, stop (exit 0/1)
#
# Needs the release binaries (make build) and promtool/prometheus (scripts/setup.sh installs
# them). Ports: GRPC_PORT (50151), METRICS_PORT (19090), PROM_PORT (19091), all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=/dev/null
source scripts/env.sh

CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
JOB=${1:-${JOB:-deploy/jobs/tiny-cpu.toml}}
[ -f "$JOB" ] || { echo "local-stack: job spec $JOB not found; pass one: deploy/local-stack.sh JOB.toml" >&2; exit 2; }
WORKERS=${WORKERS:-2}
ranks=$(python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb")).get("parallel", {}); print(p.get("dp", 1) * p.get("tp", 1))' "$JOB")
if [ "$ranks" != "$WORKERS" ]; then
  echo "local-stack: warning: $JOB wants $ranks ranks (parallel.dp x tp) and $WORKERS workers start (WORKERS=...); extra workers stay idle, missing ones keep the job waiting" >&2
fi
GRPC_PORT=${GRPC_PORT:-50151}
METRICS_PORT=${METRICS_PORT:-19090}
PROM_PORT=${PROM_PORT:-19091}
BIN=${TRELLIS_BIN:-$CARGO_TARGET_DIR/release}
for b in trellis-coordinator trellis-worker coordctl; do
  [ -x "$BIN/$b" ] || { echo "local-stack: $BIN/$b missing; run 'make build' first" >&2; exit 2; }
done
command -v prometheus >/dev/null || { echo "local-stack: prometheus missing; run scripts/setup.sh (Debian package prometheus)" >&2; exit 2; }

RUN=$ROOT/runs/local-stack
rm -rf "$RUN"
mkdir -p "$RUN/logs" "$RUN/prometheus"
ENDPOINT=http://127.0.0.1:$GRPC_PORT
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# Prometheus config: the scrape job of deploy/prometheus/prometheus.yml, pointed at loopback.
cat >"$RUN/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $ROOT/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: trellis-coordinator
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
YAML
promtool check config "$RUN/prometheus.yml" >/dev/null

echo "local-stack: coordinator on $ENDPOINT, metrics on 127.0.0.1:$METRICS_PORT"
"$BIN/trellis-coordinator" --listen "127.0.0.1:$GRPC_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  --store "file:$RUN/store" >"$RUN/logs/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  "$BIN/coordctl" --endpoint "$ENDPOINT" status >/dev/null 2>&1 && break
  rc=$?; [ "$rc" -ne 3 ] && break   # 3 = unreachable; anything else means it answers
  sleep 0.2
done

for i in $(seq 0 $((WORKERS - 1))); do
  "$BIN/trellis-worker" --coordinator "$ENDPOINT" --device cpu >"$RUN/logs/worker-$i.log" 2>&1 &
  pids+=($!)
done

echo "local-stack: Prometheus on http://127.0.0.1:$PROM_PORT"
prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$RUN/logs/prometheus.log" 2>&1 &
pids+=($!)

"$BIN/coordctl" --endpoint "$ENDPOINT" job submit "$JOB"
echo "local-stack: submitted $JOB; logs in $RUN/logs"

query() {  # instant query -> first value, or empty
  curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true
}

if [ "$CHECK" = 1 ]; then
  deadline=$((SECONDS + 180))
  while [ $SECONDS -lt $deadline ]; do
    up=$(query 'up{job="trellis-coordinator"}')
    step=$(query 'trellis_step{job="trellis-coordinator"}')
    if [ "$up" = 1 ] && [ -n "$step" ] && [ "${step%.*}" -gt 0 ]; then
      echo "local-stack: Prometheus scraped the coordinator: step=$step" \
           "loss=$(query 'trellis_train_loss') tokens/s=$(query 'trellis_tokens_per_second')" \
           "active workers=$(query 'trellis_workers{state="active"}')" \
           "rules loaded=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/rules" | python3 -c 'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')"
      exit 0
    fi
    sleep 3
  done
  echo "local-stack: no training metrics in Prometheus after 180 s (up=$up step=$step); see $RUN/logs" >&2
  exit 1
fi

echo "local-stack: running; try: coordctl --endpoint $ENDPOINT status | coordctl --endpoint $ENDPOINT grow --factor 4"
echo "local-stack: Ctrl-C stops everything"
wait "${pids[0]}"
