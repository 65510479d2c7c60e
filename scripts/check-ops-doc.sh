#!/usr/bin/env bash
# Runs docs/operations.md against a local stack: every shell block preceded by `<!-- ops-check -->`
# is extracted and its lines are run in document order against deploy/local-stack.sh's stack
# (coordinator with the file store, 2 CPU workers, Prometheus) on free loopback ports, with
# TRELLIS_ENDPOINT pointing at it. A job with dp=2 and no growth stage is submitted by the
# doc's own `coordctl job submit`; the doc's `grow --factor 4` grows it, and its
# failed-worker section kills a worker process and starts a replacement.
#
#   coordctl / curl lines   run; each must exit 0 (or the code its comment names: "(exit N)")
#   kubectl port-forward    replaced by the local endpoint (TRELLIS_ENDPOINT)
#   kubectl delete pod trellis-worker-<i>   local stand-in: SIGKILL worker process <i>
#   kubectl get pod trellis-worker-<i> -w   local stand-in: start a replacement worker process
#   other kubectl / helm    skipped: not runnable here, needs a cluster
#   docker                  skipped: needs docker and a registry
#   coordctl watch          the last one in the doc runs until the job is done; earlier ones
#                           get a SIGINT (the operator's Ctrl-C) after 3 s, and must exit 0
#
# Bounded (< 2 min), all processes stopped and the run dir removed on success
# (runs/ops-check.*, kept on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=/dev/null
source scripts/env.sh
BIN=${TRELLIS_BIN:-$CARGO_TARGET_DIR/release}
DOC=${DOC:-docs/operations.md}
start=$SECONDS
mkdir -p "$ROOT/runs"
RUN=$(mktemp -d "$ROOT/runs/ops-check.XXXXXX")
mkdir -p "$RUN/work"

# The job: deploy/jobs/demo.toml without its growth stage (the doc grows it by hand), shortened,
# absolute paths, frequent checkpoints so a rollback repeats little work.
JOB=$RUN/ops-demo.toml
python3 - "$ROOT" "$RUN" deploy/jobs/demo.toml >"$JOB" <<'PY'
import re, sys
root, run, src = sys.argv[1:]
text = open(src).read().split("[[growth]]")[0]
text = text.replace('"../../', f'"{root}/')
text = re.sub(r"(?m)^(# G_stack at step.*\n(#.*\n)*)", "", text)
subst = {"name": '"ops-demo"', "max_steps": "150", "eval_interval": "50", "eval_sequences": "8",
         "interval": "25", "dir": f'"{run}/checkpoints"'}
for k, v in subst.items():
    text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
    assert n == 1, k
print(text)
PY
grep -q '^\[\[growth\]\]' "$JOB" && { echo "check-ops-doc: $JOB still has a growth stage" >&2; exit 1; }

# The commands, in document order: "<section>\t<line>" (continuations joined).
python3 - "$DOC" >"$RUN/commands.tsv" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().split("\n")
section, marked, i, n = "?", False, 0, 0
while i < len(lines):
    line = lines[i]
    if line.startswith("## "):
        section = line[3:].strip()
    if line.strip() == "<!-- ops-check -->":
        marked = True
    elif marked and line.startswith("```"):
        if line.strip() != "```sh":
            sys.exit(f"check-ops-doc: an ops-check block must be ```sh (line {i + 1})")
        i += 1
        cmd = ""
        while not lines[i].startswith("```"):
            cmd += lines[i]
            if cmd.endswith("\\"):
                cmd = cmd[:-1] + " "
            else:
                if cmd.strip() and not cmd.lstrip().startswith("#"):
                    print(f"{section}\t{cmd.strip()}")
                    n += 1
                cmd = ""
            i += 1
        marked = False
    elif marked and line.strip():
        sys.exit(f"check-ops-doc: `<!-- ops-check -->` not followed by a ```sh block (line {i + 1})")
    i += 1
if n == 0:
    sys.exit("check-ops-doc: no ops-check blocks found")
PY
last_watch=$(grep -nE $'\tcoordctl( [^|]*)? watch( |$)' "$RUN/commands.tsv" | tail -n 1 | cut -d: -f1)

read -r GRPC_PORT METRICS_PORT PROM_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
export GRPC_PORT METRICS_PORT PROM_PORT
ENDPOINT=http://127.0.0.1:$GRPC_PORT

stack_pid= extra_pids=() PASSED=0
cleanup() {
  local p
  for p in "${extra_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$stack_pid" ]; then kill "$stack_pid" 2>/dev/null || true; wait "$stack_pid" 2>/dev/null || true; fi
  for p in "${extra_pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  done
  [ "$PASSED" = 1 ] && rm -rf "$RUN"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
  echo "check-ops-doc: FAIL: $*; run dir $RUN" >&2
  for f in "$RUN"/logs/*.log "$RUN"/out.txt; do [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 8 "$f" >&2; }; done
  exit 1
}

# The stack, without a job (the doc's `coordctl job submit` submits it).
RUN_DIR=$RUN SUBMIT=0 SCRAPE=5s deploy/local-stack.sh "$JOB" >"$RUN/stack.out" 2>&1 &
stack_pid=$!
for _ in $(seq 1 150); do
  [ -f "$RUN/stack.env" ] && break
  kill -0 "$stack_pid" 2>/dev/null || { cat "$RUN/stack.out" >&2; fail "deploy/local-stack.sh exited"; }
  sleep 0.2
done
[ -f "$RUN/stack.env" ] || fail "the local stack did not start"
# shellcheck source=/dev/null
source "$RUN/stack.env"
read -r -a workers <<<"$WORKER_PIDS"
echo "check-ops-doc: local stack on $ENDPOINT (metrics 127.0.0.1:$METRICS_PORT, Prometheus 127.0.0.1:$PROM_PORT), $(wc -l <"$RUN/commands.tsv") lines from $DOC"

export TRELLIS_ENDPOINT=$ENDPOINT PATH=$BIN:$PATH
cc() { coordctl --timeout 10 "$@"; }
jstatus() { cc --output json status 2>/dev/null || echo '{}'; }
field() { jstatus | jq -r "$1"; }
ran=() skipped=() standins=()
n=0
while IFS=$'\t' read -r section line; do
  n=$((n + 1))
  case "$line" in
    coordctl\ *|curl\ *)
      cmd=$line
      cmd=${cmd//deploy\/jobs\/<spec>.toml/$JOB}
      cmd=${cmd//127.0.0.1:9090/127.0.0.1:$METRICS_PORT}
      cmd=$(sed -E "s#--endpoint +[^ ]+#--endpoint $ENDPOINT#g" <<<"$cmd")
      want=0
      [[ "$line" =~ \(exit\ ([0-9]+)\) ]] && want=${BASH_REMATCH[1]}
      wrap=(timeout 60)
      if [[ "$cmd" =~ ^coordctl(\ [^|]*)?\ watch(\ |$) ]]; then
        if [ "$n" = "$last_watch" ]; then wrap=(timeout 100); else wrap=(timeout --preserve-status -s INT 3); fi
      fi
      echo "  [$section] \$ $line"
      rc=0
      (cd "$RUN/work" && "${wrap[@]}" bash -o pipefail -c "$cmd") >"$RUN/out.txt" 2>&1 || rc=$?
      sed "s/^/      /" "$RUN/out.txt" | tail -n 16
      [ "$rc" = "$want" ] || fail "[$section] '$line' exited $rc, the doc says $want"
      ran+=("$line")
      ;;
    export\ TRELLIS_ENDPOINT=*)
      echo "  [$section] \$ $line   -> TRELLIS_ENDPOINT=$ENDPOINT (local)"
      standins+=("$line -> TRELLIS_ENDPOINT=$ENDPOINT")
      ;;
    kubectl\ *port-forward*)
      echo "  [$section] \$ $line   -> local endpoint $ENDPOINT, metrics 127.0.0.1:$METRICS_PORT"
      standins+=("$line -> local endpoint")
      ;;
    kubectl\ *delete\ pod\ trellis-worker-[0-9]*)
      i=$(sed -E 's/.*delete pod trellis-worker-([0-9]+).*/\1/' <<<"$line")
      # Harness: let the grow from the doc finish first (a worker lost mid-growth is the
      # growth-rollback story, not this one): the growth is done, so the grown model has a
      # restore point to come back to (its growth checkpoint + plan).
      grown='.phase == "training" and .growth == null and (.growth_history | length >= 1 and .[-1].phase == "done")'
      for _ in $(seq 1 300); do
        [ "$(field "$grown")" = true ] && break
        [ "$(field .phase)" = done ] && fail "the job finished before the failed-worker section; raise max_steps"
        sleep 0.2
      done
      [ "$(field "$grown")" = true ] || fail "the growth did not finish"
      step=$(field .step)
      kill -9 "${workers[$i]}"
      echo "  [$section] \$ $line   -> local stand-in: kill -9 worker-$i (pid ${workers[$i]}) at step $step"
      # Harness: the coordinator notices the closed stream (what the next doc lines show).
      for _ in $(seq 1 100); do
        [ "$(field '.phase != "training"')" = true ] && break
        sleep 0.1
      done
      [ "$(field '.phase != "training"')" = true ] || fail "the coordinator did not notice the killed worker"
      standins+=("$line -> kill -9 of worker-$i")
      ;;
    kubectl\ *get\ pod\ trellis-worker-[0-9]*-w*)
      i=$(sed -E 's/.*get pod trellis-worker-([0-9]+).*/\1/' <<<"$line")
      trellis-worker --coordinator "$ENDPOINT" --device cpu >"$RUN/logs/worker-$i-replacement.log" 2>&1 &
      extra_pids+=($!)
      echo "  [$section] \$ $line   -> local stand-in: replacement worker-$i (pid $!)"
      standins+=("$line -> a new worker process")
      ;;
    kubectl\ *|helm\ *)
      echo "  [$section] \$ $line   -> not runnable here: needs a cluster"
      skipped+=("$line   (needs a cluster)")
      ;;
    docker\ *)
      echo "  [$section] \$ $line   -> not runnable here: needs docker and a registry"
      skipped+=("$line   (needs docker and a registry)")
      ;;
    *)
      fail "[$section] '$line': not a command this check knows (coordctl, curl, kubectl, helm, export TRELLIS_ENDPOINT)"
      ;;
  esac
done <"$RUN/commands.tsv"

# The story the doc tells actually happened.
s=$(jstatus)
jq -e '.phase == "done" and .generation >= 1 and .rollbacks >= 1 and .epoch >= 2' <<<"$s" >/dev/null ||
  fail "expected done, generation >= 1, a rollback and a new epoch: $(jq -c '{phase, generation, rollbacks, epoch, step}' <<<"$s")"
echo "check-ops-doc: ran ${#ran[@]} commands, ${#standins[@]} local stand-ins, skipped ${#skipped[@]} (not runnable here):"
for l in "${skipped[@]}"; do echo "    $l"; done
echo "check-ops-doc: PASS in $((SECONDS - start)) s: $(jq -c '{phase, step, generation, layers, epoch, rollbacks}' <<<"$s")"
PASSED=1
