#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build in place, CUDA tests, compute-sanitizer, the
# kernel benchmarks (merge, attention) and the end-to-end decode/serving/prefill benchmark.
# Every stage is time-boxed; logs and JSON are packed into $OUT/gpu_results.tar.gz, and a short
# summary is printed last.
#   OUT=gpu_out bash benchmarks/gpu_all.sh
#   STAGES="build tests bench_merge" OUT=gpu_out bash benchmarks/gpu_all.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
STAGES=${STAGES:-"build tests sanitize bench_merge bench_attention e2e"}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CENTROIDKV_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
PY=${PYTHON:-python3}
summary=()
step() { echo "== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
pack() { cp "$LOGS"/*.json "$OUT"/ 2>/dev/null; tar -czf "$OUT/gpu_results.tar.gz" -C "$LOGS" .; }
trap pack EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpu.txt"

if want build; then
  step build; start=$SECONDS
  $PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  summary+=("build: $((SECONDS - start)) s")
fi

if want tests; then
  step tests
  # xdist: a crash in one test takes down one worker, not the whole run.
  timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -ra -n 8 -p no:cacheprovider \
    tests/test_cuda_merge.py tests/test_attention.py tests/test_merge.py tests/test_match.py \
    tests/test_opcheck.py tests/test_bad_input.py -k cuda > "$LOGS/tests.txt" 2>&1
  tail -25 "$LOGS/tests.txt"; summary+=("tests: $(tail -1 "$LOGS/tests.txt")")
fi

if want sanitize; then
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    step "$tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-60}" "$SANITIZER" --tool $tool \
      --error-exitcode 9 $PY benchmarks/cuda_sanitize.py > "$LOGS/$tool.txt" 2>&1
    rc=$?; tail -3 "$LOGS/$tool.txt"
    summary+=("$tool: rc=$rc $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/$tool.txt")")
  done
fi

if want bench_merge; then
  step bench_merge
  timeout 150 $PY benchmarks/bench_merge.py --device cuda --compile --repeat 100 \
    --json "$LOGS/bench_merge.json" 2>&1 | tee "$LOGS/bench_merge.txt"
fi

if want bench_attention; then
  step bench_attention
  timeout 120 $PY benchmarks/bench_attention.py --json "$LOGS/bench_attention.json" 2>&1 \
    | tee "$LOGS/bench_attention.txt"
fi

if want e2e; then
  step e2e
  timeout "${E2E_TIMEOUT:-200}" $PY benchmarks/gpu_e2e.py --out "$LOGS/e2e" --budget-s "${E2E_BUDGET:-180}" \
    > "$LOGS/e2e.txt" 2>&1
  tail -40 "$LOGS/e2e.txt"; cp "$LOGS"/e2e/*.png "$OUT"/ 2>/dev/null
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
