#!/usr/bin/env bash
# make gpu-check: everything Trellis has only ever run on a CPU, run once on a CUDA GPU
# (docs/precision.md §GPU). One prepared script for a lent GPU machine (one H100/H200, PyTorch
# 2.11 in a venv, no network): it needs this working tree and the binaries built on the
# development machine (trellis-worker and the gpu_check example; no cargo on the GPU machine).
#   scripts/gpu-check.sh [RESULTS_FILE]     (default runs/gpu-check/results.txt)
# Binaries: $TRELLIS_BIN_DIR, else runs/gpu-check/bin (scripts/gpu-check.sh --stage copies them
# there), else $CARGO_TARGET_DIR/release. Python: $TRELLIS_PYTHON, else the setup.sh venv, else
# python3 on PATH.
#  1. CUDA forward/backward of a tiny LLaMA against CPU fp32 (fp32: 1e-4 relative; bf16: loss
#     2e-2 relative, gradients 1e-1 relative to the largest magnitude)
#  2. NCCL all-reduce and broadcast on CUDA tensors, world size 1
#  3. a bf16 training run on CUDA with one growth (2 -> 4 layers, stack) through trellis-worker
#  4. MFU of the `1b` preset in bf16: trellis-worker bench next to PyTorch eager autocast (same
#     model, batch, sequence; AdamW fused), and the measured bf16 matmul peak of the GPU
# Without a CUDA GPU it stops at once with one line (exit 2). Under 8 minutes on one H100.
# TRELLIS_GPU_CHECK_DEVICE=cpu: a dry run of the script itself on a CPU (checks 1 and 2 skipped,
# 3 on the CPU, 4 with the `small` preset on the CPU); its results say DRY RUN and mean nothing
# about a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = "--stage" ]; then
  # On the development machine: build and copy the binaries into runs/gpu-check/bin.
  source scripts/env.sh
  cargo build --release --locked -q -p trellis-worker --bin trellis-worker --example gpu_check
  mkdir -p runs/gpu-check/bin
  cp "$CARGO_TARGET_DIR/release/trellis-worker" "$CARGO_TARGET_DIR/release/examples/gpu_check" runs/gpu-check/bin/
  echo "staged runs/gpu-check/bin (carry it to the GPU machine with the working tree)"
  exit 0
fi
OUT=${1:-runs/gpu-check/results.txt}
VENV_PY=${TRELLIS_CACHE:-$HOME/.cache/trellis}/venv-torch2.11.0/bin/python
[ -x "$VENV_PY" ] || VENV_PY=$(command -v python3 || true)
PY=${TRELLIS_PYTHON:-$VENV_PY}
fail() { echo "gpu-check: $*" >&2; exit 2; }
[ -n "$PY" ] || fail "no python3 on PATH; set TRELLIS_PYTHON to a python with torch 2.11"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null) \
  || fail "$PY cannot import torch; set TRELLIS_PYTHON to a python with torch 2.11"
DEV=${TRELLIS_GPU_CHECK_DEVICE:-cuda}
case $DEV in
  cuda) [ -n "$GPU" ] || fail "no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU machine" ;;
  cpu) GPU="DRY RUN on the CPU (TRELLIS_GPU_CHECK_DEVICE=cpu): no GPU figures" ;;
  *) fail "TRELLIS_GPU_CHECK_DEVICE=$DEV: use cuda (default) or cpu (a dry run of this script)" ;;
esac
TORCH_LIB=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
BIN=${TRELLIS_BIN_DIR:-}
for d in "$BIN" runs/gpu-check/bin "${CARGO_TARGET_DIR:-/nonexistent}/release"; do
  if [ -n "$d" ] && [ -x "$d/trellis-worker" ] && { [ -x "$d/gpu_check" ] || [ -x "$d/examples/gpu_check" ]; }; then BIN=$d; break; fi
done
[ -x "$BIN/trellis-worker" ] || fail "no trellis-worker binary: run scripts/gpu-check.sh --stage on the build machine or set TRELLIS_BIN_DIR"
CHECK=$BIN/gpu_check; [ -x "$CHECK" ] || CHECK=$BIN/examples/gpu_check
# libtorch of this machine's torch; cudarc wants libnccl.so, pip ships libnccl.so.2.
LINKS=$(mktemp -d)
NCCL=$(ls "$TORCH_LIB"/../../nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -n1 || true)
[ -n "$NCCL" ] && ln -sf "$NCCL" "$LINKS/libnccl.so"
export LD_LIBRARY_PATH=$TORCH_LIB:$LINKS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$(dirname "$OUT")"
WORK=$(cd "$(dirname "$OUT")" && pwd)/work
rm -rf "$WORK"; mkdir -p "$WORK"
: >"$OUT"
say() { echo "$*" | tee -a "$OUT"; }
STATUS=0
say "gpu-check $(date -u +%FT%TZ) on $GPU, torch $("$PY" -c 'import torch; print(torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

say "== 1. CUDA forward/backward vs CPU fp32 (tiny LLaMA)"
if [ "$DEV" = cpu ]; then say "skipped (dry run)"
elif r=$(timeout 120 "$CHECK" parity 2>>"$WORK/stderr"); then say "ok   $r"; else say "FAIL ${r:-see $WORK/stderr}"; STATUS=1; fi

say "== 2. NCCL on device tensors (world 1)"
if [ "$DEV" = cpu ]; then say "skipped (dry run)"
elif r=$(timeout 60 "$CHECK" nccl 2>>"$WORK/stderr"); then say "ok   $r"; else say "FAIL ${r:-$(tail -n1 "$WORK/stderr")}"; STATUS=1; fi

say "== 3. bf16 training on CUDA with one growth (stack 2 -> 4 layers at step 30 of 60)"
cat >"$WORK/grow.toml" <<EOF
[job]
name = "gpu-check-grow"
seed = 3
[model]
preset = "tiny"
hidden_size = 128
intermediate_size = 352
[data]
train = "$ROOT/corpus/tiny/train.txt"
valid = "$ROOT/corpus/tiny/valid.txt"
vocab_size = 1024
seq_len = 128
cache_dir = "$WORK/data"
[train]
global_batch = 16
max_steps = 60
lr = 2e-3
min_lr = 2e-4
warmup_steps = 5
eval_interval = 30
eval_sequences = 32
device = "$DEV"
precision = "bf16"
[checkpoint]
interval = 0
[[growth]]
at_step = 30
factor = 2
operator = "stack"
EOF
if timeout 180 "$BIN/trellis-worker" train --job "$WORK/grow.toml" --out "$WORK/grow" >"$WORK/grow.log" 2>&1; then
  r=$("$PY" - "$WORK/grow/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tr = [r for r in rows if r["kind"] == "train"]
layers = sorted({r["layers"] for r in tr})
first, last = tr[0]["loss"], tr[-1]["loss"]
ok = layers == [2, 4] and all(r["loss"] == r["loss"] for r in tr) and last < first - 1.0
print(json.dumps({"ok": ok, "steps": len(tr), "layers": layers, "first_loss": first, "last_loss": last,
                  "val": [r["loss"] for r in rows if r["kind"] == "val"]}))
PY
)
  case $r in *'"ok": true'*) say "ok   $r" ;; *) say "FAIL $r"; STATUS=1 ;; esac
else
  say "FAIL trellis-worker train: $(tail -n1 "$WORK/grow.log")"; STATUS=1
fi

PRESET=1b; [ "$DEV" = cpu ] && PRESET=small
say "== 4. MFU of the $PRESET preset, bf16: trellis-worker vs PyTorch eager autocast (batch 8 x seq 2048, micro-batch 4)"
cat >"$WORK/1b.toml" <<EOF
[job]
name = "gpu-check-1b"
seed = 1
[model]
preset = "$PRESET"
[data]
train = "$ROOT/corpus/tiny/train.txt"
valid = "$ROOT/corpus/tiny/valid.txt"
vocab_size = 32000
seq_len = 2048
cache_dir = "$WORK/data"
[train]
global_batch = 8
micro_batch = 4
max_steps = 1000
device = "$DEV"
precision = "bf16"
EOF
PEAK=$("$PY" bench/matmul_peak.py --dtype bf16 --device "$DEV" 2>>"$WORK/stderr" || echo '{}')
say "     matmul peak: $PEAK"
if T=$(timeout 200 "$BIN/trellis-worker" bench --job "$WORK/1b.toml" --steps 10 --warmup 3 --out "$WORK/1b" 2>>"$WORK/stderr"); then
  VOCAB=$(echo "$T" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['vocab'])")
  if P=$(timeout 200 "$PY" bench/peer_pytorch.py --job "$WORK/1b.toml" --vocab "$VOCAB" --steps 10 --precision bf16 --adamw fused --device "$DEV" 2>>"$WORK/stderr"); then
    r=$("$PY" - "$T" "$P" "$PEAK" <<'PY'
import json, sys
t, p, peak = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3] or "{}")
fpt = t["flops_per_token"]
dense = 989e12  # H100/H200 SXM bf16 dense peak (datasheet)
meas = peak.get("peak_gflops", 0) * 1e9
out = {"trellis_tokens_per_s": t["median_step_tokens_per_second"], "pytorch_tokens_per_s": p["median_step_tokens_per_second"],
       "ratio": t["median_step_tokens_per_second"] / p["median_step_tokens_per_second"], "flops_per_token": fpt,
       "mfu_trellis_vs_989T": t["median_step_tokens_per_second"] * fpt / dense,
       "mfu_pytorch_vs_989T": p["median_step_tokens_per_second"] * fpt / dense,
       "measured_matmul_peak_tflops": meas / 1e12}
if meas:
    out["trellis_vs_measured_peak"] = t["median_step_tokens_per_second"] * fpt / meas
    out["pytorch_vs_measured_peak"] = p["median_step_tokens_per_second"] * fpt / meas
print(json.dumps(out))
PY
)
    say "ok   $r"
  else
    say "FAIL pytorch peer: $(tail -n1 "$WORK/stderr")"; STATUS=1
  fi
else
  say "FAIL trellis-worker bench: $(tail -n1 "$WORK/stderr")"; STATUS=1
fi
say "== $([ $STATUS = 0 ] && echo 'all checks passed' || echo 'SOME CHECKS FAILED'); results in $OUT"
exit $STATUS
