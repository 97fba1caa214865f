#!/usr/bin/env bash
# Launch the training job on this node with torchrun (one process per rank, env:// rendezvous).
#
# Usage:   launch/torchrun.sh [train args...]
#          launch/torchrun.sh --config configs/quickstart.yaml --set training.steps=100 --resume
#          (--resume continues the run in training.run_dir; --overwrite deletes it and starts again; without
#          either, a run directory that holds a run is refused before torchrun starts)
# Env:     NPROC_PER_NODE  ranks on this node (default: number of GPUs, or 2 on a CPU-only machine)
#          MASTER_PORT     rendezvous port (default: a free port)
#          OMP_NUM_THREADS threads per rank (default 1)
#          PYTHON          interpreter whose torchrun to use (default: python on PATH)
# Multi-node: use launch/slurm.sbatch, or run torchrun yourself with --nnodes/--rdzv_endpoint.
#
# torchrun parses every flag before the module name and takes unambiguous prefixes of its own options
# (e.g. --even for --event-log-handler), so train flags must come after "-m sharded_optim.app.train", as
# below; none of the train flags (--config, --set, --resume) is a prefix of a torchrun option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
preflight "$@"
# With --max-restarts, a restarted attempt can otherwise reach the dead rank's old gloo address through the
# shared rendezvous store (pytorch/pytorch#135712; seen here in 2 of 5 restarts).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
# sharded_optim.app.torchrun is torch.distributed.run reporting a failed rank in one line (the job already printed
# its error once) instead of a ChildFailedError traceback; see its docstring.
exec "$PYTHON" -m sharded_optim.app.torchrun --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr 127.0.0.1 --master_port "$MASTER_PORT" -m sharded_optim.app.train "$@"
