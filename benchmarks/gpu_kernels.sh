#!/usr/bin/env bash
# One call on a GPU machine: build in place, run the CUDA tests, compute-sanitizer, and the kernel
# benchmarks (merge, attention). Logs and JSON go to $OUT. Prints a short summary last.
#   OUT=gpu_out SANITIZE=1 bash benchmarks/gpu_kernels.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CENTROIDKV_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
PY=${PYTHON:-python3}
summary=()
step() { echo "== $(date +%T) $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$SECONDS
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  summary+=("build: $((SECONDS - start)) s")
fi

step repro_num_merge
timeout 60 $PY benchmarks/repro_num_merge.py > "$OUT/repro_num_merge.txt" 2>&1
rc=$?; tail -3 "$OUT/repro_num_merge.txt"; summary+=("repro_num_merge: rc=$rc")
if [ $rc != 0 ]; then  # native backtrace of the crash
  DBG=$(command -v cuda-gdb || command -v gdb || echo /usr/local/cuda/bin/cuda-gdb)
  timeout 120 "$DBG" -batch -ex run -ex bt --args $PY benchmarks/repro_num_merge.py > "$OUT/repro_backtrace.txt" 2>&1
  tail -40 "$OUT/repro_backtrace.txt"
fi

step tests
timeout "${TEST_TIMEOUT:-400}" $PY -m pytest -q -ra --maxfail=20 -p no:cacheprovider \
  tests/test_cuda_merge.py tests/test_attention.py tests/test_merge.py tests/test_match.py \
  tests/test_opcheck.py tests/test_bad_input.py tests/test_compile.py \
  -k "cuda" 2>&1 | tee "$OUT/tests.txt" | tail -40
summary+=("tests: $(tail -1 "$OUT/tests.txt")")

if [ "${SANITIZE:-1}" = 1 ]; then
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    step "$tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-100}" "$SANITIZER" --tool $tool \
      --error-exitcode 9 $PY benchmarks/cuda_sanitize.py > "$OUT/$tool.txt" 2>&1
    rc=$?; tail -4 "$OUT/$tool.txt"; summary+=("$tool: rc=$rc $(grep -m1 'ERROR SUMMARY' "$OUT/$tool.txt")")
  done
fi

step bench_merge
timeout 150 $PY benchmarks/bench_merge.py --device cuda --compile --kernels v1 v2 --inner 10 --repeat 30 --json "$OUT/bench_merge.json" 2>&1 | tee "$OUT/bench_merge.txt"
step bench_attention
timeout 150 $PY benchmarks/bench_attention.py --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.txt"

echo "== summary"
printf '%s\n' "${summary[@]}"
