"""Rank functions for tests/test_silent.py: ranks that disagree, damaged checkpoints on 2 gloo ranks."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sharded_optim import ShardedOptimizer, checkpoint
from sharded_optim.agreement import AgreementError
from sharded_optim.checkpoint import CheckpointCorruptError
from tests.support import ckpt_scenarios as S


def _params(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def disagreements(rank: int, world: int) -> dict[str, Any]:
    """Each case builds a ZeRO-2 optimizer that differs between the ranks in one item; returns, per case, the
    error message (None: accepted) and the seconds it took."""
    x, y, z = _params(0, [(4, 3), (5,), (4, 3)])  # the same values on every rank (replicated parameters)
    mine = rank == 1
    cases: dict[str, Any] = {
        "identical": lambda: ShardedOptimizer([x, y], lr=1e-3, kernel="eager"),
        "order": lambda: ShardedOptimizer([y, x] if mine else [x, y], lr=1e-3, kernel="eager"),
        "order_same_shapes": lambda: ShardedOptimizer([z, x] if mine else [x, z], lr=1e-3, kernel="eager"),
        "count": lambda: ShardedOptimizer([x, y, z] if mine else [x, y], lr=1e-3, kernel="eager"),
        "shapes": lambda: ShardedOptimizer([torch.nn.Parameter(x.detach().reshape(3, 4)) if mine else x, y],
                                           lr=1e-3, kernel="eager"),
        "algorithm": lambda: ShardedOptimizer([x, y], algorithm="adamax" if mine else "adamw", lr=1e-3,
                                              kernel="eager"),
        "lr": lambda: ShardedOptimizer([x, y], lr=2e-3 if mine else 1e-3, kernel="eager"),
        "betas": lambda: ShardedOptimizer([x, y], betas=(0.9, 0.99) if mine else (0.9, 0.999), lr=1e-3,
                                          kernel="eager"),
    }
    out: dict[str, Any] = {}
    for name, build in cases.items():
        t0 = time.perf_counter()
        try:
            build()
            out[name] = {"error": None}
        except AgreementError as exc:
            out[name] = {"error": str(exc)}
        out[name]["seconds"] = time.perf_counter() - t0
    # agreed at construction, then one rank adds a param group with another lr
    opt = ShardedOptimizer([x], lr=1e-3, kernel="eager")
    t0 = time.perf_counter()
    try:
        opt.add_param_group({"params": [y], "lr": 5e-3 if mine else 1e-3})
        out["add_param_group"] = {"error": None}
    except AgreementError as exc:
        out["add_param_group"] = {"error": str(exc)}
    out["add_param_group"]["seconds"] = time.perf_counter() - t0
    # the group still works after the refusals: an agreeing optimizer steps
    for p in (x, y):
        p.grad = torch.ones_like(p)
    ShardedOptimizer([x, y], lr=1e-3, kernel="eager").step()
    out["stepped"] = bool(torch.isfinite(x).all())
    return out


def _flip(path: Path, at: float, bit: int = 6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _damage(ckpt: Path, how: str) -> None:
    if how == "shard_bit":  # an exponent bit in the middle of rank 0's data file
        _flip(ckpt / "__0_0.distcp", 0.5)
    elif how == "metadata_bit":
        _flip(ckpt / ".metadata", 0.6)
    elif how == "meta_json_digit":  # a digit of a number (the step) in meta.json: still valid JSON
        text = (ckpt / "meta.json").read_text()
        at = text.index('"step": 4') + len('"step": ')
        (ckpt / "meta.json").write_text(text[:at] + "5" + text[at + 1:])
    elif how == "rng_bit":
        _flip(ckpt / "rng" / "rank_00001.json", 0.5, bit=0)
    elif how == "truncated_shard":
        data = (ckpt / "__1_0.distcp").read_bytes()
        (ckpt / "__1_0.distcp").write_bytes(data[: len(data) * 2 // 3])
    elif how == "missing_metadata":
        (ckpt / ".metadata").unlink()
    else:
        raise ValueError(how)


DAMAGES = ("shard_bit", "metadata_bit", "meta_json_digit", "rng_bit", "truncated_shard", "missing_metadata")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bitwise equality of two ckpt_scenarios snapshots (state, groups, model)."""
    if a["groups"] != b["groups"] or sorted(a["state"]) != sorted(b["state"]):
        return False
    for i, entry in a["state"].items():
        if any(not np.array_equal(v, b["state"][i][k]) for k, v in entry.items()):
            return False
    return all(np.array_equal(v, b["model"][k]) for k, v in a["model"].items())


def damaged_checkpoints(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save step_2 and step_4 on 2 ranks; damage step_4 in each way in turn; per damage: the direct load is
    refused on this rank with nothing changed, ``latest=True`` falls back to step_2 (naming step_4), and
    ``fallback=False`` refuses.  Also: the format-1 fixture loads at world size 2."""
    ck = Path(root) / "ck"
    model, opt = S.build("amsgrad_z2", seed=1)
    S.train(model, opt, range(2), rank)
    checkpoint.save(ck / "step_2", model, opt, step=2)
    at_2 = S.snapshot(model, opt)
    S.train(model, opt, range(2, 4), rank)
    checkpoint.save(ck / "step_4", model, opt, step=4)
    pristine = Path(root) / "pristine_4"
    if rank == 0:
        shutil.copytree(ck / "step_4", pristine)
    out: dict[str, Any] = {}
    for how in DAMAGES:
        if rank == 0:
            shutil.rmtree(ck / "step_4")
            shutil.copytree(pristine, ck / "step_4")
            (ck / "latest").write_text("step_4\n")
            _damage(ck / "step_4", how)
        dist.barrier()
        S.train(model, opt, range(10, 11), rank)  # live state that differs from both checkpoints
        before = S.snapshot(model, opt)
        r: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            checkpoint.load(ck / "step_4", model, opt)
            r["direct"] = None
        except CheckpointCorruptError as exc:
            r["direct"] = str(exc)
        r["seconds"] = time.perf_counter() - t0
        r["unchanged"] = _same(before, S.snapshot(model, opt))
        try:
            checkpoint.load(ck, model, opt, latest=True, fallback=False)
            r["no_fallback"] = None
        except CheckpointCorruptError as exc:
            r["no_fallback"] = str(exc)
        r["unchanged_after_no_fallback"] = _same(before, S.snapshot(model, opt))
        info = checkpoint.load(ck, model, opt, latest=True)
        r["path"], r["skipped"], r["step"] = info["path"], info["skipped"], info["step"]
        r["equals_step_2"] = _same(at_2, S.snapshot(model, opt))
        out[how] = r
    # a format-1 checkpoint (written by the ShardedTensor code at world size 2) still loads, RNG included
    fixture = Path(__file__).resolve().parents[1] / "data" / "ckpt_v1"
    torch.manual_seed(0)  # replicated parameters, as ZeRO requires (the load replaces them)
    m1 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    o1 = ShardedOptimizer(m1.parameters(), algorithm="adamw", lr=0.05, zero_stage=2, bucket_mb=40 / 2**20,
                          kernel="eager", amsgrad=True)
    info = checkpoint.load(fixture / "step_3", m1, o1)
    sd = o1.state_dict()
    out["v1"] = {"info": info, "model": {k: v.numpy().copy() for k, v in m1.state_dict().items()},
                 "state": {i: {k: v.numpy().copy() for k, v in e.items()} for i, e in sd["state"].items()}}
    return out
