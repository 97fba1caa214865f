"""What clients do to an optimizer's parameters and checkpoints, as rank functions (run on 1 or 2 gloo ranks).

Every scenario trains the small MLP of ``tests/test_zero.py`` on synthetic gradients (each rank its own), so two
runs that differ only in *how* the same values reached the parameters must end bit for bit equal.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import sharded_optim as so
from sharded_optim.consolidate import ConsolidationError
from tests.support.scenarios import Scenarios, zero

STEPS, SWITCH_AT = 4, 2
HOWS = ("in_place", "data", "swap", "assign")
TINY_BUCKET_MB = 0.0005  # several buckets, parameters straddling ranks and buckets


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5)).to(dtype)


def grads(model: torch.nn.Module, rank: int, step: int) -> None:
    for i, p in enumerate(model.parameters()):
        g = torch.Generator().manual_seed(10_000 * step + 100 * rank + i)
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def new_values(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the client puts into the parameters at SWITCH_AT (fresh tensors, values the optimizer never saw)."""
    return [p.detach() * 0.5 + 0.01 for p in model.parameters()]


def replace(model: torch.nn.Module, how: str) -> None:
    """Put new_values() into the parameters, the way a client would."""
    values = new_values(model)
    if how == "in_place":   # the reference: a write through the existing storage
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)
    elif how == "data":
        for p, v in zip(model.parameters(), values):
            p.data = v.clone()
    elif how == "swap":   # load_state_dict(assign=True) with swap_tensors: same Parameter objects, new storage
        sd = dict(zip(model.state_dict(), (v.clone() for v in values)))
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.load_state_dict(sd, assign=True)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
    elif how == "assign":   # plain assign=True: new Parameter objects, the optimizer keeps the old ones
        model.load_state_dict(dict(zip(model.state_dict(), (v.clone() for v in values))), assign=True)
    else:
        raise ValueError(how)


def train(rank: int, world: int, how: str, make_opt: Callable[[Any], Any], stage: int = 2) -> dict:
    model = make_model()
    opt = make_opt(model.parameters()) if make_opt is not None else so.ShardedOptimizer(
        model.parameters(), "adamw", lr=1e-2, zero_stage=stage, bucket_mb=TINY_BUCKET_MB, kernel="eager")
    for step in range(STEPS):
        if step == SWITCH_AT:
            switched = [v.numpy().copy() for v in new_values(model)]
            replace(model, how)
        opt.zero_grad()
        grads(model, rank, step)
        opt.step()
    out = {"params": [p.detach().numpy().copy() for p in model.parameters()], "switched": switched}
    if isinstance(opt, so.ShardedOptimizer):
        runtimes = [rt for _, rt in opt._all_runtimes()]
        out["rebinds"] = sum(rt.rebinds for rt in runtimes)
        # every parameter the optimizer holds is again a view of its runtime's flat buffer
        out["views"] = all(rt.full.data_ptr() <= p.data_ptr() < rt.full.data_ptr() + rt.full.numel() * 4
                           for rt in runtimes for p in rt.params)
    return out


def plain(obj: Any) -> Any:
    """Tensors as numpy arrays, recursively (results cross process boundaries as plain data)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def error_of(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except (RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def dtype_scenarios(rank: int, world: int, stage: int) -> Scenarios:
    """Casting the model after construction: rebuilt before the first step, refused by name otherwise."""
    out = Scenarios()

    def run(cast_before_build: bool, reduce_grads: bool) -> list[np.ndarray]:
        model = make_model()
        if cast_before_build:
            model.double()
        opt = so.ShardedOptimizer(model.parameters(), "adamw", lr=1e-2, zero_stage=stage, reduce_grads=reduce_grads,
                                  bucket_mb=TINY_BUCKET_MB, kernel="eager")
        opt.memory_report()  # builds the flat buffers now, as a sharded optimizer always does
        model.double()
        for step in range(STEPS):
            opt.zero_grad()
            grads(model, rank, step)
            opt.step()
        return [p.detach().numpy().copy() for p in model.parameters()]

    # no gradient hooks (DDP-style reduce_grads=False, or one process): rebuilt at the first step
    out["rebuilt"] = run(False, reduce_grads=False)
    out["built_double"] = run(True, reduce_grads=False)
    if world > 1:  # the hooks of a sharded optimizer reduce into float32 buckets: refused during backward
        model = make_model()
        opt = so.ShardedOptimizer(model.parameters(), "adamw", zero_stage=stage, bucket_mb=TINY_BUCKET_MB,
                                  kernel="eager")
        model.double()
        out["hooks_error"] = error_of(lambda: (model(torch.randn(4, 13, dtype=torch.float64)).sum().backward(),
                                               opt.step()))
    # after steps: refused by name
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), "adamw", zero_stage=stage, reduce_grads=False,
                              bucket_mb=TINY_BUCKET_MB, kernel="eager")
    grads(model, rank, 0)
    opt.step()
    model.double()
    grads(model, rank, 1)
    out["after_steps_error"] = error_of(opt.step)
    # a shape change: refused by name
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), "adamw", zero_stage=stage, bucket_mb=TINY_BUCKET_MB, kernel="eager")
    opt.memory_report()
    model[2].bias.data = torch.zeros(7)
    out["shape_error"] = error_of(opt.step)
    return out


def state_dict_scenarios(rank: int, world: int) -> Scenarios:
    """state_dict() on rank 0 alone: an error within the timeout; after consolidation: the collective result.
    Keyed by optimizer ("ShardedOptimizer", "Lookahead"), then by what was measured ("alone_error", ...)."""
    out = Scenarios()
    model = make_model()
    inner = so.ShardedOptimizer(model.parameters(), "adamod", lr=1e-2, bucket_mb=TINY_BUCKET_MB, kernel="eager")
    la = so.Lookahead(inner, k=2)
    for opt in (inner, la):
        mine = out[type(opt).__name__] = Scenarios()
        inner.state_dict_timeout_s = 2.0
        for step in range(3):
            opt.zero_grad()
            grads(model, rank, step)
            opt.step()
        collective = opt.state_dict()  # every rank: the gathering call
        if rank == 0:
            start = time.perf_counter()
            mine["alone_error"] = error_of(opt.state_dict)
            mine["alone_seconds"] = time.perf_counter() - start
        dist.barrier()
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            mine["consolidated"] = plain(opt.state_dict())
            mine["collective"] = plain(collective)
        dist.barrier()
        opt.zero_grad()
        grads(model, rank, 3)
        opt.step()   # the consolidated copy is stale now: rank 0 alone must fail again
        if rank == 0:
            mine["stale_error"] = error_of(opt.state_dict)
        dist.barrier()
        if opt is la:
            out["slow_numel"] = [t.numel() for t in la._slow.values()]
            out["local_numel"] = [rt.layout.local_numel for _, rt in inner._all_runtimes()]
            out["total_numel"] = [rt.layout.total_numel for _, rt in inner._all_runtimes()]
    out["bad_to"] = error_of(lambda: inner.consolidate_state_dict(to=world))
    return out


def stages(world: int) -> tuple[int, ...]:
    """The ZeRO stages the storage scenarios run at on ``world`` ranks (one process: stage 2 is the local path)."""
    return (1, 2) if world > 1 else (2,)


def all_scenarios(rank: int, world: int) -> Scenarios:
    """Every client scenario on this rank, named as it reads: "assign zero-2", "swap torch.optim" (one process:
    what torch.optim does with the same client), "dtype zero-1", "state_dict" (2 ranks)."""
    out = Scenarios()
    for stage in stages(world):
        for how in HOWS:
            out[zero(how, stage)] = train(rank, world, how, None, stage)
            if world == 1:  # what torch.optim does with the same client
                out[f"{how} torch.optim"] = train(rank, world, how,
                                                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False))
        out[zero("dtype", stage)] = dtype_scenarios(rank, world, stage)
    if world > 1:
        out["state_dict"] = state_dict_scenarios(rank, world)
    return out
