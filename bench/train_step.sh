#!/usr/bin/env bash
# Training throughput: trellis-worker (tch) vs PyTorch eager (transformers LlamaForCausalLM,
# sdpa) on the same model, batch, sequence length and threads. Each run reports the tokens/s of
# its median step (robust to a neighbour's burst on a shared VM); runs are interleaved and
# repeated, and the script prints the medians over runs and the ratio to the faster peer.
#   bench/train_step.sh [JOB.toml] [REPEATS] [STEPS] [fp32|bf16]
# fp32: PyTorch's AdamW for-loop and foreach. bf16: trellis-worker --precision bf16 against
# PyTorch under torch.autocast("cpu", bfloat16) with AdamW foreach and fused; also prints each
# side's model FLOP/s ÷ the bf16 matmul peak measured in the same run (bench/matmul_peak.py).
# Also prints CPU seconds per step of each side (steadier than wall time on a shared machine; set
# OMP_WAIT_POLICY=PASSIVE there so idle OpenMP threads of either side do not spin).
set -euo pipefail
cd "$(dirname "$0")/.."
JOB=${1:-bench/job-small.toml}
REPEATS=${2:-5}
STEPS=${3:-20}
PREC=${4:-fp32}
source scripts/env.sh   # venv python first on PATH; MALLOC_* thresholds for both sides
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
cargo build --release -q -p trellis-worker
BIN=$CARGO_TARGET_DIR/release/trellis-worker
OUT=runs/bench
mkdir -p "$OUT"
case $PREC in
  fp32) PEERS=(loop foreach) ;;
  bf16) PEERS=(foreach fused) ;;
  *) echo "bench/train_step.sh: precision '$PREC': use fp32 or bf16" >&2; exit 2 ;;
esac
# Prepare the data (tokenizer, token files) once, outside the timing.
INFO=$("$BIN" bench --job "$JOB" --steps 1 --warmup 0 --out "$OUT" --precision "$PREC" 2>/dev/null)
VOCAB=$(echo "$INFO" | python -c "import json,sys; print(json.load(sys.stdin)['vocab'])")
THREADS=$(echo "$INFO" | python -c "import json,sys; print(json.load(sys.stdin)['threads'])")
echo "job $JOB, $PREC, vocab $VOCAB, $STEPS timed steps after 3 warmup, $REPEATS repeats, $THREADS threads; load: $(cut -d' ' -f1-3 /proc/loadavg)"
tps() { python -c "import json,sys; d=json.load(sys.stdin); print(d['median_step_tokens_per_second'], d['median_step_cpu_seconds'])"; }
rs=(); p0=(); p1=(); peaks=(); rc=(); c0=(); c1=()
for i in $(seq "$REPEATS"); do
  # Rotate the order so no side always runs first (or right after another process).
  order=$(( i % 3 ))
  for k in 0 1 2; do
    case $(( (k + order) % 3 )) in
      0) r=$("$BIN" bench --job "$JOB" --steps "$STEPS" --warmup 3 --out "$OUT" --precision "$PREC" 2>/dev/null)
         read -r x c <<<"$(echo "$r" | tps)"; rs+=("$x"); rc+=("$c") ;;
      1) a=$(python bench/peer_pytorch.py --job "$JOB" --vocab "$VOCAB" --steps "$STEPS" --precision "$PREC" --adamw "${PEERS[0]}")
         read -r x c <<<"$(echo "$a" | tps)"; p0+=("$x"); c0+=("$c") ;;
      2) b=$(python bench/peer_pytorch.py --job "$JOB" --vocab "$VOCAB" --steps "$STEPS" --precision "$PREC" --adamw "${PEERS[1]}")
         read -r x c <<<"$(echo "$b" | tps)"; p1+=("$x"); c1+=("$c") ;;
    esac
  done
  if [ "$PREC" = bf16 ]; then
    peaks+=($(python bench/matmul_peak.py --dtype bf16 --threads "$THREADS" | python -c "import json,sys; print(json.load(sys.stdin)['peak_gflops'])"))
  fi
  printf "repeat %d: trellis %.0f  pytorch(%s) %.0f  pytorch(%s) %.0f tokens/s (median step)\n" \
    "$i" "${rs[-1]}" "${PEERS[0]}" "${p0[-1]}" "${PEERS[1]}" "${p1[-1]}"
done
FLOPS_PER_TOKEN=$(echo "$r" | python -c "import json,sys; print(json.load(sys.stdin)['flops_per_token'])")
python - "$PREC" "${PEERS[0]}" "${PEERS[1]}" "${rs[*]}" "${p0[*]}" "${p1[*]}" "${peaks[*]:-}" "$FLOPS_PER_TOKEN" "${rc[*]}" "${c0[*]}" "${c1[*]}" <<'PY'
import statistics, sys
prec, n0, n1 = sys.argv[1:4]
r, a, b = ([float(x) for x in s.split()] for s in sys.argv[4:7])
peaks = [float(x) for x in sys.argv[7].split()]
fpt = float(sys.argv[8])
cr, ca, cb = (statistics.median([float(x) for x in s.split()]) for s in sys.argv[9:12])
mr, ma, mb = statistics.median(r), statistics.median(a), statistics.median(b)
best, name = max((ma, n0), (mb, n1))
print(f"median tokens/s ({prec}): trellis-worker {mr:.0f}, pytorch eager adamw-{n0} {ma:.0f}, adamw-{n1} {mb:.0f}")
print(f"ratio trellis / best pytorch (adamw-{name}) = {mr / best:.3f}")
print(f"median CPU seconds per step (all threads; steadier than wall time under load): trellis {cr:.3f}, "
      f"adamw-{n0} {ca:.3f}, adamw-{n1} {cb:.3f}; CPU-time ratio best pytorch / trellis = {min(ca, cb) / cr:.3f}")
if peaks:
    peak = statistics.median(peaks)
    print(f"bf16 matmul peak (median of {len(peaks)}): {peak:.0f} GFLOP/s; model FLOPs/token {fpt:.3e} (6N + 12·L·s·h)")
    print(f"model FLOP/s / bf16 peak: trellis {mr * fpt / 1e9 / peak:.1%}, pytorch {best * fpt / 1e9 / peak:.1%}")
PY
