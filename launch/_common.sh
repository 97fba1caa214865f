# Shared by the launch/*.sh scripts (sourced, not run).  Sets REPO, puts it on PYTHONPATH (so an
# uninstalled checkout works), defaults OMP_NUM_THREADS and picks a free MASTER_PORT when none is given.
# preflight ARGS: check the job's arguments, config and run directory before any rank starts (see
# sharded_optim/app/preflight.py): a mistake exits here with one message and status 2; --resume of a finished
# run exits 0 here.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
# One BLAS/OpenMP thread per rank unless told otherwise: several ranks each using every core
# oversubscribe the machine badly.  training.threads in the config overrides this per run.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
export MASTER_PORT

preflight() {
  local rc=0
  "$PYTHON" -m sharded_optim.app.preflight "$@" || rc=$?
  [ "$rc" = 3 ] && exit 0   # nothing to do: --resume of a finished run
  [ "$rc" = 0 ] || exit "$rc"
}
