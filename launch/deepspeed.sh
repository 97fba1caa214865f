#!/usr/bin/env bash
# Launch the training job with the DeepSpeed launcher (`deepspeed`), which sets RANK/WORLD_SIZE/LOCAL_RANK/
# MASTER_ADDR/MASTER_PORT and appends --local_rank=N to the command (the job strips it).
#
# Usage:   launch/deepspeed.sh [train args...]
#          launch/deepspeed.sh --config configs/quickstart.yaml
# Env:     NUM_GPUS     processes on this node (default: number of GPUs, or 2 on CPU, where DeepSpeed
#                       treats --num_gpus as the number of processes)
#          HOSTFILE     a DeepSpeed hostfile for several nodes (see launch/hostfile.example; passwordless
#                       ssh between the nodes is required); NUM_GPUS is then ignored
#          MASTER_PORT  rendezvous port (default: a free port)
#          OMP_NUM_THREADS threads per rank (default 1)
# This launches the plain job (our optimizer, no DeepSpeed engine); the DeepSpeed-engine integration uses
# its own JSON configs under configs/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
preflight "$@"
ds_args=(--master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  ds_args+=(--hostfile "$HOSTFILE")
else
  NUM_GPUS="${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
  ds_args+=(--num_gpus "$NUM_GPUS")
fi
exec deepspeed "${ds_args[@]}" --module sharded_optim.app.train "$@"
