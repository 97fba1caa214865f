"""ShardedOptimizer on FSDP2 (``fully_shard``) DTensor parameters: real gloo ranks, real fully_shard, real DCP.

One spawned 2-rank group runs every 1-D check (spawning costs seconds here), one 4-rank group the 2x2 HSDP
check.  Each rank compares against references it computes itself in the same process without any sharding:
the same model (same initial weights) trained on the whole global batch by ``torch.optim.AdamW`` (adamw) or by
our own optimizer on plain tensors (adamod, amsgrad, radam).  The workers return measured differences; the
assertions live here.

Tolerances: FSDP2 averages two half-batch gradient means where the reference takes one full-batch mean, so
gradients differ by float32 rounding (~1e-7 relative on the whole vector, checked against GRAD_RTOL).  The
optimizers are then teacher-forced with the reference gradient (ALGORITHMS.md section 15.1), so parameters and
state differ only by the optimizers' own rounding (none when both are ours; a few ulps per step against
torch.optim.AdamW).  ``|diff| <= ATOL + RTOL*|ref|`` with ATOL = 1e-5, RTOL = 1e-4 and lr = 1e-2 still catches one
missed or doubled step (1e-2) or a wrong bias correction (~lr).  Checkpoint resumption is compared bitwise.
"""
from __future__ import annotations

import math
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from tests.support.multiproc import run_ranks as _run_ranks
from tests.support.scenarios import Scenarios

pytestmark = pytest.mark.slow

LR = 1e-2
STEPS = 4
ATOL, RTOL = 1e-5, 1e-4
# ||g_fsdp - g_ref|| / ||g_ref||: float32 rounding of two half-batch means against one full-batch mean, through a
# forward and backward whose longest reductions sum ~50 terms: k * 2**-24 with k ~ 50 is ~3e-6; measured ~1e-7.
# Averaging over the wrong ranks or a missing half-batch gives errors of order 1.
GRAD_RTOL = 1e-5
VOCAB, D, SEQ, BATCH = 13, 12, 6, 4   # VOCAB and the MLP width are odd: uneven shards on 2 ranks


class TinyTransformer(nn.Module):
    """One pre-norm transformer block over a byte-like vocabulary, with shapes chosen to shard unevenly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.1)
        self.norm1 = nn.LayerNorm(D)
        # no attention biases: the key bias gets a gradient that is zero up to rounding (softmax ignores a shift
        # shared by all keys), and Adam would amplify that rounding noise to steps of size lr
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, bias=False)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D + 1), nn.GELU(), nn.Linear(2 * D + 1, D))
        self.head = nn.Linear(D, VOCAB)
        self.gate = nn.Parameter(torch.ones(1))   # one row: rank 1 holds an empty (0-element) shard

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.norm1(x)
        mask = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)
        x = x + self.gate * self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def make_model(seed: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def batches(n: int) -> list[torch.Tensor]:
    """Counting sequences (next token = previous + 1 mod VOCAB) from random starts: learnable in a few steps."""
    g = torch.Generator().manual_seed(1234)
    return [(torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB for _ in range(n)]


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.mlp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_rows(batch: torch.Tensor, index: int, count: int) -> torch.Tensor:
    per = batch.shape[0] // count
    return batch[index * per: (index + 1) * per]


# ----------------------------------------------------------------------------------------- rank plumbing
def run_ranks(fn: Callable[..., dict], world: int, *args: Any) -> list[dict]:
    """Spawned gloo ranks with the eager kernel: compiling per rank costs ~10 s and the math is the same function."""
    return _run_ranks(fn, world, *args, timeout=240, env={"SHARDED_OPTIM_KERNEL": "eager"})


def _guard(out: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one scenario; keep its traceback as its result so the other scenarios still report."""
    try:
        out[name] = fn()
    except Exception:
        out[name] = {"error": traceback.format_exc()}


# ------------------------------------------------------------------------------------------- scenarios
def _in_place(fn: Callable[[], Any], threshold: int = 1) -> Any:
    """Run a scenario with every same-dtype shard of at least ``threshold`` elements per rank updated in place (no
    copies of gradients or parameters); by default every shard."""
    from sharded_optim import zero
    saved = dict(zero.DIRECT_MIN_NUMEL)
    zero.DIRECT_MIN_NUMEL["cpu"] = threshold
    try:
        return fn()
    finally:
        zero.DIRECT_MIN_NUMEL.update(saved)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst ``|a - b| / (ATOL + RTOL * |b|)`` (<= 1 is close): relative, because AdaMod's ``exp_avg_lr`` holds
    values near ``lr / eps`` where moments are tiny, absolute for values near zero."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).abs() / (ATOL + RTOL * b.abs())).max()) if a.numel() else 0.0


def _train_pair(mesh: Any, dp_rank: int, dp_size: int, algorithm: str, reference: str,
                **opt_kwargs: Any) -> dict:
    """Train the sharded model with our optimizer and a plain copy with the reference; return differences.

    Teacher-forced (ALGORITHMS.md section 15.1): each step both models compute their own gradients, which are
    compared (the FSDP reduction against the full-batch mean), then the sharded model's gradient shards are
    overwritten with the reference's gradients, so both optimizers see the same inputs and only the optimizer is
    compared.  Free-running, gradient rounding differences (float32, ~1e-7 relative on the vector, but unbounded
    relative error on elements where contributions cancel) reach AdaMod's ``exp_avg_lr ~ lr / (sqrt(v) + eps)``
    through ``v`` with no bound at all, which made the comparison depend on the machine's instruction set.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from sharded_optim import ShardedOptimizer
    ref_model = make_model(0)
    model = shard(make_model(0), mesh)
    opt = ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=LR, zero_stage=0, **opt_kwargs)
    if reference == "torch":
        ref_opt: torch.optim.Optimizer = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=1e-2)
    else:
        ref_opt = ShardedOptimizer(ref_model.parameters(), algorithm=algorithm, lr=LR, zero_stage=0,
                                   **opt_kwargs)
    named, ref_named = dict(model.named_parameters()), dict(ref_model.named_parameters())
    norm_diffs, grad_errs, losses = [], [], []
    for batch in batches(STEPS):
        loss_of(model, local_rows(batch, dp_rank, dp_size)).backward()
        ref_loss = loss_of(ref_model, batch)
        ref_loss.backward()
        # the FSDP gradient against the full-batch one, as whole vectors (elementwise relative errors of cancelling
        # elements mean nothing); then teacher-force: the shards take the reference gradient's values
        diff_sq = ref_sq = 0.0
        for name, p in named.items():
            ref_grad = ref_named[name].grad
            diff_sq += float((p.grad.full_tensor() - ref_grad).double().square().sum())
            ref_sq += float(ref_grad.double().square().sum())
            p.grad.to_local().copy_(distribute_tensor(ref_grad, p.device_mesh, p.placements,
                                                      src_data_rank=None).to_local())
        grad_errs.append(math.sqrt(diff_sq / ref_sq))
        norm = float(opt.clip_grad_norm_(1e9))   # the optimizer's global norm (sums over the shard group only)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1e9))
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        norm_diffs.append(abs(norm - ref_norm) / ref_norm)
        losses.append(float(ref_loss.detach()))
    params, ref_params = dict(model.named_parameters()), dict(ref_model.named_parameters())
    param_err = max(_err(p.full_tensor(), ref_params[n]) for n, p in params.items())
    state_err, kinds, dtypes = 0.0, set(), set()
    for name, p in params.items():
        for key, value in opt.state[p].items():
            if key == "step":
                assert int(value) == STEPS, (name, int(value))
                continue
            assert isinstance(value, DTensor), (name, key, type(value))
            assert value.placements == p.placements and value.device_mesh == p.device_mesh, (name, key)
            assert value.to_local().shape == p.to_local().shape, (name, key)
            kinds.add(key)
            dtypes.add(str(value.dtype))
            state_err = max(state_err, _err(value.full_tensor(), ref_opt.state[ref_params[name]][key]))
    local_numel = sum(p.to_local().numel() for p in params.values())
    return {"param_err": param_err, "state_err": state_err, "norm_rel_diff": max(norm_diffs),
            "grad_rel_err": max(grad_errs),
            "in_place_slots": sum(len(rt._direct_slots) for rts in opt._runtimes.values() for rt in rts),
            "native": [rt.native for rts in opt._runtimes.values() for rt in rts],
            "state_keys": sorted(kinds), "state_dtypes": sorted(dtypes), "local_numel": local_numel,
            "state_bytes": opt.memory_report()["state_bytes"], "losses": losses,
            "empty_shards": [n for n, p in params.items() if p.to_local().numel() == 0],
            "uneven": [n for n, p in params.items() if p.shape[0] % dp_size]}


def _nonfinite_skip(mesh: Any, rank: int) -> dict:
    """A NaN in one rank's gradient shard makes every rank skip the step (the check sums over the group)."""
    from sharded_optim import ShardedOptimizer
    model = shard(make_model(0), mesh)
    opt = ShardedOptimizer(model.parameters(), lr=LR, zero_stage=0)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    loss_of(model, batches(1)[0]).backward()
    if rank == 0:
        model.embed.weight.grad.to_local()[0, 0] = float("nan")
    opt.step()
    changed = sum(not torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    return {"skipped": opt.skipped_steps["nonfinite"], "changed": changed}


def _dcp_resume(mesh: Any, rank: int, directory: str, algorithm: str, dtype: torch.dtype, zero_stage: int,
                **opt_kwargs: Any) -> dict:
    """Save after 2 steps, continue 2; a fresh model + optimizer loaded from the checkpoint continues the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from sharded_optim import ShardedOptimizer
    data = batches(4)

    def build(seed: int):
        model = shard(make_model(seed).to(dtype), mesh)
        return model, ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=LR, zero_stage=zero_stage,
                                       **opt_kwargs)

    def train(model, opt, steps):
        for batch in steps:
            loss_of(model, local_rows(batch, rank, 2)).backward()
            opt.step()
            opt.zero_grad()

    def snapshot(model, opt) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in model.named_parameters():
            out[n] = p.to_local().clone()
            for k, v in opt.state[p].items():
                out[f"{n}/{k}"] = (v.to_local() if hasattr(v, "to_local") else v).clone()
        return out

    model, opt = build(0)
    train(model, opt, data[:2])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=directory)
    saved_osd = get_optimizer_state_dict(model, opt)
    train(model, opt, data[2:])
    uninterrupted = snapshot(model, opt)

    model2, opt2 = build(7)   # other initial weights: only a real load can make it match
    target = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=directory)
    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    steps_after_load = sorted({int(opt2.state[p]["step"]) for p in model2.parameters()})
    train(model2, opt2, data[2:])
    resumed = snapshot(model2, opt2)
    mismatched = [k for k in uninterrupted if not torch.equal(uninterrupted[k], resumed[k])]
    state_types = sorted({type(v).__name__ for e in saved_osd["state"].values() for k, v in e.items()
                          if k not in ("step", "mu_product")})
    return {"mismatched": mismatched, "compared": len(uninterrupted), "steps_after_load": steps_after_load,
            "state_types": state_types, "saved_keys": sorted(next(iter(saved_osd["state"].values())))}


def _int8_state(mesh: Any, directory: str) -> dict:
    """int8 state on FSDP2: a 47x256 weight (rows of one block, uneven row shards) keeps 8-bit state, the rest
    fp32.  Teacher-forced against the unsharded optimizer with int8 state (same blocks: FSDP2 shards whole rows),
    statistics every other step; then a checkpoint of this module and a state_dict round trip into fresh ones."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from sharded_optim import ShardedOptimizer, checkpoint
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(256, 47), nn.Tanh(), nn.Linear(47, 5))
    kw = dict(algorithm="adamw", lr=LR, zero_stage=0, state_precision="int8", stats_interval=2)

    def build(seed: int) -> tuple[nn.Module, Any]:
        torch.manual_seed(seed)
        model = fully_shard(copy.deepcopy(ref) if seed == 0 else nn.Sequential(
            nn.Linear(256, 47), nn.Tanh(), nn.Linear(47, 5)), mesh=mesh)
        return model, ShardedOptimizer(model.parameters(), **kw)
    model, opt = build(0)
    ref_opt = ShardedOptimizer(ref.parameters(), **kw)
    for step in range(STEPS):
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(step))
        ref(x).square().mean().backward()
        model(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad.to_local().copy_(distribute_tensor(q.grad, p.device_mesh, p.placements,
                                                      src_data_rank=None).to_local())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]

    def differing(a: dict, b: dict) -> list[str]:
        return [f"{i}.{k}" for i in b for k, v in b[i].items() if k != "step" and not torch.equal(
            a[i][k].full_tensor() if hasattr(a[i][k], "full_tensor") else a[i][k], v)]
    weight = next(model.parameters())
    out = {"state_dtype": str(opt.state[weight]["exp_avg"].dtype),
           "params_differ": [n for (n, p), q in zip(model.named_parameters(), ref.parameters())
                             if not torch.equal(p.full_tensor(), q)],
           "state_differs": differing(mine, theirs)}
    checkpoint.save(Path(directory) / "int8", model, opt, step=STEPS)
    model2, opt2 = build(7)
    checkpoint.load(Path(directory) / "int8", model2, opt2)
    out["checkpoint_state_differs"] = differing(opt2.state_dict()["state"], theirs)
    model3, opt3 = build(7)
    opt3.load_state_dict(opt.state_dict())
    out["state_dict_differs"] = differing(opt3.state_dict()["state"], theirs)
    # the unsharded optimizer's checkpoint (8-bit codes and block scales) into FSDP2 int8 and fp32 state
    checkpoint.save(Path(directory) / "flat_int8", ref, ref_opt, step=STEPS)
    model4, opt4 = build(7)
    checkpoint.load(Path(directory) / "flat_int8", model4, opt4)
    out["codes_into_fsdp_differ"] = differing(opt4.state_dict()["state"], theirs)
    kw["state_precision"] = "fp32"
    model5, opt5 = build(7)
    checkpoint.load(Path(directory) / "flat_int8", model5, opt5)
    out["codes_into_fsdp_fp32_differ"] = differing(opt5.state_dict()["state"], theirs)
    return out


def _protocol(mesh: Any) -> dict:
    """Every runtime attribute the optimizer (and Lookahead, and the storage re-binding) use exists on the DTensor
    runtime too: the protocol grows with zero.py, and a name missing here would only fail deep inside a step."""
    import re

    import sharded_optim
    from sharded_optim import ShardedOptimizer
    package = Path(sharded_optim.__file__).parent
    used = set()
    for source in ("optimizer.py", "runtime.py", "update.py", "step_stats.py", "serialization.py", "lookahead.py",
                   "rebind.py"):
        used |= set(re.findall(r"\brt\.([A-Za-z_]\w*)", (package / source).read_text()))
    opt = ShardedOptimizer(shard(make_model(0), mesh).parameters(), zero_stage=0)
    opt.memory_report()   # builds the runtimes
    rt = next(rt for _, rt in opt._all_runtimes())
    return {"type": type(rt).__name__, "used": sorted(used), "missing": sorted(n for n in used if not hasattr(rt, n))}


def _compact_buffers(mesh: Any, rank: int, world: int) -> dict:
    """In-place shards (threshold: 64 elements per rank) need no room in ``master`` and ``grad`` until a step
    copies them; Lookahead over such a runtime steps exactly like Lookahead over one that copies everything."""
    from sharded_optim import Lookahead, ShardedOptimizer

    def build() -> tuple[nn.Module, Any]:
        model = shard(make_model(0), mesh)
        opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=LR, zero_stage=0)
        opt.memory_report()   # builds the runtimes now, under the threshold in force
        return model, opt

    # in place from 64 elements per rank; then this machine's default, above every parameter of the tiny model
    models, optimizers = (list(x) for x in zip(_in_place(build, threshold=64), build()))
    rt = next(rt for _, rt in optimizers[0]._all_runtimes())
    small = sum(p.to_local().numel() for p in rt.params if p.numel() < 64 * world)
    out = {"local_numel": rt.layout.local_numel, "small_numel": small, "direct": len(rt._direct_slots)}
    batch = batches(1)[0]
    for model, opt in zip(models, optimizers):
        loss_of(model, local_rows(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    out["buffers_after_plain_step"] = (rt.master.numel(), rt.grad.numel())
    wrapped = [Lookahead(opt, k=2, alpha=0.5) for opt in optimizers]   # needs the whole master: buffers grow
    out["buffers_with_lookahead"] = (rt.master.numel(), rt.grad.numel())
    for model, opt in zip(models, wrapped):
        for batch in batches(STEPS):
            loss_of(model, local_rows(batch, rank, world)).backward()
            opt.step()
            opt.zero_grad()
    named = dict(models[1].named_parameters())
    out["lookahead_differs"] = [n for n, p in models[0].named_parameters()
                                if not torch.equal(p.to_local(), named[n].to_local())]
    # Lookahead over a fresh optimizer: its slow weights start as the parameters (not as an unfilled master)
    fresh = Lookahead(ShardedOptimizer(shard(make_model(0), mesh).parameters(), zero_stage=0), k=2)
    rt = next(rt for _, rt in fresh.optimizer._all_runtimes())
    slow = fresh._slow_by_rt[rt]
    out["fresh_slow_differs"] = [i for i, slot in enumerate(rt.layout.slots) if not torch.equal(
        slow[slot.offset: slot.offset + slot.numel], rt.params[slot.index].to_local().reshape(-1))]
    return out


def _one_d_worker(rank: int, world: int, directory: str) -> Scenarios:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    out = Scenarios()
    _guard(out, "adamw", lambda: _train_pair(mesh, rank, world, "adamw", "torch"))
    _guard(out, "adamod", lambda: _train_pair(mesh, rank, world, "adamod", "ours"))
    _guard(out, "amsgrad", lambda: _train_pair(mesh, rank, world, "adam", "ours", amsgrad=True,
                                                weight_decay=1e-3))
    _guard(out, "radam", lambda: _train_pair(mesh, rank, world, "radam", "ours"))
    _guard(out, "diffmod", lambda: _train_pair(mesh, rank, world, "diffmod", "ours", weight_decay=1e-3))
    # bf16 state on the DTensor runtime against ours unsharded with bf16 state: the rounding bits depend on the
    # element and the step only, so the results are bitwise the same; statistics every other step
    _guard(out, "adamw_bf16_state", lambda: _train_pair(mesh, rank, world, "adamw", "ours", state_precision="bf16",
                                                         stats_interval=2))
    _guard(out, "int8_state", lambda: _int8_state(mesh, os.path.join(directory, "int8_state")))
    _guard(out, "nonfinite", lambda: _nonfinite_skip(mesh, rank))
    _guard(out, "protocol", lambda: _protocol(mesh))
    # every local shard updated where FSDP2 keeps it (threshold 1), statistics every other step (those copy)
    _guard(out, "adamod_in_place", lambda: _in_place(lambda: _train_pair(mesh, rank, world, "adamod", "ours",
                                                                          stats_interval=2)))
    # fp32 on CPU with compiled kernels: every shard read and written in place by the multi-tensor kernel, one call
    # (kernels.native_cpu); the unsharded reference runs it too, on its flat buffers
    _guard(out, "adamod_native", lambda: _train_pair(mesh, rank, world, "adamod", "ours", amsgrad=True,
                                                     kernel="compiled"))
    _guard(out, "compact_buffers", lambda: _compact_buffers(mesh, rank, world))
    _guard(out, "dcp_in_place", lambda: _in_place(lambda: _dcp_resume(
        mesh, rank, os.path.join(directory, "in_place"), "adamod", torch.float32, 0, amsgrad=True)))
    # lazily built runtimes (zero_stage=0): DCP takes its dummy step (zero grads, lr=0) on the empty state
    _guard(out, "dcp_lazy", lambda: _dcp_resume(mesh, rank, os.path.join(directory, "lazy"), "adamod",
                                                torch.float32, 0, amsgrad=True))
    # eagerly built runtimes (zero_stage=2 on a process group): no dummy step; bf16 params keep an fp32 master
    _guard(out, "dcp_eager_bf16", lambda: _dcp_resume(mesh, rank, os.path.join(directory, "eager"), "nadam",
                                                      torch.bfloat16, 2))
    # bf16 state: state_dict() exports fp32 DTensors, which load back into the same bf16 values
    _guard(out, "dcp_bf16_state", lambda: _dcp_resume(mesh, rank, os.path.join(directory, "bf16_state"), "adamod",
                                                      torch.float32, 0, amsgrad=True, state_precision="bf16"))
    return out


def _hsdp_worker(rank: int, world: int) -> Scenarios:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    # HSDP: each replica (mesh row) sees half of the global batch, split again over its shard dimension
    dp_rank = mesh.get_local_rank("replicate") * 2 + mesh.get_local_rank("shard")
    out = Scenarios()
    _guard(out, "adamw", lambda: _train_pair(mesh, dp_rank, world, "adamw", "torch"))
    _guard(out, "radam", lambda: _train_pair(mesh, dp_rank, world, "radam", "ours"))
    from sharded_optim import ShardedOptimizer
    model = shard(make_model(0), mesh)
    opt = ShardedOptimizer(model.parameters(), zero_stage=0)
    opt.memory_report()   # builds the runtimes
    rt = next(rt for _, rt in opt._all_runtimes())
    import torch.distributed as dist
    out["reduce_group_size"] = dist.get_world_size(rt.reduce_group)
    return out


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def one_d() -> list[Scenarios]:
    with tempfile.TemporaryDirectory() as directory:
        return run_ranks(_one_d_worker, 2, directory)


@pytest.fixture(scope="module")
def hsdp() -> list[Scenarios]:
    return run_ranks(_hsdp_worker, 4)


def _scenario(results: list[dict], name: str) -> list[dict]:
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"rank {rank}, scenario {name}:\n{r['error']}"
    return per_rank


@pytest.mark.parametrize("name", ["adamw", "adamod", "amsgrad", "radam", "adamod_in_place", "diffmod",
                                  "adamw_bf16_state", "adamod_native"])
def test_fully_shard_matches_unsharded_reference(one_d, name):
    for rank, r in enumerate(_scenario(one_d, name)):
        assert r["param_err"] <= 1.0 and r["state_err"] <= 1.0, f"{name} rank {rank}: {r}"
        assert r["norm_rel_diff"] <= RTOL, f"{name} rank {rank}: {r}"   # the global norm sums the two shards
        assert r["grad_rel_err"] <= GRAD_RTOL, f"{name} rank {rank}: {r}"
        assert r["losses"][-1] < r["losses"][0], f"{name} rank {rank}: losses {r['losses']}"
        # the tiny model's shards are all under the CPU threshold; the in-place scenario lowers it to 1, and the
        # native kernel reads every shard in place
        assert (r["in_place_slots"] > 5) == (name in ("adamod_in_place", "adamod_native")), \
            f"{name} rank {rank}: {r['in_place_slots']} in-place slots"
        assert all(r["native"]) == (name == "adamod_native"), f"{name} rank {rank}: native {r['native']}"
    if name == "adamw_bf16_state":
        for rank, r in enumerate(_scenario(one_d, name)):
            assert r["state_dtypes"] == ["torch.bfloat16"], f"{name} rank {rank}: {r['state_dtypes']}"
            assert r["param_err"] == 0 and r["state_err"] == 0, f"{name} rank {rank}: not bitwise: {r}"
    expected = {"adamw": ["exp_avg", "exp_avg_sq"], "adamw_bf16_state": ["exp_avg", "exp_avg_sq"],
                "adamod": ["exp_avg", "exp_avg_lr", "exp_avg_sq"],
                "adamod_in_place": ["exp_avg", "exp_avg_lr", "exp_avg_sq"],
                "adamod_native": ["exp_avg", "exp_avg_lr", "exp_avg_sq", "max_exp_avg_sq"],
                "amsgrad": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "radam": ["exp_avg", "exp_avg_sq"],
                "diffmod": ["exp_avg", "exp_avg_lr", "exp_avg_sq", "previous_grad"]}
    assert one_d[0][name]["state_keys"] == expected[name], f"{name} rank 0: {one_d[0][name]['state_keys']}"


def test_no_double_sharding_and_uneven_shards(one_d):
    ranks = _scenario(one_d, "adamod")
    total = sum(p.numel() for p in make_model(0).parameters())
    # each element on exactly one rank
    assert sum(r["local_numel"] for r in ranks) == total, f"adamod: local numels {[r['local_numel'] for r in ranks]}"
    for rank, r in enumerate(ranks):
        # 3 fp32 state tensors over the local shard (+ flat-buffer alignment padding), not over the full model
        assert 3 * 4 * r["local_numel"] <= r["state_bytes"] < 3 * 4 * (r["local_numel"] + 64), \
            f"adamod rank {rank}: {r['state_bytes']} state bytes for {r['local_numel']} elements"
    assert "embed.weight" in ranks[0]["uneven"] and "head.weight" in ranks[0]["uneven"], \
        f"adamod rank 0: uneven {ranks[0]['uneven']}"
    assert ranks[0]["empty_shards"] == [] and ranks[1]["empty_shards"] == ["gate"], \
        f"adamod: empty shards {ranks[0]['empty_shards']} (rank 0), {ranks[1]['empty_shards']} (rank 1)"


def test_int8_state_on_fsdp2_rows_of_whole_blocks_is_bitwise_the_unsharded_one(one_d):
    for rank, r in enumerate(_scenario(one_d, "int8_state")):
        assert r["state_dtype"] == "torch.int8", f"int8_state rank {rank}: {r}"
        for what in ("params_differ", "state_differs", "checkpoint_state_differs", "state_dict_differs",
                     "codes_into_fsdp_differ", "codes_into_fsdp_fp32_differ"):
            assert r[what] == [], f"int8_state rank {rank}: {what} {r[what]}"


def test_dtensor_runtime_has_every_attribute_the_optimizer_uses(one_d):
    for rank, r in enumerate(_scenario(one_d, "protocol")):
        assert r["type"] == "DTensorParamGroup" and len(r["used"]) > 20, f"protocol rank {rank}: {r}"
        assert r["missing"] == [], f"protocol rank {rank}: {r}"


def test_in_place_shards_take_no_room_in_master_and_grad_until_copied(one_d):
    """The common path keeps ``master`` and ``grad`` for the copied shards only (8 bytes per element of every large
    shard saved); Lookahead, which reads the whole master, grows them, and then trains bitwise like the runtime
    that copies everything."""
    for rank, r in enumerate(one_d):
        c = r["compact_buffers"]
        assert "error" not in c, f"rank {rank}:\n{c['error']}"
        assert c["direct"] > 0 and c["small_numel"] < c["local_numel"], f"rank {rank}: nothing in place: {c}"
        assert c["buffers_after_plain_step"] == (c["small_numel"], c["small_numel"]), f"rank {rank}: {c}"
        assert c["buffers_with_lookahead"] == (c["local_numel"], c["local_numel"]), f"rank {rank}: {c}"
        assert c["lookahead_differs"] == [], f"rank {rank}: Lookahead in place differs in {c['lookahead_differs']}"
        assert c["fresh_slow_differs"] == [], \
            f"rank {rank}: fresh slow weights differ in slots {c['fresh_slow_differs']}"


def test_nonfinite_gradient_on_one_rank_skips_everywhere(one_d):
    for rank, r in enumerate(_scenario(one_d, "nonfinite")):
        assert r == {"skipped": 1, "changed": 0}, f"nonfinite rank {rank}: {r}"


@pytest.mark.parametrize("name", ["dcp_lazy", "dcp_eager_bf16", "dcp_in_place", "dcp_bf16_state"])
def test_dcp_save_load_resumes_bitwise(one_d, name):
    for rank, r in enumerate(_scenario(one_d, name)):
        assert r["compared"] > 20 and r["mismatched"] == [], \
            f"{name} rank {rank}: {r['compared']} compared, mismatched {r['mismatched']}"
        assert r["steps_after_load"] == [2], f"{name} rank {rank}: {r}"
        assert r["state_types"] == ["DTensor"], f"{name} rank {rank}: {r}"
    keys = one_d[0][name]["saved_keys"]
    if name == "dcp_eager_bf16":
        assert keys == ["exp_avg", "exp_avg_sq", "master_param", "mu_product", "step"], f"{name} rank 0: {keys}"
    else:
        assert keys == ["exp_avg", "exp_avg_lr", "exp_avg_sq", "max_exp_avg_sq", "step"], f"{name} rank 0: {keys}"


@pytest.mark.parametrize("name", ["adamw", "radam"])
def test_hsdp_2x2_matches_unsharded_reference(hsdp, name):
    for rank, r in enumerate(_scenario(hsdp, name)):
        assert r["param_err"] <= 1.0 and r["state_err"] <= 1.0, f"hsdp {name} rank {rank}: {r}"
        # summed over the shard dim only, not the replicas
        assert r["norm_rel_diff"] <= RTOL, f"hsdp {name} rank {rank}: {r}"
        assert r["grad_rel_err"] <= GRAD_RTOL, f"hsdp {name} rank {rank}: {r}"
    assert [r["reduce_group_size"] for r in hsdp] == [2, 2, 2, 2], \
        f"hsdp reduce group sizes per rank: {[r['reduce_group_size'] for r in hsdp]}"
    assert not math.isnan(hsdp[0][name]["param_err"]), f"hsdp {name} rank 0: param_err is NaN"
