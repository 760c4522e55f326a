#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build in place, CUDA tests, the kernel benchmarks
# (merge, attention), captured (compiled, CUDA-graph) decode steps, the end-to-end
# decode/serving/prefill benchmark, and compute-sanitizer (memcheck and racecheck).
# Stages run in that order, each time-boxed (the sanitizers in the background beside the tests,
# which need the CPU more than the GPU; every timing runs after them); logs and JSON are packed into
# $OUT/gpu_results.tar.gz after every stage (so a run cut short still returns what it did), and
# a short summary is printed last.
#   OUT=gpu_out bash benchmarks/gpu_all.sh
#   STAGES="build tests bench_merge" OUT=gpu_out bash benchmarks/gpu_all.sh
#   STAGES="build captured" ...    the captured-decode check alone, under 8 minutes
#   STAGES="build serving_captured" ...  serving at equal memory with captured steps
#   E2E_POLICY=default ... runs the end-to-end part with CentroidKVCache's default policy (plain: the paper's)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
STAGES=${STAGES:-"build memcheck racecheck tests bench_merge bench_attention captured serving_captured prefill e2e"}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CENTROIDKV_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
PY=${PYTHON:-python3}
summary=()
step() { echo "== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
pack() {
  printf '%s\n' "${summary[@]}" > "$LOGS/summary.txt"
  cp "$LOGS"/*.json "$LOGS"/e2e/*.png "$OUT"/ 2>/dev/null
  tar -czf "$OUT/gpu_results.tar.gz" -C "$LOGS" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpu.txt"

if want build; then
  step build; start=$SECONDS
  $PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; pack; exit 1; }
  # libstdc++ must be a NEEDED shared library, never a static copy (the build checks it too).
  libstdcxx=$(readelf -d python/centroidkv/_C*.so | grep -o 'libstdc++[^]]*' || echo "NOT NEEDED")
  summary+=("build: $((SECONDS - start)) s; libstdc++: $libstdcxx"); pack
  # The kernels load, an error message keeps its numbers, and the largest chunk_size CUDA takes.
  $PY - > "$LOGS/smoke.txt" 2>&1 <<'SMOKE'
import torch, centroidkv
for chunk in (31, 1 << 16):
    keys = torch.randn(1, 1, max(chunk, 64), 16, device="cuda")
    try:
        torch.ops.centroidkv.merge(keys, keys, None, chunk, 4)
    except RuntimeError as error:
        print("message:", error)
SMOKE
  rc=$?; cat "$LOGS/smoke.txt"
  if [ $rc != 0 ]; then  # what a failed load needs to be understood
    ldd python/centroidkv/_C*.so | grep -i "stdc\|not found"; strings python/centroidkv/_C*.so | grep -o "GLIBCXX_[0-9.]*" | sort -uV | tail -3
  fi
  summary+=("smoke: rc=$rc $(grep -c message "$LOGS/smoke.txt") messages"); pack
fi

# compute-sanitizer over every kernel path of match, merge and attention (benchmarks/cuda_sanitize.py).
# They check correctness only, so they run beside the CPU-heavy test stage; timings come later.
sanitize() {  # tool, timeout; writes its summary line to $LOGS/<tool>.summary
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$2" "$SANITIZER" --tool "$1" \
    --error-exitcode 9 $PY benchmarks/cuda_sanitize.py > "$LOGS/$1.txt" 2>&1
  echo "$1: rc=$? $(grep -m1 'ERROR SUMMARY\|RACECHECK SUMMARY' "$LOGS/$1.txt")" > "$LOGS/$1.summary"
}
sanitizers=()
want memcheck && sanitizers+=(memcheck)
want racecheck && sanitizers+=(racecheck)
if [ ${#sanitizers[@]} -gt 0 ]; then
  step "sanitizers (${sanitizers[*]}) in the background"
  ( for tool in "${sanitizers[@]}"; do
      sanitize "$tool" "$([ "$tool" = racecheck ] && echo "${RACECHECK_TIMEOUT:-150}" || echo "${SANITIZE_TIMEOUT:-60}")"
    done ) &
  SANITIZE_PID=$!
fi

if want tests; then
  step tests
  # xdist: a crash in one test takes down one worker, not the whole run.
  timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -ra -n 14 -p no:cacheprovider \
    tests/test_cuda_merge.py tests/test_attention.py tests/test_merge.py tests/test_match.py \
    tests/test_opcheck.py tests/test_bad_input.py tests/test_attention_lse.py tests/test_prefill_attention.py \
    -k cuda > "$LOGS/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.txt" | head -20; tail -2 "$LOGS/tests.txt"
  summary+=("tests: $(tail -1 "$LOGS/tests.txt")"); pack
fi

if [ -n "${SANITIZE_PID:-}" ]; then
  step "waiting for the sanitizers"
  wait "$SANITIZE_PID"
  for tool in "${sanitizers[@]}"; do
    tail -3 "$LOGS/$tool.txt"; summary+=("$(cat "$LOGS/$tool.summary" 2>/dev/null || echo "$tool: no result")")
  done
  pack
fi

if want bench_merge; then
  step bench_merge
  timeout 70 $PY benchmarks/bench_merge.py --device cuda --compile --inner 10 \
    --repeat 30 --json "$LOGS/bench_merge.json" > "$LOGS/bench_merge.txt" 2>&1
  grep -v Warning "$LOGS/bench_merge.txt" | tail -12; pack
fi

if want bench_attention; then
  step bench_attention
  timeout 60 $PY benchmarks/bench_attention.py --json "$LOGS/bench_attention.json" \
    > "$LOGS/bench_attention.txt" 2>&1
  tail -30 "$LOGS/bench_attention.txt"; pack
fi

if want captured; then
  # Decode steps compiled with CUDA graphs (mode="reduce-overhead"), Llama-3-8B shape, default
  # policy at 0.75, against StaticCache compiled and CentroidKVCache(ratio=0) compiled (and each
  # eagerly): the points of issue 15's table first; a point starts only if its compiles fit.
  # First the CUDA-graph tests (replays equal eager, no recompile, no CUDA-graph skip).
  step captured
  timeout 120 $PY -m pytest -q -ra -p no:cacheprovider tests/test_captured_decode.py -k cuda \
    > "$LOGS/captured_tests.txt" 2>&1
  summary+=("captured tests: $(tail -1 "$LOGS/captured_tests.txt")"); tail -3 "$LOGS/captured_tests.txt"
  timeout "${CAPTURED_TIMEOUT:-330}" $PY benchmarks/bench_captured_decode.py --policy "${E2E_POLICY:-default}" \
    --points 8x32768 8x65536 1x8192 16x32768 1x131072 --deadline-s "${CAPTURED_BUDGET:-280}" \
    --json "$LOGS/captured.json" > "$LOGS/captured.txt" 2>&1
  summary+=("captured: rc=$?"); tail -24 "$LOGS/captured.txt"; pack
fi

if want serving_captured; then
  # Serving at equal KV memory with captured steps: CentroidKV 0.75 against the in-place full
  # cache and StaticCache, both compiled (32k prompts, 256 generated).
  step serving_captured
  timeout "${SERVING_TIMEOUT:-300}" $PY benchmarks/bench_serving.py --captured --policy "${E2E_POLICY:-default}" \
    --deadline-s 240 --json "$LOGS/serving_captured.json" > "$LOGS/serving_captured.txt" 2>&1
  summary+=("serving_captured: rc=$?"); tail -12 "$LOGS/serving_captured.txt"; pack
fi

if want prefill; then
  # Llama-3-8B shape, B=1: 32k with every variant (chunked in 8k blocks too), 128k stock vs
  # clustering off vs on; time and peak memory against stock SDPA.
  step prefill
  timeout "${PREFILL_TIMEOUT:-200}" $PY benchmarks/bench_prefill.py --model 8b --contexts 32768 131072 \
    --long-context 65536 --chunk 8192 --reps 2 --policy "${E2E_POLICY:-default}" \
    --json "$LOGS/prefill.json" > "$LOGS/prefill.txt" 2>&1
  summary+=("prefill: rc=$?"); tail -16 "$LOGS/prefill.txt"; pack
fi

if want e2e; then
  step e2e
  timeout "${E2E_TIMEOUT:-165}" $PY benchmarks/gpu_e2e.py --out "$LOGS/e2e" --budget-s "${E2E_BUDGET:-150}" \
    --policy "${E2E_POLICY:-plain}" > "$LOGS/e2e.txt" 2>&1
  summary+=("e2e: rc=$?"); tail -45 "$LOGS/e2e.txt"; pack
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
