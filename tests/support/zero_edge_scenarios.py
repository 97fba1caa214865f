"""Rank function for tests/test_zero_edge_cases.py: the ZeRO edge cases it checks, run on every rank."""
from __future__ import annotations

import traceback

import torch

from tests.support.scenarios import Scenarios


def scenarios(rank: int, world: int) -> Scenarios:
    """"padding_only_rank" (None, or the traceback), "state_keys", "weights_after_lr0_step"."""
    from sharded_optim import ShardedOptimizer

    out = Scenarios()
    # 1. a param group so small that rank 1 holds only padding
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = ShardedOptimizer(model.parameters(), kernel="eager", lr=0.1)
    try:
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        out["padding_only_rank"] = None
    except Exception:
        out["padding_only_rank"] = traceback.format_exc(limit=3)
    # 2. state_dict() after steps: the same parameters on every rank?
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.Linear(10, 20))
    opt = ShardedOptimizer(model.parameters(), kernel="eager", lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
        opt.zero_grad()
    out["state_keys"] = sorted(opt.state_dict()["state"])
    # 3. model.load_state_dict after the optimizer exists: does the next step start from the loaded weights?
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(zeros)
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["weight_decay"] = 0.0
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    out["weights_after_lr0_step"] = float(sum(p.detach().abs().sum() for p in model.parameters()))
    return out
