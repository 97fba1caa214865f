#!/usr/bin/env bash
# Set up a fresh machine and run the main job: a real 2-rank CPU training run of a small GPT on the shipped
# corpus with the sharded optimizer (ZeRO-2), live Prometheus metrics on 127.0.0.1:9400-9401, and a summary.
#
# Usage:  bash scripts/quickstart.sh [train args...]   e.g.  --set optimizer.algorithm=adamod
# runs/quickstart holds one run: a second run there is refused; add --resume to continue it (Ctrl-C stops
# cleanly and says where the last checkpoint is) or --overwrite to start again (see docs/TRAINING.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
NPROC_PER_NODE="${NPROC_PER_NODE:-2}" exec bash launch/torchrun.sh --config configs/quickstart.yaml "$@"
