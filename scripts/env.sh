# Source me: the environment every build, test and demo uses.
# libtorch comes from the cached torch wheel (tch 0.24 <-> PyTorch 2.11.0).
TRELLIS_CACHE=${TRELLIS_CACHE:-$HOME/.cache/trellis}
export TRELLIS_VENV=$TRELLIS_CACHE/venv-torch2.11.0
export LIBTORCH_USE_PYTORCH=1
export PATH=$TRELLIS_VENV/bin:$HOME/.cargo/bin:$PATH
# Keyed by rustc version so a toolchain change never reuses stale artefacts.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TRELLIS_CACHE/target-$(rustc --version | awk '{print $2}')}
_torch_lib=$(ls -d "$TRELLIS_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n 1)
export LD_LIBRARY_PATH=${_torch_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRELLIS_PYTHON=${TRELLIS_PYTHON:-$TRELLIS_VENV/bin/python}
# Benchmark hygiene on these VMs (docs/design.md §10): slow first-touch page faults otherwise.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
