#!/usr/bin/env bash
# Growth latency (issue 6): online G_stack growth vs the offline path, same model, same state.
#
#   bench/growth_latency.sh            (make bench-growth; results in runs/bench-growth/)
#
# ONLINE   coordinator + 1 CPU worker train the small model (LAYERS) to step >= START_STEP, then
#          `coordctl grow --factor FACTOR` is timed from the moment it is issued to the first
#          optimizer step of the grown model (the status step passes the growth step), with the
#          coordinator's per-phase timings (checkpoint, stack, reshard, resume).
# OFFLINE  a second small job, same spec but max_steps = the online growth step S, trains to S
#          and stops with its final checkpoint (the stop is timed: final checkpoint + process
#          teardown); `coordctl checkpoint grow --factor FACTOR` grows it offline (timed); a new
#          coordinator + worker start a new job with `checkpoint.init_from` = the grown
#          checkpoint, timed to its first optimizer step (coordinator start and init_from
#          verification, worker process start, assignment + data load + restore, first step).
#
# Also reported: each path without its first step's own compute (worker-measured, from the
# coordinator's trellis_step_seconds; the same work on both paths and the noisiest part on a
# shared machine), and the time to the *second* grown step. Online, the growth checkpoint of the
# small model is written in the background while the grown model stacks and trains (issue 14);
# the growth commits when it is recorded, and no checkpoint of the grown model is taken. The offline total is the sum of its phases: the
# script's own gaps between them are not counted. Times of status changes come from
# `coordctl watch` (throttled to ~10 updates/s, so each is late by up to ~0.1 s).
# Results: OUT/results.{json,md} (this run) and OUT/history.jsonl (one line per run).
#
# The LR schedule is flat (lr = min_lr, same warmup) so the offline job's state at step S is the
# online job's state at its growth step (the script compares the two checkpoints' hashes).
# Validation is off (eval_interval = 0: no evaluation before the grown model's first step, none
# during the timed part; the offline small job evaluates 1 sequence at its last step).
#
# Env overrides (defaults: 36.4M parameters grown to 142.6M):
#   HIDDEN=1024 FFN=2816 HEADS=16 KV_HEADS=8 LAYERS=3 FACTOR=4 VOCAB=512 SEQ_LEN=64 BATCH=2
#   THREADS=2 START_STEP=3 TIMEOUT=3600 (seconds, per wait) OUT=runs/bench-growth
#   OFFLINE_LAYERS=LAYERS ([model] depth of the new offline job: by default the small job's spec
#   plus init_from; the checkpoint's depth wins either way. With the grown depth the worker first
#   builds and initialises a throwaway 12-layer model that the restore then replaces, which costs
#   seconds on CPU; see docs/benchmarks.md)
#   KEEP_CHECKPOINTS=0 (1: keep the checkpoints under OUT/work/)  BIN_DIR=$CARGO_TARGET_DIR/release
#   RUNS=1 (N > 1: N runs in a row into OUT/run-<i>/, then a per-run table, the medians and the
#   issue 14 targets judged on the medians: OUT/summary.{json,md})
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"

HIDDEN=${HIDDEN:-1024}
FFN=${FFN:-2816}
HEADS=${HEADS:-16}
KV_HEADS=${KV_HEADS:-8}
LAYERS=${LAYERS:-3}
FACTOR=${FACTOR:-4}
VOCAB=${VOCAB:-512}
SEQ_LEN=${SEQ_LEN:-64}
BATCH=${BATCH:-2}
THREADS=${THREADS:-2}
START_STEP=${START_STEP:-3}
TIMEOUT=${TIMEOUT:-3600}
OUT=${OUT:-$ROOT/runs/bench-growth}
GROWN_LAYERS=$((LAYERS * FACTOR))
OFFLINE_LAYERS=${OFFLINE_LAYERS:-$LAYERS}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}
BIN_DIR=${BIN_DIR:-$CARGO_TARGET_DIR/release}
PY=${TRELLIS_PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python3
MAX_STEPS=1000      # of the online job and of the new offline job (never reached)
MIN_PARAMS=100000000

for b in trellis-coordinator trellis-worker coordctl; do
  [[ -x $BIN_DIR/$b ]] || { echo "error: no $BIN_DIR/$b: run 'make build' first" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS=${RUNS:-1}

# RUNS > 1: this script once per run (same binaries, one data cache), then the medians.
if ((RUNS > 1)); then
  for i in $(seq "$RUNS"); do
    printf '[%s] run %d of %d -> %s\n' "$(date +%H:%M:%S)" "$i" "$RUNS" "$OUT/run-$i"
    RUNS=1 OUT="$OUT/run-$i" CACHE="$OUT/data-cache" "$HERE/growth_latency.sh" >"$OUT/run-$i.log" 2>&1 \
      || { tail -n 30 "$OUT/run-$i.log" >&2; echo "error: run $i failed (log: $OUT/run-$i.log)" >&2; exit 1; }
  done
  "$PY" - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
runs = [json.loads((out / f"run-{i}" / "results.json").read_text()) for i in range(1, n + 1)]
step = "  of which the step itself (worker-measured)"
cols = [
    ("online to 1st grown step (s)", lambda r: r["online"]["total_seconds"]),
    ("of which that step (s)", lambda r: r["online"]["phases"][step]),
    ("online without that step (s)", lambda r: r["overhead_without_first_step_compute"]["online"]),
    ("online 2nd grown step (s)", lambda r: r["step_seconds"]["grown_online_second_step"]),
    ("offline total (s)", lambda r: r["offline"]["total_seconds"]),
    ("offline first step (s)", lambda r: r["offline"]["phases"][step]),
    ("offline / online, 1st", lambda r: r["ratio_offline_over_online"]),
    ("offline / online, 2nd", lambda r: r["ratio_to_second_step"]),
    ("growth committed after (s)", lambda r: r["online"]["growth_committed_after_seconds"]),
]
num = lambda v: "n/a" if v is None else f"{v:.2f}"
med = {name: statistics.median([v for v in map(f, runs) if v is not None] or [float("nan")])
       for name, f in cols}
md = [f"# Growth latency: {n} runs, medians", "",
      "| run | load at the end | " + " | ".join(c for c, _ in cols) + " |",
      "|---|---|" + "---:|" * len(cols)]
for i, r in enumerate(runs, 1):
    md.append(f"| {i} | {r['machine']['load']} | " + " | ".join(num(f(r)) for _, f in cols) + " |")
md.append("| **median** | | " + " | ".join(f"**{num(med[c])}**" for c, _ in cols) + " |")
over, r1, r2 = (med["online without that step (s)"], med["offline / online, 1st"],
                med["offline / online, 2nd"])
targets = {
    "online overhead to the first grown step without its compute <= 1.0 s": [over, over <= 1.0],
    "offline / online to the first grown step >= 3": [r1, r1 >= 3.0],
    "offline / online to the second grown step >= 1.5": [r2, r2 >= 1.5],
}
md += ["", "Issue 14 targets, on the medians:", ""]
md += [f"- {k}: **{v:.2f}** ({'met' if ok else 'MISSED'})" for k, (v, ok) in targets.items()]
md.append("")
(out / "summary.json").write_text(json.dumps(
    {"runs": n, "medians": med, "targets": {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()},
     "commits": sorted({r["commit"] for r in runs}), "binaries": runs[0]["binaries"]}, indent=2) + "\n")
(out / "summary.md").write_text("\n".join(md))
print("\n".join(md))
print(f"per run: {out}/run-<i>/results.md; summary: {out}/summary.json, {out}/summary.md")
PY
  exit 0
fi
WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$WORK/bin" "$WORK/specs"
# A snapshot of the binaries: a concurrent rebuild cannot mix versions within one run.
cp "$BIN_DIR/trellis-coordinator" "$BIN_DIR/trellis-worker" "$BIN_DIR/coordctl" "$WORK/bin/"
BIN=$WORK/bin
COORDCTL=$BIN/coordctl
CKPT=$WORK/ckpt
CACHE=${CACHE:-$OUT/data-cache}   # tokenizer + token files, kept between runs (prepared before any timing)
export TRELLIS_LOG_FORMAT=json NO_COLOR=1

# ---------------------------------------------------------------------------------------------
# Processes: every one started here is recorded and ended on exit, by its pid.
# ---------------------------------------------------------------------------------------------
PIDS=()
cleanup() {
  local pid alive=()
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && { kill -TERM "$pid" 2>/dev/null || true; alive+=("$pid"); }
  done
  for _ in $(seq 50); do
    local any=0
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [[ $any == 0 ]] && break
    sleep 0.2
  done
  for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "${WORK:?}/bin"
  if [[ $KEEP_CHECKPOINTS != 1 ]]; then
    rm -rf "$CKPT" "$WORK/grown" "$WORK"/store-*
  fi
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

die() {
  echo >&2
  echo "error: $*" >&2
  local f
  for f in "$WORK"/*.log "$WORK"/*.err; do
    [[ -s $f ]] || continue
    echo "----- tail of $f" >&2
    tail -n 15 "$f" >&2
  done
  exit 1
}

now() { date +%s.%N; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The status watcher: follows `coordctl --output json watch` (one status per change, at most
# ~10/s) and records when each --mark expression first holds; exits 0 once --until holds, 1 on
# --fail, on timeout or when a --pid process dies. `s` is the status; helpers below.
cat >"$WORK/watch.py" <<'PY'
import argparse, json, os, select, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("--coordctl", required=True)
ap.add_argument("--endpoint", required=True)
ap.add_argument("--timeout", type=float, required=True)
ap.add_argument("--what", required=True)
ap.add_argument("--mark", action="append", default=[], help="NAME=EXPR")
ap.add_argument("--until", required=True)
ap.add_argument("--fail", default="s['phase'] == 'failed'")
ap.add_argument("--var", action="append", default=[], help="NAME=INT")
ap.add_argument("--pid", action="append", type=int, default=[])
ap.add_argument("--ready")
ap.add_argument("--metrics", help="host:port of the coordinator's /metrics (worker step seconds)")
ap.add_argument("--out", required=True)
a = ap.parse_args()


def step_metric():
    """(count, sum) of trellis_step_seconds{part="total"}: the worker-measured step times."""
    if not a.metrics:
        return None, None
    import re, urllib.request
    try:
        text = urllib.request.urlopen(f"http://{a.metrics}/metrics", timeout=5).read().decode()
    except OSError:
        return None, None
    got = {}
    for k in ("count", "sum"):
        m = re.search(r'^trellis_step_seconds_%s\{[^}]*part="total"[^}]*\}\s+(\S+)' % k, text, re.M)
        got[k] = float(m.group(1)) if m else None
    return got["count"], got["sum"]


def growth(s, gen):
    """The latest attempt at generation GEN (a rolled-back attempt keeps its entry)."""
    g = s.get("growth")
    if g and g.get("generation") == gen:
        return g
    hist = [g for g in s.get("growth_history") or [] if g.get("generation") == gen]
    return hist[-1] if hist else None


def ckpt(s, reason):
    for c in s.get("checkpoints") or []:
        if c.get("reason") == reason:
            return c
    return None


env = {"growth": growth, "ckpt": ckpt, "any": any, "len": len}
for v in a.var:
    k, x = v.split("=", 1)
    env[k] = int(x)
marks = [m.split("=", 1) for m in a.mark]


def holds(expr, s):
    try:
        return bool(eval(expr, dict(env), {"s": s}))
    except (KeyError, TypeError, IndexError):
        return False


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


deadline = time.time() + a.timeout
seen, steps, last, ready = {}, [], None, False


def finish(code, msg=None):
    with open(a.out, "w") as f:
        json.dump({"marks": seen, "steps": steps, "last": last, "t_end": time.time()}, f)
    if msg:
        print(f"watch: {msg}", file=sys.stderr)
        if last is not None:
            print(f"watch: last status: {json.dumps(last)[:3000]}", file=sys.stderr)
    sys.exit(code)


while True:
    p = subprocess.Popen([a.coordctl, "--endpoint", a.endpoint, "--output", "json", "watch"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        while True:
            if time.time() > deadline:
                finish(1, f"timed out after {a.timeout:.0f} s waiting for {a.what}")
            for pid in a.pid:
                if not alive(pid):
                    finish(1, f"process {pid} exited while waiting for {a.what}")
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if not r:
                continue
            line = p.stdout.readline()
            t = time.time()
            if not line:
                break  # the stream ended (job done, or the coordinator went away): reconnect
            try:
                s = json.loads(line)
            except ValueError:
                continue
            last = s
            if not ready and a.ready:
                open(a.ready, "w").close()
                ready = True
            if not steps or steps[-1][1] != s.get("step"):
                steps.append([t, s.get("step"), s.get("generation"), s.get("phase"), *step_metric()])
            for name, expr in marks:
                if name not in seen and holds(expr, s):
                    seen[name] = {"t": t, "step": s.get("step"), "phase": s.get("phase")}
            if holds(a.fail, s):
                finish(1, f"the job failed while waiting for {a.what}: {s.get('message')}")
            if holds(a.until, s):
                seen.setdefault("until", {"t": t, "step": s.get("step"), "phase": s.get("phase")})
                finish(0)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    time.sleep(0.2)
PY

# watch_fg NAME ENDPOINT WHAT ARGS... (foreground; result in $WORK/NAME.json)
watch_fg() {
  local name=$1 ep=$2 what=$3
  shift 3
  "$PY" "$WORK/watch.py" --coordctl "$COORDCTL" --endpoint "$ep" --timeout "$TIMEOUT" \
    --what "$what" --out "$WORK/$name.json" "$@" 2>>"$WORK/$name.err" || die "$(tail -n 2 "$WORK/$name.err" | head -n 1)"
}
# watch_bg NAME ENDPOINT WHAT ARGS...: the same in the background; returns once it follows the
# stream (WATCH_PID set; `watch_wait NAME` collects it).
WATCH_PID=
watch_bg() {
  local name=$1 ep=$2 what=$3
  shift 3
  rm -f "$WORK/$name.ready"
  "$PY" "$WORK/watch.py" --coordctl "$COORDCTL" --endpoint "$ep" --timeout "$TIMEOUT" \
    --what "$what" --out "$WORK/$name.json" --ready "$WORK/$name.ready" "$@" 2>>"$WORK/$name.err" &
  WATCH_PID=$!
  PIDS+=("$WATCH_PID")
  local deadline=$((SECONDS + 120))
  until [[ -e $WORK/$name.ready ]]; do
    kill -0 "$WATCH_PID" 2>/dev/null || die "the status watcher for $what exited: $(tail -n 2 "$WORK/$name.err" | head -n 1)"
    ((SECONDS < deadline)) || die "the status watcher for $what got no status within 120 s"
    sleep 0.05
  done
}
watch_wait() {
  wait "$WATCH_PID" || die "$(tail -n 2 "$WORK/$1.err" | head -n 1)"
}

# json FILE PYEXPR: evaluate an expression over the JSON in FILE (`d`).
json() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

# start_coordinator NAME SPEC: sets CO_PID, CO_EP and CO_METRICS (host:port); CO_T0/CO_T1 =
# spawn / serving times.
start_coordinator() {
  local name=$1 spec=$2 out=$WORK/coordinator-$1.out
  CO_T0=$(now)
  "$BIN/trellis-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --store "file:$WORK/store-$name" --heartbeat-ttl-secs 120 --job "$spec" \
    >"$out" 2>"$WORK/coordinator-$name.log" &
  CO_PID=$!
  PIDS+=("$CO_PID")
  local deadline=$((SECONDS + TIMEOUT)) line
  until line=$(grep -m1 'trellis-coordinator listening' "$out" 2>/dev/null); do
    kill -0 "$CO_PID" 2>/dev/null || die "coordinator $name exited before serving"
    ((SECONDS < deadline)) || die "coordinator $name did not serve within $TIMEOUT s"
    sleep 0.02
  done
  CO_T1=$(now)
  CO_EP=http://$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' <<<"$line")
  CO_METRICS=$(sed -n 's/.*metrics=\([^ ]*\).*/\1/p' <<<"$line")
}

# start_worker NAME ENDPOINT: sets W_PID, W_T0 (spawn time).
start_worker() {
  W_T0=$(now)
  "$BIN/trellis-worker" --coordinator "$2" --device cpu >"$WORK/worker-$1.log" 2>&1 &
  W_PID=$!
  PIDS+=("$W_PID")
}

# stop PID...: SIGTERM and wait (bounded).
stop() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# write_spec FILE NAME LAYERS MAX_STEPS [EXTRA checkpoint lines]
write_spec() {
  cat >"$1" <<EOF
# bench/growth_latency.sh: $2
[job]
name = "$2"
seed = 7

[model]
preset = "small"
hidden_size = $HIDDEN
intermediate_size = $FFN
num_attention_heads = $HEADS
num_key_value_heads = $KV_HEADS
num_hidden_layers = $3
max_position_embeddings = $SEQ_LEN

[data]
train = "$ROOT/corpus/tiny/train.txt"
valid = "$ROOT/corpus/tiny/valid.txt"
vocab_size = $VOCAB
seq_len = $SEQ_LEN
cache_dir = "$CACHE"

[train]
global_batch = $BATCH
max_steps = $4
lr = 1e-3
min_lr = 1e-3
warmup_steps = 2
eval_interval = 0
eval_sequences = 1
threads = $THREADS
device = "cpu"

[checkpoint]
dir = "$CKPT"
interval = 0
keep = 3
${5:-}

[parallel]
dp = 1
tp = 1
EOF
}

log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); binaries $BIN_DIR"
log "model: hidden $HIDDEN, ffn $FFN, heads $HEADS/$KV_HEADS, vocab $VOCAB; $LAYERS -> $GROWN_LAYERS layers (x$FACTOR); batch $BATCH x seq $SEQ_LEN, $THREADS threads"

# ---------------------------------------------------------------------------------------------
# ONLINE
# ---------------------------------------------------------------------------------------------
SPEC_A=$WORK/specs/online.toml
write_spec "$SPEC_A" growth-online "$LAYERS" "$MAX_STEPS"
log "online: coordinator + worker, training the $LAYERS-layer model to step $START_STEP (data prepared on first use)"
start_coordinator online "$SPEC_A"
EP_A=$CO_EP
MET_A=$CO_METRICS
PID_CA=$CO_PID
start_worker online "$EP_A"
PID_WA=$W_PID
watch_fg warmup "$EP_A" "the online job to reach step $START_STEP" --pid "$PID_WA" --pid "$PID_CA" --metrics "$MET_A" \
  --until "s['phase'] == 'training' and s['step'] >= $START_STEP"
SMALL_PARAMS=$(json "$WORK/warmup.json" "d['last']['parameters']")
log "online: step $(json "$WORK/warmup.json" "d['last']['step']"), $SMALL_PARAMS parameters; growing x$FACTOR"

watch_bg grow "$EP_A" "the first optimizer step of the grown model" --pid "$PID_WA" --pid "$PID_CA" --metrics "$MET_A" \
  --mark "generation=s['generation'] >= 1" \
  --mark "grown_step=s['generation'] >= 1 and s['step'] > growth(s, 1)['at_step']" \
  --mark "grown_step2=s['generation'] >= 1 and s['step'] > growth(s, 1)['at_step'] + 1" \
  --until "s['generation'] >= 1 and s['step'] > growth(s, 1)['at_step'] + 1 and growth(s, 1)['phase'] == 'done'"
T_ISSUE=$(now)
"$COORDCTL" --endpoint "$EP_A" --output json grow --factor "$FACTOR" >"$WORK/grow-answer.json" \
  || die "coordctl grow failed"
T_ANSWER=$(now)
# Keep the growth checkpoint's manifest (written in the background once the grown model's
# first step is done; under load that can take minutes: wait while the watcher does).
m=
for _ in $(seq $((TIMEOUT * 20))); do
  watching=1
  kill -0 "$WATCH_PID" 2>/dev/null || watching=0 # ended: the growth is done (or failed)
  for d in "$CKPT"/growth-online/step-*; do
    [[ $d == *.tmp || $d == *.old ]] && continue
    [[ -f $d/manifest.json ]] && m=$d
  done
  [[ -n $m || $watching == 0 ]] && break
  sleep 0.05
done
if [[ -n $m ]]; then
  cp "$m/manifest.json" "$WORK/online-growth-manifest.json" || true
  cp "$m/trainer_state.json" "$WORK/online-growth-trainer-state.json" || true
fi
watch_wait grow
"$COORDCTL" --endpoint "$EP_A" --output json status >"$WORK/online-status.json" || die "coordctl status failed"
GROW_STEP=$(json "$WORK/online-status.json" "[g for g in d['growth_history'] if g['generation'] == 1][-1]['at_step']")
GROWN_PARAMS=$(json "$WORK/online-status.json" "d['parameters']")
log "online: grown at step $GROW_STEP to $(json "$WORK/online-status.json" "d['layers']") layers, $GROWN_PARAMS parameters"
if ((GROWN_PARAMS < MIN_PARAMS)); then
  log "WARNING: the grown model has $GROWN_PARAMS parameters, below the 100M the issue asks for"
fi
stop "$PID_WA" "$PID_CA"

# ---------------------------------------------------------------------------------------------
# OFFLINE
# ---------------------------------------------------------------------------------------------
SPEC_B=$WORK/specs/offline-small.toml
write_spec "$SPEC_B" growth-offline-small "$LAYERS" "$GROW_STEP"
log "offline: a second small job with max_steps = $GROW_STEP (it stops there with a final checkpoint)"
start_coordinator offline-small "$SPEC_B"
EP_B=$CO_EP
PID_CB=$CO_PID
start_worker offline-small "$EP_B"
PID_WB=$W_PID
watch_fg stop "$EP_B" "the offline small job to finish" --pid "$PID_CB" \
  --mark "last_step=s['step'] >= $GROW_STEP" \
  --until "s['phase'] == 'done'"
# The worker leaves on the coordinator's Stop; then the coordinator is stopped (SIGTERM).
for _ in $(seq 600); do kill -0 "$PID_WB" 2>/dev/null || break; sleep 0.05; done
kill -0 "$PID_WB" 2>/dev/null && die "the offline small job's worker did not exit 30 s after the job ended"
wait "$PID_WB" 2>/dev/null || true
T_WB_EXIT=$(now)
"$COORDCTL" --endpoint "$EP_B" --output json status >"$WORK/offline-small-status.json" || die "coordctl status failed"
stop "$PID_CB"
T_CB_EXIT=$(now)
IN_DIR=$(json "$WORK/offline-small-status.json" "[c for c in d['checkpoints'] if c['reason'] == 'final'][0]['dir']")
log "offline: final checkpoint $IN_DIR; growing it offline"

GROWN_DIR=$WORK/grown/step-$GROW_STEP
mkdir -p "$WORK/grown"
T_OG0=$(now)
"$COORDCTL" --output json checkpoint grow --factor "$FACTOR" "$IN_DIR" "$GROWN_DIR" >"$WORK/offline-grow.json" \
  || die "coordctl checkpoint grow failed"
T_OG1=$(now)

SPEC_C=$WORK/specs/offline-grown.toml
write_spec "$SPEC_C" growth-offline-grown "$OFFLINE_LAYERS" "$MAX_STEPS" "init_from = \"$GROWN_DIR\""
log "offline: a new job from the grown checkpoint (checkpoint.init_from), to its first step"
start_coordinator offline-grown "$SPEC_C"
EP_C=$CO_EP
PID_CC=$CO_PID
T_CC0=$CO_T0
T_CC1=$CO_T1
watch_bg first "$EP_C" "the new job's first optimizer step" --pid "$PID_CC" --metrics "$CO_METRICS" \
  --mark "first_step=s['step'] > $GROW_STEP" \
  --until "s['step'] > $GROW_STEP + 1"
start_worker offline-grown "$EP_C"
PID_WC=$W_PID
T_WC0=$W_T0
watch_wait first
"$COORDCTL" --endpoint "$EP_C" --output json status >"$WORK/offline-grown-status.json" || die "coordctl status failed"
stop "$PID_WC" "$PID_CC"

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
cat >"$WORK/env.json" <<EOF
{"t_issue": $T_ISSUE, "t_answer": $T_ANSWER, "t_wb_exit": $T_WB_EXIT, "t_cb_exit": $T_CB_EXIT,
 "t_og0": $T_OG0, "t_og1": $T_OG1, "t_cc0": $T_CC0, "t_cc1": $T_CC1, "t_wc0": $T_WC0,
 "grow_step": $GROW_STEP, "small_params": $SMALL_PARAMS, "grown_params": $GROWN_PARAMS,
 "hidden": $HIDDEN, "ffn": $FFN, "heads": $HEADS, "kv_heads": $KV_HEADS, "layers": $LAYERS,
 "grown_layers": $GROWN_LAYERS, "offline_layers": $OFFLINE_LAYERS, "factor": $FACTOR,
 "vocab": $VOCAB, "seq_len": $SEQ_LEN, "batch": $BATCH, "threads": $THREADS,
 "start_step": $START_STEP, "cores": $(nproc), "load": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "host": "$(uname -srm)", "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//;s/"//g')",
 "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)",
 "dirty": $(if git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null; then echo false; else echo true; fi),
 "bin_dir": "$BIN_DIR", "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
"$PY" - "$WORK" "$OUT" "$IN_DIR" <<'PY'
import hashlib, json, re, statistics, sys
from datetime import datetime, timezone
from pathlib import Path

work, out, in_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
E = json.loads((work / "env.json").read_text())
ld = lambda n: json.loads((work / n).read_text())
grow, stop, first, warm = ld("grow.json"), ld("stop.json"), ld("first.json"), ld("warmup.json")
online, ogrow = ld("online-status.json"), ld("offline-grow.json")


def log_time(path, needle):
    """The timestamp of the first JSON log line of PATH whose message contains NEEDLE."""
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if needle in str(r.get("message", "")):
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", r["timestamp"])
            t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
            return t.timestamp() + float(m.group(2) or 0)
    raise SystemExit(f"no log line with '{needle}' in {path}")


def step_compute(steps, n):
    """Worker-measured seconds of step N (trellis_step_seconds sum delta over one report)."""
    for prev, cur in zip([None] + steps, steps):
        if cur[1] != n or len(cur) < 6 or cur[4] is None:
            continue
        c0, s0 = (prev[4], prev[5]) if prev and len(prev) >= 6 and prev[4] is not None else (0.0, 0.0)
        if cur[4] == c0 + 1:
            return cur[5] - s0
    return None


def step_seconds(steps, gen=None):
    """Median worker-measured step time over consecutive single-step reports (wall deltas
    when the metrics are missing)."""
    d = []
    for a, b in zip(steps, steps[1:]):
        if b[1] != a[1] + 1 or (gen is not None and (a[2] != gen or b[2] != gen)):
            continue
        c = step_compute(steps, b[1])
        d.append(c if c is not None else b[0] - a[0])
    return statistics.median(d) if d else None


# ---- online
g = [x for x in online["growth_history"] if x["generation"] == 1][-1]
tim = g["timings"]
t_grown = grow["marks"]["grown_step"]["t"]
on_total = t_grown - E["t_issue"]
after_resume = on_total - tim["total_seconds"]
post = grow["marks"]["until"]["t"] - E["t_issue"]  # the growth committed (and 2 grown steps)
c_on = step_compute(grow["steps"], E["grow_step"] + 1)
on_rows = [
    ("grow RPC answered (informational, part of the checkpoint phase)", E["t_answer"] - E["t_issue"], False),
    ("checkpoint of the small model until recorded (snapshot, then written in the background: not on the path to the grown steps)", tim["checkpoint_seconds"], False),
    ("stack (from the Grow, sent with the checkpoint: finishing the step in flight, snapshot, G_stack in memory)", tim["stack_seconds"], True),
    ("reshard (TP unchanged: no-op)", tim["reshard_seconds"], True),
    ("resume (fresh AdamW, schedule)", tim["resume_seconds"], True),
    ("first optimizer step of the grown model + report + watch lag", after_resume, True),
    ("  of which the step itself (worker-measured)", c_on, False),
]
on_sum_coord = tim["total_seconds"]

# ---- offline
t_last = stop["marks"]["last_step"]["t"]
t_done = stop["marks"]["until"]["t"]
stop_ckpt = t_done - t_last
teardown = max(E["t_wb_exit"], E["t_cb_exit"]) - t_done
og = E["t_og1"] - E["t_og0"]
co_start = E["t_cc1"] - E["t_cc0"]
w_log = work / "worker-offline-grown.log"
t_conn = log_time(w_log, "connected to the coordinator")
t_ready = log_time(w_log, "assignment: runner ready")
t_first = first["marks"]["first_step"]["t"]
w_start = t_conn - E["t_wc0"]
w_ready = t_ready - t_conn
w_first = t_first - t_ready
off_rows = [
    ("stop: final checkpoint (step S reached -> job done; incl. a 1-sequence eval)", stop_ckpt, True),
    ("stop: worker and coordinator exit", teardown, True),
    ("offline grow (`coordctl checkpoint grow`, read + write + hashes)", og, True),
    ("new job: coordinator start -> serving (store, submit, init_from verification)", co_start, True),
    ("new job: worker process start -> connected", w_start, True),
    ("new job: assignment -> runner ready (data/tokenizer from cache, model build, restore)", w_ready, True),
    ("new job: first optimizer step + report + watch lag", w_first, True),
    ("  of which the step itself (worker-measured)", None, False),
]
c_off = step_compute(first["steps"], E["grow_step"] + 1)
off_rows[-1] = (off_rows[-1][0], c_off, False)
off_total = sum(v for _, v, c in off_rows if c)
# Without the first step's own compute (the same work on both paths, and the noisiest part on a
# shared machine): what each path adds around it.
on_over = on_total - c_on if c_on is not None else None
off_over = off_total - c_off if c_off is not None else None
wall_span = t_first - t_last

# Same starting state: the online growth checkpoint (its manifest, kept when it was committed)
# and the offline final checkpoint have the same model and optimizer shard hashes.
def shard_hashes(path):
    m = json.loads(Path(path).read_text())
    return {f["path"]: f["sha256"] for f in m["files"] if f["path"].endswith(".safetensors")}

same_state = None
try:
    st = json.loads((work / "online-growth-trainer-state.json").read_text())
    a, b = shard_hashes(work / "online-growth-manifest.json"), shard_hashes(in_dir / "manifest.json")
    if st.get("generation") == 0 and st.get("step") == E["grow_step"]:
        same_state = bool(a) and a == b
except (OSError, ValueError, KeyError):
    same_state = None

small_step = step_seconds(warm["steps"], 0)
grown_step_online = grow["marks"]["grown_step2"]["t"] - grow["marks"]["grown_step"]["t"]
grown_step_offline = first["marks"]["until"]["t"] - first["marks"]["first_step"]["t"]
grown_bytes = sum(f["bytes"] for f in ogrow.get("files", []))
# To the second step: online the growth checkpoint may still be being written (in the background)
# during the first grown steps; offline the grown checkpoint is on disk.
on_to_2 = grow["marks"]["grown_step2"]["t"] - E["t_issue"]
off_to_2 = off_total + grown_step_offline


def ckpt_bytes(manifest):
    try:
        return sum(f["size"] for f in json.loads(Path(manifest).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return None


growth_ckpt_bytes = ckpt_bytes(work / "online-growth-manifest.json")

res = {
    "machine": {k: E[k] for k in ("cores", "load", "host", "cpu")},
    "commit": E["commit"], "dirty_tree": E["dirty"], "binaries": E["bin_dir"], "date": E["date"],
    "model": {"hidden": E["hidden"], "ffn": E["ffn"], "heads": E["heads"], "kv_heads": E["kv_heads"],
              "vocab": E["vocab"], "layers": E["layers"], "grown_layers": E["grown_layers"],
              "factor": E["factor"], "small_parameters": E["small_params"],
              "grown_parameters": E["grown_params"], "offline_job_model_layers": E["offline_layers"]},
    "train": {"global_batch": E["batch"], "seq_len": E["seq_len"], "threads": E["threads"],
              "growth_step": E["grow_step"]},
    "online": {"phases": {n: v for n, v, _ in on_rows}, "coordinator_timings": tim,
               "total_seconds": on_total,
               "growth_committed_after_seconds": post,
               "to_second_grown_step_seconds": on_to_2,
               "growth_checkpoint_bytes": growth_ckpt_bytes},
    "offline": {"phases": {n: v for n, v, _ in off_rows}, "total_seconds": off_total,
                "wall_seconds_step_S_to_first_step": wall_span,
                "to_second_step_seconds": off_to_2,
                "grown_checkpoint_bytes": grown_bytes},
    "ratio_offline_over_online": off_total / on_total,
    "ratio_to_second_step": off_to_2 / on_to_2,
    "overhead_without_first_step_compute": {
        "online": on_over, "offline": off_over,
        "ratio": off_over / on_over if on_over and off_over is not None else None},
    "same_starting_state": same_state,
    "step_seconds": {"small_median": small_step, "grown_online_second_step": grown_step_online,
                     "grown_offline_second_step": grown_step_offline},
}
(out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
with open(out / "history.jsonl", "a") as f:  # one line per run, kept across runs
    f.write(json.dumps(res) + "\n")

M = res["model"]
md = [
    "# Growth latency: online vs offline",
    "",
    f"{E['date']}, commit {E['commit']}{' (working tree dirty)' if E['dirty'] else ''}, binaries {E['bin_dir']}; {E['cores']} cores ({E['cpu']}), CPU only, load {E['load']} at the end.",
    f"Model: hidden {M['hidden']}, FFN {M['ffn']}, {M['heads']} heads / {M['kv_heads']} KV heads, vocab {M['vocab']}; "
    f"{M['layers']} layers ({M['small_parameters']:,} parameters) grown x{M['factor']} (stack, optimizer reset) to "
    f"{M['grown_layers']} layers ({M['grown_parameters']:,} parameters) at step {E['grow_step']}; "
    f"global batch {E['batch']} x seq {E['seq_len']}, {E['threads']} threads, 1 worker; "
    f"the new offline job's [model] says {M['offline_job_model_layers']} layers.",
    "",
    "| path | phase | seconds |",
    "|---|---|---:|",
]
f2 = lambda v: "n/a" if v is None else f"{v:.2f}"
for n, v, c in on_rows:
    md.append(f"| online | {n} | {f2(v)} |")
md.append(f"| online | **total: `coordctl grow` issued -> first grown step** | **{on_total:.2f}** |")
md.append(f"| online | (growth committed: its checkpoint recorded, and two grown steps taken) | +{post:.2f} |")
for n, v, c in off_rows:
    md.append(f"| offline | {n} | {f2(v)} |")
md.append(f"| offline | **total (sum of the phases)** | **{off_total:.2f}** |")
md.append(f"| online | to the second grown step | {on_to_2:.2f} |")
md.append(f"| offline | to the second step (total + one step) | {off_to_2:.2f} |")
md.append(f"| online | total without the first step's own compute | {f2(on_over)} |")
md.append(f"| offline | total without the first step's own compute | {f2(off_over)} |")
mb = lambda b: f"{b / 1e6:.0f} MB" if b else "n/a"
md += [
    "",
    f"**offline / online = {off_total / on_total:.2f}** to the first grown step; "
    f"{off_to_2 / on_to_2:.2f} to the second; "
    f"{f2(res['overhead_without_first_step_compute']['ratio'])} without the first step's compute.",
    "",
    f"Issue 14 targets: online overhead to the first grown step without that step's compute "
    f"**{f2(on_over)} s** (target <= 1.0); offline / online **{off_total / on_total:.2f}** to the first "
    f"grown step (target >= 3) and **{off_to_2 / on_to_2:.2f}** to the second (target >= 1.5).",
    "",
    f"Checkpoints: online growth (small model + Adam moments, written in the background) "
    f"{mb(growth_ckpt_bytes)}, offline grown (weights only, reset) {mb(grown_bytes)}; no checkpoint of "
    f"the grown model online (its restore point is the growth checkpoint + the plan).",
    "",
    (f"Step times: small model {small_step:.2f} s (median)" if small_step else "Step times: small model n/a")
    + f"; grown model, second step {grown_step_online:.2f} s online, "
    f"{grown_step_offline:.2f} s offline. "
    f"Same starting state (online growth checkpoint == offline final checkpoint, by file hashes): {same_state}.",
    "",
]
(out / "results.md").write_text("\n".join(md))
print("\n".join(md))
print(f"results: {out / 'results.json'}, {out / 'results.md'} (every run: {out / 'history.jsonl'})")
PY
