"""Models, optimizers and rank functions shared by the checkpoint tests (run in spawned ranks or in-process)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharded_optim import Lookahead, ShardedOptimizer
from sharded_optim import checkpoint

# name -> (algorithm, zero_stage, options, lookahead): every state key of the family appears at least once
CONFIGS: dict[str, tuple[str, int, dict[str, Any], bool]] = {
    "adamw_z1": ("adamw", 1, {}, False),
    "amsgrad_z2": ("adam", 2, {"amsgrad": True, "weight_decay": 0.01}, False),
    "nadam_z2": ("nadam", 2, {}, False),
    "adamod_z1": ("adamod", 1, {}, False),
    "adamax_z2": ("adamax", 2, {}, False),
    "lookahead_z2": ("adamw", 2, {}, True),
    "diffmod_z2": ("diffmod", 2, {"len_memory": 50}, False),   # previous_grad (and exp_avg_lr) resharded
}


class Net(torch.nn.Module):
    """1-D, 2-D, 3-D and 0-d parameters that straddle ranks and buckets.  Every group is large enough that every
    rank of 1..4 owns real elements of every bucket (a rank holding only padding trips an engine issue)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Linear(16, 40)
        self.cube = torch.nn.Parameter(torch.randn(3, 5, 7, generator=g) * 0.1)
        self.b = torch.nn.Linear(40, 24)
        self.gain = torch.nn.Parameter(torch.randn(800, generator=g) * 0.1)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.c = torch.nn.Linear(24, 4)
        with torch.no_grad():
            for p in (*self.a.parameters(), *self.b.parameters(), *self.c.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) + self.cube.sum(dim=(0, 2)).repeat(8) + self.gain.view(20, 40).mean(0)
        return self.c(torch.tanh(self.b(h))) * self.scale


BUCKET_MB = 4000 / 2**20  # 1000 fp32 elements: the decay group fills two buckets


def build(name: str, seed: int = 0, **overrides: Any) -> tuple[Net, Any]:
    algorithm, stage, options, lookahead = CONFIGS[name]
    model = Net(seed)
    groups = [{"params": [model.a.weight, model.cube, model.b.weight, model.c.weight], "name": "decay"},
              {"params": [model.a.bias, model.b.bias, model.gain, model.c.bias, model.scale], "weight_decay": 0.0,
               "name": "no_decay"}]
    opt = ShardedOptimizer(groups, algorithm=algorithm, lr=1e-2, zero_stage=stage, bucket_mb=BUCKET_MB,
                           kernel="eager", **{**options, **overrides})
    return model, (Lookahead(opt, k=3, alpha=0.5) if lookahead else opt)


def train(model: Net, opt: Any, steps: range, rank: int = 0, use_global_rng: bool = False) -> None:
    """Deterministic data: a function of (step, rank), or of the global RNG (to test that it is restored)."""
    for step in steps:
        if use_global_rng:
            x = torch.randn(6, 16)
        else:
            x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1000 * step + rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def inner(opt: Any) -> ShardedOptimizer:
    return opt.optimizer if isinstance(opt, Lookahead) else opt


def snapshot(model: Net, opt: Any) -> dict[str, Any]:
    """Everything a checkpoint must preserve, as numpy (bitwise comparable, picklable)."""
    sd = inner(opt).state_dict()
    state = {i: {k: v.detach().cpu().numpy().copy() for k, v in e.items()} for i, e in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    out = {"state": state, "groups": groups,
           "model": {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}}
    if isinstance(opt, Lookahead):
        out["slow"] = {i: t.numpy().copy() for i, t in opt.slow_state().items()}
        out["lookahead"] = (opt.k, opt.alpha, opt.inner_steps)
    return out


def save_all(rank: int, world: int, root: str, seed: int) -> dict[str, Any]:
    """Train every config 4 steps, save it under root/<world>/<name>, return the snapshots."""
    out = {}
    for name in CONFIGS:
        model, opt = build(name, seed)
        train(model, opt, range(4), rank)
        checkpoint.save(Path(root) / f"w{world}" / name, model, opt, step=4, extra={"name": name})
        out[name] = snapshot(model, opt)
    return out


def load_all(rank: int, world: int, root: str, saved_world: int) -> dict[str, Any]:
    """Load every config saved at ``saved_world`` into fresh (differently initialised) objects."""
    out = {}
    for name in CONFIGS:
        model, opt = build(name, seed=99)
        info = checkpoint.load(Path(root) / f"w{saved_world}" / name, model, opt)
        out[name] = {"snapshot": snapshot(model, opt), "info": info}
    return out


def save_and_load(rank: int, world: int, root: str, seed: int, load_from: int | None) -> dict[str, Any]:
    return {"saved": save_all(rank, world, root, seed),
            "loaded": None if load_from is None else load_all(rank, world, root, load_from)}


def union_state(per_rank: list[dict[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
    """The full state: every rank's state_dict has the gathered tensors, but (engine issue) only lists the
    parameters whose step counter advanced on that rank."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for snap in per_rank:
        for i, entry in snap["state"].items():
            out.setdefault(i, entry)
    return out


# ------------------------------------------------------------------------------------------ resume equivalence
RESUME_CONFIGS = ("adamw_z1", "nadam_z2", "lookahead_z2")


def resume_first_half(rank: int, world: int, root: str) -> dict[str, Any]:
    """40 steps straight, and 20 steps + save (data from the global RNG, so its restore matters)."""
    out = {}
    for name in RESUME_CONFIGS:
        torch.manual_seed(7 + rank)
        model, opt = build(name)
        train(model, opt, range(40), rank, use_global_rng=True)
        out[name] = snapshot(model, opt)
        torch.manual_seed(7 + rank)
        model, opt = build(name)
        train(model, opt, range(20), rank, use_global_rng=True)
        checkpoint.save(Path(root) / "resume" / name / "step_20", model, opt, step=20, keep_last=1)
        torch.manual_seed(12345)  # whatever the RNG holds now must not matter after the load
    return out


def resume_second_half(rank: int, world: int, root: str) -> dict[str, Any]:
    out = {}
    for name in RESUME_CONFIGS:
        model, opt = build(name, seed=5)
        info = checkpoint.load(checkpoint.latest(Path(root) / "resume" / name), model, opt)
        assert info["rng_restored"] and info["step"] == 20, info
        train(model, opt, range(20, 40), rank, use_global_rng=True)
        out[name] = snapshot(model, opt)
    return out


def spawn_a(rank: int, world: int, root: str) -> dict[str, Any]:
    """World 2, first group: save S2, load S1 (saved without a process group), first half of resume."""
    return {"saved": save_all(rank, world, root, 2), "loaded": load_all(rank, world, root, 1),
            "resume": resume_first_half(rank, world, root)}


def spawn_b(rank: int, world: int, root: str) -> dict[str, Any]:
    """World 3: save S3, load S2."""
    return {"saved": save_all(rank, world, root, 3), "loaded": load_all(rank, world, root, 2)}


def spawn_c(rank: int, world: int, root: str) -> dict[str, Any]:
    """World 2, a fresh group: load S3, second half of resume."""
    return {"loaded": load_all(rank, world, root, 3), "resume": resume_second_half(rank, world, root)}


def spawn_d(rank: int, world: int, root: str) -> dict[str, Any]:
    """World 4: save S4."""
    return {"saved": save_all(rank, world, root, 4)}
