"""A tiny 2-group regression model trained for a few steps, under DeepSpeed or under torchrun without it.

    deepspeed --num_gpus 2 --master_port P tests/support/deepspeed_job.py deepspeed OUT zero1,zero2,zero2_bf16
    torchrun --nproc-per-node 2 --master-port P tests/support/deepspeed_job.py torchrun OUT fp32,bf16

A run name may end in ``-<algorithm>`` (``zero2-diffmod``, ``fp32-diffmod``) to train another algorithm than
``ALGORITHM``.

Positional arguments only: the deepspeed launcher appends ``--local_rank=N`` (dropped here) and torchrun takes
script flags that are prefixes of its own options for its own.  Several runs share one process group, so the
launcher and DeepSpeed's start-up are paid once.  Rank 0 writes ``OUT/<engine>_<run>.pt`` per run: the final
parameters (as float32), the global loss per step, and what our optimizer saw (step counts, group sizes).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[2]
ALGORITHM, LR, STEPS, MICRO, D_IN, D_HID, D_OUT = "adamod", 1e-2, 6, 4, 12, 24, 5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(), nn.LayerNorm(D_HID), nn.Linear(D_HID, D_OUT))


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups (weight decay on matrices only), so DeepSpeed calls step() once per group."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": 1e-2}, {"params": other, "weight_decay": 0.0}]


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of ``step`` (a fixed random linear map plus a bias to learn)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(MICRO * world, D_IN, generator=g)
    w = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(7))
    y = torch.tanh(x @ w) + 0.5
    return x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]


def eval_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out batch: its loss before and after training shows whether the model learned."""
    return batch(10_000, rank, world)


def global_mean(value: torch.Tensor) -> float:
    t = value.detach().float().clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def split_run(run: str) -> tuple[str, str]:
    """``"zero2-diffmod"`` -> ``("zero2", "diffmod")``; no suffix: ``ALGORITHM``."""
    name, _, algorithm = run.partition("-")
    return name, algorithm or ALGORITHM


def deepspeed_config(run: str) -> dict:
    """``zero<stage>[_bf16]``: the shipped configs/deepspeed_zero<stage>.json, bf16 switched on if asked."""
    from sharded_optim.deepspeed import load_config
    stage, bf16 = run.split("_")[0], run.endswith("_bf16")
    shipped = REPO / "configs" / f"deepspeed_{run}.json"
    cfg = load_config(shipped if shipped.is_file() else REPO / "configs" / f"deepspeed_{stage}.json")
    if bf16:
        cfg["bf16"] = {"enabled": True}
    assert cfg["train_micro_batch_size_per_gpu"] == MICRO and cfg["gradient_clipping"] == 0.0
    return cfg


def skip_inference_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (``deepspeed_shm_comm``).

    DeepSpeed's torch backend builds that C++ extension when it starts (5+ minutes on a fresh 2-core machine, more
    than the rest of this test), yet only ``inference_all_reduce`` uses it: training collectives go through
    ``torch.distributed``, so the comparison is unchanged.  Marking the op incompatible is the fallback DeepSpeed
    itself takes where the op cannot build (non-Linux hosts).
    """
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_deepspeed(run: str, rank: int, world: int) -> dict:
    from sharded_optim import deepspeed as sod
    skip_inference_shm_op()
    run, algorithm = split_run(run)
    cfg = deepspeed_config(run)
    dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else torch.float32
    model = make_model()
    engine = sod.initialize(model, cfg, algorithm=algorithm, params=param_groups(model), lr=LR)
    ours = sod.sharded_optimizer(engine)
    ex, ey = eval_batch(rank, world)
    with torch.no_grad():
        eval_losses = [global_mean(nn.functional.mse_loss(engine(ex.to(dtype)).float(), ey))]
    losses = []
    for step in range(STEPS):
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(global_mean(loss))
    with torch.no_grad():
        eval_losses.append(global_mean(nn.functional.mse_loss(engine(ex.to(dtype)).float(), ey)))
    views = {}
    if cfg["zero_optimization"]["stage"] > 0:   # DeepSpeed's own per-parameter views of the master and state
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        views = {n: (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone())
                 for n, p in engine.module.named_parameters()}
    result = {"params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()},
              "ds_views": views,
              "losses": losses, "eval_losses": eval_losses,
              "steps": sorted({int(s["step"]) for s in ours.state.values()}),
              "group_sizes": [len(g["params"]) for g in ours.param_groups],
              "state_keys": sorted({k for s in ours.state.values() for k in s}),
              "wrapper": type(engine.optimizer).__name__, "param_dtype": str(dtype)}
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def run_torchrun(run: str, rank: int, world: int) -> dict:
    """The same training with our own ZeRO-2 over the same 2 ranks and no DeepSpeed.

    ``bf16_zero_step_first``: first one step on all-zero gradients, as DeepSpeed's bf16 ZeRO-0 wrapper
    (``FP16_UnfusedOptimizer.initialize_optimizer_states``) takes at construction, for any client optimizer.
    """
    from sharded_optim import ShardedOptimizer
    run, algorithm = split_run(run)
    bf16 = run.startswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = make_model().to(dtype)
    # bf16: reduce the gradients in bf16, as DeepSpeed does (its communication dtype follows the model's)
    opt = ShardedOptimizer(param_groups(model), algorithm, lr=LR, zero_stage=2,
                           grad_reduce_dtype=torch.bfloat16 if bf16 else None)
    if run == "bf16_zero_step_first":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    losses = []
    for step in range(STEPS):
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(global_mean(loss))
    state = opt.state_dict()["state"]   # full logical tensors, indexed in param_groups order
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in param_groups(model) for p in g["params"]]
    return {"params": {n: p.detach().float().clone() for n, p in model.named_parameters()}, "losses": losses,
            "exp_avg": {order[i]: entry["exp_avg"].clone() for i, entry in state.items()},
            "steps": sorted({int(s["step"]) for s in opt.state.values()}), "param_dtype": str(dtype)}


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--local_rank")]
    engine, out, runs = args[0], Path(args[1]), args[2].split(",")
    torch.set_num_threads(1)
    os.environ.setdefault("SHARDED_OPTIM_KERNEL", "eager")   # compiling per rank costs ~10 s; same function
    from sharded_optim.dist import cleanup, init_distributed
    info = init_distributed(backend="gloo")
    try:
        for run in runs:
            fn = run_deepspeed if engine == "deepspeed" else run_torchrun
            result = fn(run, info.rank, info.world_size)
            if info.rank == 0:
                torch.save(result, out / f"{engine}_{run}.pt")
    finally:
        cleanup()   # barrier + destroy: without it DeepSpeed runs abort with SIGABRT about half the time


if __name__ == "__main__":
    main(sys.argv[1:])
