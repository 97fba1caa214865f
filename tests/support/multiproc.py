"""Run a function on N real gloo ranks (spawned processes) and collect what each rank returns.

Spawning costs seconds here (process start + torch import), so tests pack many scenarios into one run.
Results travel as pickled plain data (numpy arrays, lists, dicts): tensors shared through file descriptors vanish
with the process that owned them.  A failing rank reports its traceback to the parent instead of leaving the
others hanging, and the group has a collective timeout so a stuck collective fails rather than hangs.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, timeout_s: float, env: dict[str, str], fn: Callable[..., Any],
            args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks on 2 cores: one thread each avoids oversubscription
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), **env)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # report every failure to the parent instead of hanging the other ranks
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0,
              collective_timeout_s: float = 120.0, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the per-rank results in rank order.

    ``env`` is set in every rank before the process group starts (e.g. ``SHARDED_OPTIM_KERNEL=eager``).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, collective_timeout_s, dict(env or {}), fn, args,
                                               queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
