#!/usr/bin/env bash
# Every test tier: repo hygiene, formatting, build, unit + service + real-etcd + multi-process
# end-to-end tests (cargo test), deployment checks.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== repo hygiene"
scripts/check-repo.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== build (release)"
cargo build --release --locked --workspace --bins
echo "== cargo test (release)"
# Two test binaries at a time at most: the machine has 2 cores and the e2e tests run processes.
cargo test --release --locked --workspace -- --test-threads=2
if [ -x scripts/check-deploy.sh ]; then
  echo "== deployment checks"
  scripts/check-deploy.sh
fi
echo "== live dashboard queries"
# A real Prometheus scrapes a short real training run (growth included) on free loopback ports;
# every Grafana dashboard expression must return series (deploy/local-stack.sh --check, < 3 min).
deploy/local-stack.sh --check
echo "== operations doc commands"
# Every coordctl/curl line of docs/operations.md's ops-check blocks, in order, against a local
# stack: submit, watch, grow x4, metrics, a killed worker and its replacement (< 2 min).
scripts/check-ops-doc.sh
