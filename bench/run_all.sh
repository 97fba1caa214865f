#!/usr/bin/env bash
# Run the CPU benchmarks (issues 2, 3 and 5) from the repository root; results land in bench/results/.
#   bench/run_all.sh            # all, ~25-30 min on the 2-core machine when it is shared
#   bench/run_all.sh kernel     # only the fused-update benchmark
#   bench/run_all.sh zero       # only the data-parallel step benchmark
#   bench/run_all.sh telemetry  # only the telemetry overhead (MLP and GPT workloads)
# The GPU benchmark is separate (CUDA only): python bench/gpu_bench.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
what="${1:-all}"
if [[ "$what" == all || "$what" == kernel ]]; then
  python bench/kernel_bench.py
fi
if [[ "$what" == all || "$what" == zero ]]; then
  python bench/zero_bench.py
fi
if [[ "$what" == all || "$what" == telemetry ]]; then
  python bench/telemetry_overhead.py
  python bench/telemetry_overhead.py --workload gpt --layers 4 --hidden 256 --batch 8 --seq-len 128 --rounds 24
fi
