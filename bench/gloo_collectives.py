"""How gloo moves one ZeRO bucket between 2 ranks: the measurement behind ZeRO-2's send/recv exchange (zero_grads.py).

Each candidate leaves every rank holding the sum over ranks of its half of a 32 MiB fp32 bucket (a reduce-scatter),
or, for the parameter gather, every rank holding both halves:

* reduce-scatter: ``all_reduce`` of the bucket (ZeRO-1's way), the tensor reduce-scatter, two ``reduce`` (one per
  owner), and the exchange: ``isend`` the other rank's half, ``irecv`` this rank's, add;
* gather: the tensor all-gather against one ``broadcast`` per rank (what ``zero.py`` uses on gloo).

2 spawned gloo ranks, one torch thread each, on this machine; a barrier before each timed call; medians of 9 calls
after 2 warm-up calls.  Run from the repository root: ``python bench/gloo_collectives.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import environment, grouped_bars, md_table, write_json, write_markdown

REDUCE = ("all_reduce", "reduce_scatter", "2x reduce", "send/recv + add")
GATHER = ("all_gather", "broadcast per rank")
# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old names
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _candidates(rank: int, x: torch.Tensor) -> dict:
    n = x.numel() // 2
    mine, other = x[rank * n:(rank + 1) * n], x[(1 - rank) * n:(2 - rank) * n]
    out, received = torch.empty(n), torch.empty(n)

    def exchange() -> None:
        works = [dist.isend(other, 1 - rank), dist.irecv(received, 1 - rank)]
        for w in works:
            w.wait()
        torch.add(mine, received, out=out)

    def reduce_each() -> None:
        for w in [dist.reduce(x[r * n:(r + 1) * n], dst=r, async_op=True) for r in range(2)]:
            w.wait()

    def broadcast_each() -> None:
        for w in [dist.broadcast(x[r * n:(r + 1) * n], src=r, async_op=True) for r in range(2)]:
            w.wait()

    return {"all_reduce": lambda: dist.all_reduce(x),
            "reduce_scatter": lambda: reduce_scatter(out, x),
            "2x reduce": reduce_each, "send/recv + add": exchange,
            "all_gather": lambda: all_gather(x, mine),
            "broadcast per rank": broadcast_each}


def worker(rank: int, port: int, numel: int, reps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.randn(numel)
    times = {}
    for name, fn in _candidates(rank, x).items():
        for _ in range(2):
            fn()
        samples = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = samples
    if rank == 0:
        Path(out_path).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=32.0, help="bucket size (fp32)")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    numel = int(args.mib * 2**20 / 4) // 2 * 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        port = 29500 + os.getpid() % 1000
        mp.spawn(worker, args=(port, numel, args.reps, out), nprocs=2)
        times = json.loads(Path(out).read_text())
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    payload = {"benchmark": "gloo_collectives", "command": "python bench/gloo_collectives.py", "bucket_mib": args.mib,
               "reps": args.reps, "environment": environment(), "median_ms": ms, "seconds": times}
    write_json("gloo_collectives", payload)
    env = payload["environment"]
    text = "\n".join([
        f"# gloo collectives, 2 ranks, one {args.mib:g} MiB fp32 bucket\n",
        f"`{payload['command']}`; {env['cpu']}, torch {env['torch']}; medians of {args.reps} calls, one thread per "
        "rank.\n",
        "## Reduce-scatter (each rank ends with the sum of its half)\n",
        md_table(["way", "ms", "vs all_reduce"], [[n, ms[n], f"{ms[n] / ms['all_reduce']:.2f}x"] for n in REDUCE]),
        "\n## Gather (each rank ends with both halves)\n",
        md_table(["way", "ms"], [[n, ms[n]] for n in GATHER]), ""])
    write_markdown("gloo_collectives", text)
    grouped_bars("gloo_collectives", [
        ("reduce-scatter, 2 gloo ranks", "ms (median)", list(REDUCE), {"ms": [ms[n] for n in REDUCE]}, None),
        ("gather, 2 gloo ranks", "ms (median)", list(GATHER), {"ms": [ms[n] for n in GATHER]}, None)])
    print(text)


if __name__ == "__main__":
    sys.exit(main())
