#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine (results and logs under $OUT, or
# bench/results and /tmp when OUT is unset):  tests/test_gpu.py, the whole-step benchmark against torch's
# optimizers (bench/step_bench.py), the update-kernel bandwidth benchmark (bench/gpu_bench.py) and the update
# kernel with bf16/int8 state (bench/state_kernel_bench.py: issue 19's bandwidth on the compressed bytes).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
LOG="$OUT/gpu_session.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== tests/test_gpu.py"; date
  timeout "${TEST_S:-170}" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py
  echo "== bench/step_bench.py"; date
  timeout "${STEP_S:-290}" python3 bench/step_bench.py --device cuda --compiled-peer --rounds "${ROUNDS:-7}"
  cp bench/results/step_bench_cuda.* "$OUT/" 2>/dev/null
  echo "== bench/gpu_bench.py"; date
  timeout "${KERNEL_S:-100}" python3 bench/gpu_bench.py --reps "${KERNEL_REPS:-5}" --no-class
  cp bench/results/gpu_bench.* "$OUT/" 2>/dev/null
  echo "== bench/state_kernel_bench.py"; date
  timeout "${STATE_S:-120}" python3 bench/state_kernel_bench.py --device cuda --numel "${STATE_NUMEL:-268435456}"
  cp bench/results/state_kernel_cuda.* "$OUT/" 2>/dev/null
  date
} 2>&1 | tee "$LOG"
