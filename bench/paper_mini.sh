#!/usr/bin/env bash
# The G_stack paper in miniature (issue #6), trained through Trellis itself.
#
#   bench/paper_mini.sh CORPUS_DIR [--scale smoke|cpu|gpu] [--seeds N] [--only main|all]
#
# Generates one job spec per run (bench/paper_mini.template.toml -> runs/paper-mini/<scale>/specs/),
# trains each with `trellis-worker train` one after another (a run whose summary.json exists is
# skipped; an interrupted run resumes from its last checkpoint), then runs the analysis
# (bench/paper_mini_analyze.py: results.md + val-loss PNGs). See docs/results.md.
#
# Runs (L = target depth, D = token budget, d = small-model tokens):
#   main: baseline  L layers from scratch for D tokens
#         gstack    L/4 layers for d1 tokens, grown x4 with `stack` (fresh AdamW, re-warmup), to D
#   all:  + interpolate, zero, random (operator ablations, otherwise as gstack)
#         + carry     (gstack with optimizer = carry: Adam moments grown, schedule continued)
#         + g2        (L/2 layers grown x2 at d1)
#         + gstack-d2 (gstack grown at d2 instead of d1)
#         + gstack-lr (gstack with the post-growth peak LR equal to the baseline's, not 3e-4)
#         + random-lr, zero-lr (the random / zero operators at that LR too)
# The main pair runs with --seeds N seeds (default 2); ablations with --ablation-seeds M (default 1).
# Growth steps are multiples of the eval interval, so the loss right before growth is measured.
# --specs-only writes the specs and stops. Env overrides: BASE_LR (baseline and small-model peak LR, default 1e-3), GROW_LR (post-growth
# peak LR under reset, default the paper's 3e-4; min LR is a tenth), THREADS, DEVICE.
set -euo pipefail

usage() {
  echo "usage: $0 CORPUS_DIR [--scale smoke|cpu|gpu] [--seeds N] [--only main|all] [--ablation-seeds M] [--specs-only]" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
CORPUS=$1; shift
SCALE=cpu SEEDS=2 ABL_SEEDS=1 ONLY=main SPECS_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --scale) SCALE=${2:?}; shift 2 ;;
    --seeds) SEEDS=${2:?}; shift 2 ;;
    --only) ONLY=${2:?}; shift 2 ;;
    --ablation-seeds) ABL_SEEDS=${2:?}; shift 2 ;;
    --specs-only) SPECS_ONLY=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument '$1'" >&2; usage ;;
  esac
done
[[ -f $CORPUS/train.txt.zst && -f $CORPUS/valid.txt ]] || {
  echo "CORPUS_DIR '$CORPUS' must hold train.txt.zst and valid.txt (a public-domain fiction corpus of ~24M tokens was used for docs/results.md)" >&2
  exit 2
}
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || { echo "--seeds must be a positive integer" >&2; exit 2; }
[[ $ABL_SEEDS =~ ^[1-9][0-9]*$ ]] || { echo "--ablation-seeds must be a positive integer" >&2; exit 2; }
[[ $ONLY == main || $ONLY == all ]] || { echo "--only must be main or all" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CORPUS=$(cd "$CORPUS" && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
WORKER=$CARGO_TARGET_DIR/release/trellis-worker
[[ -x $WORKER ]] || { echo "no $WORKER: run 'make build' first" >&2; exit 2; }

THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
BASE_LR=${BASE_LR:-1e-3}
GROW_LR=${GROW_LR:-3e-4}
VOCAB=4096
# Sizes per scale. STEPS = D / (BATCH * SEQ_LEN); D1/D2 = growth steps (d / tokens per step).
case $SCALE in
  smoke) # tiny 4 x 64 target, D = 164K tokens, d = 20% / 40%: tests the harness in about a minute
    PRESET=tiny HIDDEN=64 FFN=176 HEADS=4 KV_HEADS=2 LAYERS=4 SEQ_LEN=128 BATCH=8
    STEPS=160 D1=32 D2=64 WARMUP=10 GROW_WARMUP=5 EVAL_INTERVAL=16 EVAL_SEQS=32 ;;
  cpu) # 8 x 128 target (2.50M params), D = 1.02M tokens, d = 102K (10%) / 256K (25%)
    PRESET=tiny HIDDEN=128 FFN=344 HEADS=4 KV_HEADS=2 LAYERS=8 SEQ_LEN=128 BATCH=16
    STEPS=500 D1=50 D2=125 WARMUP=10 GROW_WARMUP=10 EVAL_INTERVAL=25 EVAL_SEQS=128 ;;
  gpu) # 12 x 512 target (42.2M params), D = 26.2M tokens (about one epoch), d = 10% / 25%
    PRESET=base HIDDEN=512 FFN=1376 HEADS=8 KV_HEADS=8 LAYERS=12 SEQ_LEN=512 BATCH=64
    STEPS=800 D1=80 D2=200 WARMUP=20 GROW_WARMUP=10 EVAL_INTERVAL=20 EVAL_SEQS=256
    DEVICE=${DEVICE_GPU:-cuda} ;;
  *) echo "--scale must be smoke, cpu or gpu" >&2; exit 2 ;;
esac

OUT=$ROOT/runs/paper-mini/$SCALE
SPECS=$OUT/specs
CACHE=$ROOT/runs/paper-mini/cache   # shared by every run and scale: tokenise once
mkdir -p "$SPECS" "$CACHE"
MIN_LR=$(awk -v x="$BASE_LR" 'BEGIN{printf "%g", x/10}')

# name  small-layers  factor  operator  optimizer  growth-step  post-growth-LR  seeds
#   (factor 0 = no growth)
RUNS=("baseline $LAYERS 0 - - 0 - $SEEDS" "gstack $((LAYERS / 4)) 4 stack reset $D1 $GROW_LR $SEEDS")
if [[ $ONLY == all ]]; then
  RUNS+=(
    "interpolate $((LAYERS / 4)) 4 interpolate reset $D1 $GROW_LR $ABL_SEEDS"
    "zero $((LAYERS / 4)) 4 zero reset $D1 $GROW_LR $ABL_SEEDS"
    "random $((LAYERS / 4)) 4 random reset $D1 $GROW_LR $ABL_SEEDS"
    "carry $((LAYERS / 4)) 4 stack carry $D1 $GROW_LR $ABL_SEEDS"
    "g2 $((LAYERS / 2)) 2 stack reset $D1 $GROW_LR $ABL_SEEDS"
    "gstack-d2 $((LAYERS / 4)) 4 stack reset $D2 $GROW_LR $ABL_SEEDS"
    "gstack-lr $((LAYERS / 4)) 4 stack reset $D1 $BASE_LR $ABL_SEEDS"
    "random-lr $((LAYERS / 4)) 4 random reset $D1 $BASE_LR $ABL_SEEDS"
    "zero-lr $((LAYERS / 4)) 4 zero reset $D1 $BASE_LR $ABL_SEEDS"
  )
fi

write_spec() { # name seed layers factor operator optimizer at_step grow_lr -> spec path
  local name=$1 seed=$2 layers=$3 factor=$4 op=$5 opt=$6 at=$7 glr=$8
  local spec=$SPECS/$name-s$seed.toml
  sed -e "s|@NAME@|pm-$SCALE-$name-s$seed|" -e "s|@SEED@|$seed|" -e "s|@PRESET@|$PRESET|" \
      -e "s|@HIDDEN@|$HIDDEN|" -e "s|@FFN@|$FFN|" -e "s|@HEADS@|$HEADS|" \
      -e "s|@KV_HEADS@|$KV_HEADS|" -e "s|@LAYERS@|$layers|" -e "s|@SEQ_LEN@|$SEQ_LEN|g" \
      -e "s|@CORPUS@|$CORPUS|g" -e "s|@VOCAB@|$VOCAB|" -e "s|@CACHE@|$CACHE|" \
      -e "s|@BATCH@|$BATCH|" -e "s|@STEPS@|$STEPS|" -e "s|@LR@|$BASE_LR|" \
      -e "s|@MIN_LR@|$MIN_LR|" -e "s|@WARMUP@|$WARMUP|" -e "s|@EVAL_INTERVAL@|$EVAL_INTERVAL|" \
      -e "s|@EVAL_SEQS@|$EVAL_SEQS|" -e "s|@THREADS@|$THREADS|" -e "s|@DEVICE@|$DEVICE|" \
      -e "s|@CKPT_INTERVAL@|$((STEPS / 4))|" \
      "$HERE/paper_mini.template.toml" > "$spec.tmp"
  if [[ $factor != 0 ]]; then
    cat >> "$spec.tmp" <<EOF

[[growth]]
at_step = $at
factor = $factor
operator = "$op"
optimizer = "$opt"
lr = $glr
min_lr = $(awk -v x="$glr" 'BEGIN{printf "%g", x/10}')
warmup_steps = $GROW_WARMUP
EOF
  fi
  mv "$spec.tmp" "$spec"
  echo "$spec"
}

echo "paper-mini: scale $SCALE, $SEEDS seed(s), runs: $ONLY; outputs in $OUT"
echo "  target ${LAYERS}x$HIDDEN, seq $SEQ_LEN, batch $BATCH, $STEPS steps = $((STEPS * BATCH * SEQ_LEN)) tokens; growth at steps $D1 / $D2"
TOTAL=0 DONE=0
for seed_i in $(seq 1 $((SEEDS > ABL_SEEDS ? SEEDS : ABL_SEEDS))); do
  seed=$((1000 + seed_i))
  for r in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    name=$1
    [[ $seed_i -le $8 ]] || continue
    spec=$(write_spec "$name" "$seed" "$2" "$3" "$4" "$5" "$6" "$7")
    dir=$OUT/$name-s$seed
    TOTAL=$((TOTAL + 1))
    if [[ $SPECS_ONLY == 1 ]]; then echo "   $spec"; continue; fi
    if [[ -f $dir/summary.json ]]; then
      echo "== $name seed $seed: done already ($dir/summary.json), skipped"
      DONE=$((DONE + 1))
      continue
    fi
    echo "== $name seed $seed -> $dir"
    mkdir -p "$dir"
    start=$(date +%s)
    "$WORKER" train --job "$spec" --out "$dir" > "$dir/train.log" 2>&1 || {
      echo "run $name seed $seed failed; last lines of $dir/train.log:" >&2
      tail -n 20 "$dir/train.log" >&2
      exit 1
    }
    echo "   finished in $(( $(date +%s) - start )) s: $(grep -o '"final_val_loss": [0-9.]*' "$dir/summary.json")"
    DONE=$((DONE + 1))
  done
done
[[ $SPECS_ONLY == 1 ]] && { echo "paper-mini: $TOTAL specs written to $SPECS (--specs-only)"; exit 0; }
echo "paper-mini: $DONE/$TOTAL runs complete; analysing"
"$TRELLIS_PYTHON" -c "import matplotlib" 2>/dev/null || {
  echo "matplotlib missing in $TRELLIS_VENV; installing it there (only this harness needs it)"
  "$TRELLIS_PYTHON" -m pip install -q matplotlib
}
"$TRELLIS_PYTHON" "$HERE/paper_mini_analyze.py" "$OUT"
