#!/usr/bin/env bash
# Build Horovod 0.28.1 (its last release) against the venv's torch, once, and cache the wheel
# outside the repository so later runs take seconds.
#
# 0.28.1 as published sets CMAKE_CXX_STANDARD 14, but torch >= 2.1 needs C++17: we patch the
# two CMakeLists.txt of the sdist to 17 and build with gloo only (no MPI, TF or MXNet).
#
# usage: scripts/build_horovod.sh <python-of-the-venv>
set -euo pipefail
PY="${1:?usage: build_horovod.sh PYTHON}"
VERSION=0.28.1
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# one wheel per torch build: the compiled extension is tied to torch's ABI
CACHE="${SPARKHYDROGEN_CACHE:-$HOME/.cache/sparkhydrogen}/wheels/torch-$TORCH"
mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/horovod-$VERSION-$PYTAG-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$WHEEL" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  echo "building horovod $VERSION for torch $TORCH ($PYTAG); this takes a few minutes, once"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$WORK"
  tar -xzf "$WORK/horovod-$VERSION.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$VERSION"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD 17" "$SRC/horovod/torch/CMakeLists.txt"
  "$PY" -m pip install --quiet cmake packaging wheel psutil pyyaml cloudpickle
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
  HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/wheel" "$SRC"
  BUILT=$(ls "$WORK"/wheel/horovod-*.whl)
  WHEEL="$CACHE/$(basename "$BUILT")"
  cp "$BUILT" "$WHEEL"
fi
"$PY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
"$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging
"$PY" -c 'import horovod.torch as hvd; print("horovod", hvd.__version__ if hasattr(hvd, "__version__") else "ok", "gloo built:", hvd.gloo_built())'
