#!/usr/bin/env bash
# Install what Trellis needs on a fresh Debian machine, idempotently. Everything heavy is
# cached outside the repo in ${TRELLIS_CACHE:-~/.cache/trellis}, keyed by version.
#   - apt: protoc (tonic, etcd-client), etcd-server (store tests), prometheus/promtool, zstd, curl, jq
#   - a Python venv with torch==2.11.0 (the libtorch tch 0.24 links) and transformers (parity
#     checks against Hugging Face)
set -euo pipefail
TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.0.0
CACHE=${TRELLIS_CACHE:-$HOME/.cache/trellis}
VENV=$CACHE/venv-torch$TORCH_VERSION
mkdir -p "$CACHE"

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler libprotobuf-dev)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v curl >/dev/null || need_apt+=(curl)
command -v jq >/dev/null || need_apt+=(jq)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY_EXTRAS="pyarrow zstandard tensorboard grpcio"
if ! [ -f "$VENV/.complete" ]; then
  echo "setup: creating $VENV with torch==$TORCH_VERSION (about 2 min, 4.6 GB, once)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" safetensors numpy $PY_EXTRAS
  "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$VENV/.complete"
fi
# Test-only Python packages (parquet / zstd corpora made by the real libraries, TensorBoard's
# reader, grpcio as an independent mTLS client); installed into venvs made before they were added too.
if ! "$VENV/bin/python" -c "import pyarrow, zstandard, tensorboard, grpc" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check $PY_EXTRAS
fi
