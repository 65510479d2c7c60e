# Trellis — the two commands a newcomer needs:
#   make demo   installs what is missing, builds, runs coordinator + 2 CPU workers with one growth
#   make test   installs what is missing and runs every test tier
SHELL := /bin/bash
ENV := source scripts/env.sh
CARGO_FLAGS := --release --locked

.PHONY: setup build test demo bench bench-growth bench-storm paper-mini fmt clean-runs gpu-check gpu-check-stage

setup:
	@scripts/setup.sh

build: setup
	@$(ENV) && cargo build $(CARGO_FLAGS) --workspace --bins

test: setup
	@$(ENV) && scripts/test.sh

demo: build
	@$(ENV) && scripts/demo.sh

bench: build
	@$(ENV) && bench/run.sh

# Growth latency (issue #6): online `coordctl grow` vs stop + offline grow + new job from
# checkpoint.init_from, 3 -> 12 layers (142.6M parameters) on CPU; runs/bench-growth/ (docs/benchmarks.md).
# RUNS=5 make bench-growth: five runs, their medians and the issue 14 targets (runs/bench-growth/summary.md)
bench-growth: build
	@$(ENV) && bench/growth_latency.sh

# Connection storm (issue 10): 500 simulated workers open sessions at once, then reconnect after
# a coordinator kill -9 + restart; 5 rounds in a row, fails on any session lost (docs/benchmarks.md).
# `make test` runs the same storm as a test (coordinator/tests/storm.rs), asserting its invariants.
STORM_WORKERS ?= 500
STORM_ROUNDS ?= 5
bench-storm: build
	@$(ENV) && cargo run $(CARGO_FLAGS) -p trellis-coordinator --example control_plane -- storm $(STORM_WORKERS) $(STORM_ROUNDS)

# The G_stack paper in miniature (issue #6): baseline vs G_stack (+ ablations with ONLY=all).
# make paper-mini CORPUS=DIR SCALE=cpu [SEEDS=2] [ONLY=main] [ABL_SEEDS=1]  (docs/results.md);
# DIR holds train.txt.zst and valid.txt (a corpus of a few tens of millions of tokens)
CORPUS ?=
SCALE ?= cpu
SEEDS ?= 2
ONLY ?= main
ABL_SEEDS ?= 1
paper-mini: build
	@test -n "$(CORPUS)" || { echo "make paper-mini needs CORPUS=DIR (a directory with train.txt.zst and valid.txt)" >&2; exit 2; }
	@bench/paper_mini.sh $(CORPUS) --scale $(SCALE) --seeds $(SEEDS) --only $(ONLY) --ablation-seeds $(ABL_SEEDS)

# The GPU check (issue 12, docs/precision.md §GPU): run on a machine with one CUDA GPU; results in
# runs/gpu-check/results.txt. Without a GPU it fails with one line. `make gpu-check-stage` builds
# the binaries it needs into runs/gpu-check/bin (on the build machine).
gpu-check:
	@scripts/gpu-check.sh

gpu-check-stage: setup
	@scripts/gpu-check.sh --stage

fmt:
	@$(ENV) && cargo fmt --all

clean-runs:
	rm -rf runs
