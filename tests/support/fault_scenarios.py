"""Rank functions for the fault tests: non-finite gradients, gradient spikes, a rank that hangs."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.support import ckpt_scenarios as S
from tests.support.scenarios import Scenarios


def _live(model: Any, opt: Any) -> dict[str, torch.Tensor]:
    """Parameters and this rank's state shards (the buffers the update writes), copied."""
    out = {f"p.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, (_, rt) in enumerate(opt._all_runtimes()):
        out[f"master.{i}"] = rt.master.clone()
        out.update({f"state.{i}.{k}": v.clone() for k, v in rt.state.items()})
        out[f"steps.{i}"] = rt.steps.clone()
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(model: Any, opt: Any, rank: int, seed: int, scale_on: dict[int, float] | None = None) -> None:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(seed * 10 + rank))
    loss = model(x).square().mean()
    if scale_on and rank in scale_on:
        loss = loss * scale_on[rank]
    loss.backward()
    opt.step()
    opt.zero_grad()


def policies(rank: int, world: int, flag_dir: str) -> Scenarios:
    """Per config ("adamw_z1", "amsgrad_z2"): "skip adamw_z1", "raise adamw_z1", "spike adamw_z1"; and "hang"."""
    out = Scenarios()
    for stage_name in ("adamw_z1", "amsgrad_z2"):
        # skip: NaN on rank 1 only -> every rank skips, nothing changes, the counter moves
        model, opt = S.build(stage_name, nonfinite_policy="skip")
        for s in range(2):
            _step(model, opt, rank, s)
        before = _live(model, opt)
        _step(model, opt, rank, 2, {1: float("nan")})
        out[f"skip {stage_name}"] = {"unchanged": _same(before, _live(model, opt)),
                                     "skipped": dict(opt.skipped_steps)}
        _step(model, opt, rank, 3)
        out[f"skip {stage_name}"]["next_step_taken"] = not _same(before, _live(model, opt))
        out[f"skip {stage_name}"]["finite"] = all(bool(torch.isfinite(t).all()) for t in
                                                  _live(model, opt).values() if t.is_floating_point())
        # raise: FloatingPointError on every rank, nothing changes
        model, opt = S.build(stage_name, nonfinite_policy="raise")
        _step(model, opt, rank, 0)
        before = _live(model, opt)
        try:
            _step(model, opt, rank, 1, {0: float("inf")})
            out[f"raise {stage_name}"] = {"raised": None}
        except FloatingPointError as exc:
            opt.zero_grad()
            out[f"raise {stage_name}"] = {"raised": str(exc)}
        out[f"raise {stage_name}"]["unchanged"] = _same(before, _live(model, opt))
        # spike: 12 ordinary steps, then a gradient 1000x larger on rank 0 only
        model, opt = S.build(stage_name, spike_sigma=3.0, spike_window=8)
        for s in range(12):
            _step(model, opt, rank, s)
        normal = dict(opt.skipped_steps)
        before = _live(model, opt)
        _step(model, opt, rank, 12, {0: 1000.0})
        spiked = {"normal_phase": normal, "after_spike": dict(opt.skipped_steps),
                  "unchanged": _same(before, _live(model, opt))}
        _step(model, opt, rank, 13)
        spiked["after_next"] = dict(opt.skipped_steps)
        out[f"spike {stage_name}"] = spiked
    out["hang"] = hang(rank, flag_dir)
    return out


def hang(rank: int, flag_dir: str) -> dict[str, Any]:
    """Rank 1 stops taking part (it waits for a flag rank 0 sets after its error); rank 0's step must fail with a
    timeout error once the process group's timeout has passed, not hang."""
    flag = Path(flag_dir) / "rank0_done"
    model, opt = S.build("adamw_z1")
    _step(model, opt, rank, 0)
    dist.barrier()
    if rank == 1:
        deadline = time.monotonic() + 120
        while not flag.exists() and time.monotonic() < deadline:  # a stuck rank, bounded so the test ends
            time.sleep(0.05)
        return {"released": flag.exists()}
    start = time.monotonic()
    try:
        _step(model, opt, rank, 1)
        result: dict[str, Any] = {"error": None}
    except RuntimeError as exc:
        from sharded_optim.dist import DistInfo, describe_timeout
        info = DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, backend="gloo", launcher="test")
        result = {"error": str(exc), "described": describe_timeout(exc, info, 10.0)}
    result["seconds"] = time.monotonic() - start
    flag.touch()
    return result


def finite(x: float) -> bool:
    return math.isfinite(x)
