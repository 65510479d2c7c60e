#!/usr/bin/env bash
# Training throughput: trellis-worker (tch) vs PyTorch eager (transformers LlamaForCausalLM,
# sdpa) on the same model, batch, sequence length and threads. Each run reports the tokens/s of
# its median step (robust to a neighbour's burst on a shared VM); runs are interleaved and
# repeated, and the script prints the medians over runs and the ratio.
#   bench/train_step.sh [JOB.toml] [REPEATS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
JOB=${1:-bench/job-small.toml}
REPEATS=${2:-5}
STEPS=${3:-20}
source scripts/env.sh   # venv python first on PATH; MALLOC_* thresholds for both sides
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
cargo build --release -q -p trellis-worker
BIN=$CARGO_TARGET_DIR/release/trellis-worker
OUT=runs/bench
mkdir -p "$OUT"
# Prepare the data (tokenizer, token files) once, outside the timing.
VOCAB=$("$BIN" bench --job "$JOB" --steps 1 --warmup 0 --out "$OUT" 2>/dev/null \
  | python -c "import json,sys; print(json.load(sys.stdin)['vocab'])")
echo "job $JOB, vocab $VOCAB, $STEPS timed steps after 3 warmup, $REPEATS repeats, threads from the job"
rs=(); pf=(); pn=()
for i in $(seq "$REPEATS"); do
  r=$("$BIN" bench --job "$JOB" --steps "$STEPS" --warmup 3 --out "$OUT" 2>/dev/null)
  a=$(python bench/peer_pytorch.py --job "$JOB" --vocab "$VOCAB" --steps "$STEPS" --foreach on)
  b=$(python bench/peer_pytorch.py --job "$JOB" --vocab "$VOCAB" --steps "$STEPS" --foreach off)
  rs+=($(echo "$r" | python -c "import json,sys; print(json.load(sys.stdin)['median_step_tokens_per_second'])"))
  pf+=($(echo "$a" | python -c "import json,sys; print(json.load(sys.stdin)['median_step_tokens_per_second'])"))
  pn+=($(echo "$b" | python -c "import json,sys; print(json.load(sys.stdin)['median_step_tokens_per_second'])"))
  printf "repeat %d: trellis %.0f  pytorch(foreach) %.0f  pytorch(for-loop) %.0f tokens/s (median step)\n" "$i" "${rs[-1]}" "${pf[-1]}" "${pn[-1]}"
done
python - "${rs[*]}" "${pf[*]}" "${pn[*]}" <<'PY'
import statistics, sys
r, f, n = ([float(x) for x in s.split()] for s in sys.argv[1:4])
mr, mf, mn = statistics.median(r), statistics.median(f), statistics.median(n)
best = max(mf, mn)
print(f"median tokens/s: trellis-worker {mr:.0f}, pytorch eager foreach {mf:.0f}, for-loop {mn:.0f}")
print(f"ratio trellis / best pytorch = {mr / best:.3f}")
PY
