#!/usr/bin/env bash
# make demo: the coordinator (embedded store) and 2 CPU worker processes (DP=2) train a tiny
# LLaMA on the bundled tinyshakespeare and grow it ×4 with G_stack mid-run (deploy/jobs/demo.toml).
# Leaves runs/demo/: checkpoints/, loss.png, summary.json, status.json, metrics.jsonl and
# TensorBoard event files (`tensorboard --logdir runs/demo`), and the process logs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/demo
BIN=$CARGO_TARGET_DIR/release
rm -rf "$OUT" && mkdir -p "$OUT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Throwaway mTLS certificates (a CA, the coordinator's, operator/viewer and one per worker):
# gRPC runs with mTLS and roles even on loopback, and job paths are confined (docs/security.md).
CERTS=$OUT/certs
"$BIN/coordctl" certs init "$CERTS" >/dev/null
for i in 0 1; do "$BIN/coordctl" certs worker "demo-worker-$i" "$CERTS" >/dev/null; done
# Spec paths with `..` are confined once they exist: make the cache and checkpoint dirs first.
mkdir -p "$OUT/data" "$OUT/checkpoints"

echo "demo: starting trellis-coordinator (store file:$OUT/store, mTLS with certificates in $CERTS)"
"$BIN/trellis-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --store "file:$OUT/store" --run-dir "$OUT" --job deploy/jobs/demo.toml \
  --tls-cert "$CERTS/coordinator.crt" --tls-key "$CERTS/coordinator.key" --client-ca "$CERTS/ca.crt" \
  --allowed-root corpus --allowed-root "$OUT" >"$OUT/coordinator.log" 2>&1 &
pids+=($!)
banner=""
for _ in $(seq 1 100); do
  banner=$(grep -m1 'trellis-coordinator listening' "$OUT/coordinator.log" || true)
  [ -n "$banner" ] && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$OUT/coordinator.log" >&2; echo "demo: the coordinator exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$banner" ] || { echo "demo: the coordinator printed no listening line; see $OUT/coordinator.log" >&2; exit 1; }
grpc=$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$banner")
metrics=$(sed -E 's/.*metrics=([^ ]+).*/\1/' <<<"$banner")
export TRELLIS_ENDPOINT="https://$grpc"
export TRELLIS_CA="$CERTS/ca.crt" TRELLIS_CERT="$CERTS/operator.crt" TRELLIS_KEY="$CERTS/operator.key"
echo "demo: coordinator at $TRELLIS_ENDPOINT (coordctl uses TRELLIS_CA/CERT/KEY), metrics at http://$metrics/metrics"

for i in 0 1; do
  "$BIN/trellis-worker" --coordinator "$TRELLIS_ENDPOINT" --device cpu \
    --tls-cert "$CERTS/worker-demo-worker-$i.crt" --tls-key "$CERTS/worker-demo-worker-$i.key" \
    --ca "$CERTS/ca.crt" >"$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
echo "demo: 2 workers started; watching the job (growth ×4 at step 120 of 400)"

"$BIN/coordctl" watch
"$BIN/coordctl" status
"$BIN/coordctl" --output json status >"$OUT/status.json"
"$BIN/coordctl" --output json loss >"$OUT/loss.json"
"$BIN/coordctl" loss --plot "$OUT/loss.png" >/dev/null
curl -s "http://$metrics/metrics" >"$OUT/metrics.prom" || true

python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
st = json.load(open(f"{out}/status.json"))
loss = json.load(open(f"{out}/loss.json"))
pts = loss["points"]
val = [p for p in pts if p.get("val_loss") is not None]
summary = {
    "job": st["job_id"], "phase": st["phase"], "steps": st["step"], "tokens": st["tokens"],
    "generation": st["generation"], "layers": st["layers"], "parameters": st["parameters"],
    "layout": st["layout"], "final_train_loss": st["train_loss"], "final_val_loss": st["val_loss"],
    "first_val_loss": val[0]["val_loss"] if val else None,
    "growth": st["growth_history"], "checkpoints": [c["dir"] for c in st["checkpoints"]],
    "loss_plot": os.path.abspath(f"{out}/loss.png"),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
g = summary["growth"][0] if summary["growth"] else None
print(f"demo: done — {summary['steps']} steps, {summary['tokens']} tokens, "
      f"val loss {summary['first_val_loss']:.3f} → {summary['final_val_loss']:.3f}; "
      + (f"grew {g['from_layers']} → {g['to_layers']} layers at step {g['at_step']} "
         f"({g['timings']['total_seconds']:.2f} s)" if g else "no growth"))
print(f"demo: wrote {out}/loss.png, {out}/summary.json, {out}/checkpoints/")
if st["phase"] != "done" or not g or g["phase"] != "done":
    sys.exit("demo: the job did not finish with a completed growth; see the logs in " + out)
PY
