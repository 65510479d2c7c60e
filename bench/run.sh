#!/usr/bin/env bash
# make bench: every benchmark, each printing its ratio / figures (see docs/benchmarks.md).
#   1. training step throughput: trellis-worker vs PyTorch eager, same model/batch/threads
#      (fp32; then bf16 against torch.autocast on the 8-layer and the small job)
#   2. control plane: coordinator with 500 simulated workers
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== training step: trellis-worker vs PyTorch eager (bench/job-small.toml, 5 repeats x 20 steps)"
bench/train_step.sh bench/job-small.toml 5 20
echo "== training step, bf16: trellis-worker vs PyTorch eager autocast (8 layers, bench/job-8l.toml)"
bench/train_step.sh bench/job-8l.toml 5 10 bf16
echo "== training step, bf16: trellis-worker vs PyTorch eager autocast (bench/job-small.toml)"
bench/train_step.sh bench/job-small.toml 5 20 bf16
echo "== control plane: 500 simulated workers, 10 steps/s each, 15 s"
cargo run --release --locked -q -p trellis-coordinator --example control_plane -- 500 10 15
