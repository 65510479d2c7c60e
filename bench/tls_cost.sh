#!/usr/bin/env bash
# Cost of security on the training step (issue 11): the same short DP=2 job (the `small` preset
# of bench/job-small.toml: hidden 256, 2 layers, seq 256, global batch 8; 1 thread per worker),
# run on loopback
#   A  plaintext gRPC, ring messages without MACs (TRELLIS_BENCH_RING_MAC=0; the ring handshake
#      is authenticated either way)
#   B  mTLS on every gRPC call (coordctl certs), keyed-BLAKE3 MAC on every ring message (the
#      default)
# interleaved A B A B ... (ROUNDS pairs), so that load from other processes hits both alike.
# Each run's figure is the median of rank 0's step_seconds over its steps after WARMUP (from the
# job's metrics.jsonl); the script prints every run, the median of each variant's runs and B/A.
#
#   bench/tls_cost.sh          (env: ROUNDS=3 STEPS=60 WARMUP=10 OUT=runs/bench-tls
#                               BIN_DIR=$CARGO_TARGET_DIR/release)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"

ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-60}
WARMUP=${WARMUP:-10}
OUT=${OUT:-$ROOT/runs/bench-tls}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
for b in trellis-coordinator trellis-worker coordctl; do
  [ -x "$BIN_DIR/$b" ] || { echo "tls_cost: $BIN_DIR/$b is missing: cargo build --release --workspace --bins" >&2; exit 2; }
done

rm -rf "$OUT"
mkdir -p "$OUT/cache"
CERTS=$OUT/certs
"$BIN_DIR/coordctl" certs init "$CERTS" >/dev/null
for w in w0 w1; do "$BIN_DIR/coordctl" certs worker "$w" "$CERTS" >/dev/null; done

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT

# run VARIANT INDEX: one job to the end; prints the median step time in ms.
run() {
  local variant=$1 i=$2 dir=$OUT/run-$2-$1
  mkdir -p "$dir/ckpt"
  cat >"$dir/job.toml" <<EOF
[job]
name = "tls-cost"
seed = 1
[model]
preset = "small"
[data]
train = "$ROOT/corpus/tiny/train.txt"
valid = "$ROOT/corpus/tiny/valid.txt"
vocab_size = 2048
seq_len = 256
cache_dir = "$OUT/cache"
[train]
global_batch = 8
max_steps = $STEPS
eval_interval = 0
threads = 1
device = "cpu"
[checkpoint]
dir = "$dir/ckpt"
interval = 0
[parallel]
dp = 2
EOF
  local coord_tls=() ctl_tls=() scheme=http
  if [ "$variant" = B ]; then
    scheme=https
    coord_tls=(--tls-cert "$CERTS/coordinator.crt" --tls-key "$CERTS/coordinator.key"
               --client-ca "$CERTS/ca.crt" --allowed-root "$ROOT/corpus" --allowed-root "$OUT")
    ctl_tls=(--ca "$CERTS/ca.crt" --cert "$CERTS/operator.crt" --key "$CERTS/operator.key")
  fi
  "$BIN_DIR/trellis-coordinator" --listen 127.0.0.1:0 --metrics-listen "" \
    --store "file:$dir/store" --job "$dir/job.toml" "${coord_tls[@]}" \
    >"$dir/coordinator.out" 2>"$dir/coordinator.log" &
  PIDS+=($!)
  local addr=""
  for _ in $(seq 1 600); do
    addr=$(sed -n 's/.*listening grpc=\([^ ]*\).*/\1/p' "$dir/coordinator.out" 2>/dev/null | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "tls_cost: the coordinator did not start; $dir/coordinator.log" >&2; exit 1; }
  local ep=$scheme://$addr w
  for w in w0 w1; do
    if [ "$variant" = B ]; then
      "$BIN_DIR/trellis-worker" --coordinator "$ep" --device cpu \
        --tls-cert "$CERTS/worker-$w.crt" --tls-key "$CERTS/worker-$w.key" --ca "$CERTS/ca.crt" \
        >"$dir/$w.log" 2>&1 &
    else
      TRELLIS_WORKER_ID=$w TRELLIS_BENCH_RING_MAC=0 "$BIN_DIR/trellis-worker" \
        --coordinator "$ep" --device cpu >"$dir/$w.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  local phase=""
  for _ in $(seq 1 3000); do
    phase=$("$BIN_DIR/coordctl" --endpoint "$ep" "${ctl_tls[@]}" --output json status 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["phase"])' 2>/dev/null || true)
    [ "$phase" = done ] || [ "$phase" = failed ] && break
    sleep 0.2
  done
  cleanup
  [ "$phase" = done ] || { echo "tls_cost: run $i ($variant) ended in phase '$phase'; see $dir" >&2; exit 1; }
  python3 - "$dir/ckpt/tls-cost/metrics.jsonl" "$WARMUP" <<'EOF'
import json, statistics, sys
path, warmup = sys.argv[1], int(sys.argv[2])
t = [r["step_seconds"] for r in map(json.loads, open(path)) if r.get("kind") == "train" and r["step"] > warmup]
print(f"{statistics.median(t) * 1e3:.2f} {len(t)}")
EOF
}

echo "tls_cost: $ROUNDS x (A plaintext, no ring MAC | B mTLS + ring MAC), DP=2 small preset, $STEPS steps (median after step $WARMUP)"
A=() B=()
for r in $(seq 1 "$ROUNDS"); do
  for v in A B; do
    res=$(run "$v" "$r")
    read -r ms n <<<"$res"
    printf '  round %d %s: median step %s ms (%s steps)\n' "$r" "$v" "$ms" "$n"
    if [ "$v" = A ]; then A+=("$ms"); else B+=("$ms"); fi
  done
done
python3 - "${A[*]}" "${B[*]}" <<'EOF'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"A plaintext, no ring MAC: median of runs {ma:.2f} ms/step")
print(f"B mTLS + ring MAC:        median of runs {mb:.2f} ms/step")
print(f"B/A = {mb / ma:.3f} ({(mb / ma - 1) * 100:+.1f}%)")
EOF
