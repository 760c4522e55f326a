#!/usr/bin/env bash
# Every GPU-side check of the CUDA merge kernels in one run: tests, compute-sanitizer
# (memcheck, racecheck) and the benchmark. Needs centroidkv built with its CUDA kernels.
# Logs go to $OUT (default ./cuda_checks). Worst case about 8 minutes (timeouts 200+100+120+60 s).
set -u -o pipefail
OUT=${OUT:-cuda_checks}
mkdir -p "$OUT"
python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, centroidkv
print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "| _C from", centroidkv.LOADED_FROM)
assert torch._C._dispatch_has_kernel_for_dispatch_key("centroidkv::merge", "CUDA"), "CUDA kernels not built"
PY
status=0
timeout 200 python -m pytest tests/test_cuda_merge.py -q -ra --maxfail=15 --durations=5 2>&1 \
  | tee "$OUT/test_cuda_merge.txt" | tail -60 || status=1
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SANITIZER" --tool memcheck --error-exitcode 9 \
  python benchmarks/cuda_sanitize.py > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"
tail -8 "$OUT/memcheck.txt"
timeout 120 "$SANITIZER" --tool racecheck --error-exitcode 9 \
  python benchmarks/cuda_sanitize.py > "$OUT/racecheck.txt" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"
tail -8 "$OUT/racecheck.txt"
timeout 60 python benchmarks/bench_cuda_merge.py --json "$OUT/bench_cuda_merge.json" 2>&1 | tee "$OUT/bench_cuda_merge.txt"
exit $status
