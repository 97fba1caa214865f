"""Rank function for tests/test_low_precision.py: bf16 and int8 state under ZeRO-2 on any world size, and N->M
resume.

Every rank computes the same full-batch gradient and the optimizer does not reduce it (``reduce_grads=False``),
so each element sees the same gradient at any world size: the update must then be bitwise the same on 1, 2 and
3 ranks, whatever shard and bucket boundaries fall inside the parameters (a 1 KiB bucket cuts them everywhere).
The first weight has 4270 elements, so int8 keeps it in 8-bit blocks (the last one part padding) and the rest fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

STEPS, MORE = 5, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(70, 61), torch.nn.Tanh(), torch.nn.Linear(61, 5))


def _train(model: torch.nn.Module, opt: Any, steps: int, first: int) -> None:
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 70, generator=g), torch.randn(16, 5, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _snapshot(model: torch.nn.Module, opt: Any) -> dict[str, Any]:
    state = opt.state_dict()["state"]   # gathered, exported in fp32
    return {"params": [p.detach().numpy().copy() for p in model.parameters()],
            "state": {f"{i}.{k}": v.numpy().copy() for i, e in state.items() for k, v in e.items() if k != "step"}}


def _optimizer(model: torch.nn.Module, algorithm: str, precision: str) -> Any:
    from sharded_optim import ShardedOptimizer
    extra = {"amsgrad": True} if algorithm == "adamod" else {}
    return ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=1e-2, zero_stage=2, reduce_grads=False,
                            bucket_mb=1 / 1024, kernel="eager", state_precision=precision, **extra)


def scenarios(rank: int, world: int, directory: str, resume_from: str | None) -> dict[str, Any]:
    """``{"<algorithm> <precision> trained": snapshot after STEPS, "... continued": after STEPS + MORE,
    "... resumed": the same, from the checkpoint in ``resume_from`` (saved at another world size), "... into fp32":
    that checkpoint loaded into fp32 state}``;
    saves this world's checkpoint of each algorithm and precision at STEPS under ``directory``."""
    from sharded_optim import checkpoint
    from tests.support.scenarios import Scenarios

    out = Scenarios()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as every spawned rank: a matmul's gradient bits depend on the thread count
    try:
        _run_all(out, directory, resume_from)
    finally:
        torch.set_num_threads(threads)
    return out


def _run_all(out: Any, directory: str, resume_from: str | None) -> None:
    from sharded_optim import checkpoint

    for algorithm in ("adamw", "adamod"):
        for precision in ("bf16", "int8"):
            name = f"{algorithm} {precision}"
            model = _model()
            opt = _optimizer(model, algorithm, precision)
            _train(model, opt, STEPS, 0)
            out[f"{name} trained"] = _snapshot(model, opt)
            checkpoint.save(Path(directory) / name, model, opt, step=STEPS)
            _train(model, opt, MORE, STEPS)
            out[f"{name} continued"] = _snapshot(model, opt)
            if resume_from is not None:
                model = _model()
                opt = _optimizer(model, algorithm, precision)
                assert checkpoint.load(Path(resume_from) / name, model, opt)["step"] == STEPS
                _train(model, opt, MORE, STEPS)
                out[f"{name} resumed"] = _snapshot(model, opt)
                # the same checkpoint into fp32 state: 256-element buckets cut the parameters inside blocks
                model = _model()
                opt = _optimizer(model, algorithm, "fp32")
                checkpoint.load(Path(resume_from) / name, model, opt)
                out[f"{name} into fp32"] = _snapshot(model, opt)


def same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the tensors of two snapshots that are not bitwise equal."""
    bad = [f"param {i}" for i, (x, y) in enumerate(zip(a["params"], b["params"])) if not np.array_equal(x, y)]
    return bad + [k for k in a["state"] if not np.array_equal(a["state"][k], b["state"].get(k))]
