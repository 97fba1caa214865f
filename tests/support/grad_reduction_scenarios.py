"""Rank function for tests/test_grad_reduction.py: ZeRO-2's gradient reduction on gloo (the send/recv exchange and
its pooled staging buffers) against the averaged gradient computed directly from every rank's gradients."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.support.scenarios import Scenarios

SHAPES = [(37, 11), (37,), (5, 37), (5,), (64, 5), (64,), (3, 64)]   # uneven sizes: padding inside buckets


def _model() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(11, 37), torch.nn.Linear(37, 5), torch.nn.Linear(5, 64),
                                torch.nn.Linear(64, 3, bias=False)])


def _loss(model: torch.nn.ModuleList, x: torch.Tensor, rank: int, skip: str) -> torch.Tensor:
    """``skip``: "" (every layer), "middle" (rank 1 gives layer 1 no gradient; a missing gradient counts as zero, as
    in DeepSpeed) or "disjoint" (also rank 0 gives layers 2 and 3 none: each rank then launches buckets the other
    launches only once backward is over, in another order)."""
    h = torch.tanh(model[0](x))
    if skip and rank == 1:
        return model[3](torch.tanh(model[2](h[:, :5]))).square().mean()
    if skip == "disjoint" and rank == 0:
        return torch.tanh(model[1](h)).square().mean()
    return model[3](torch.tanh(model[2](torch.tanh(model[1](h))))).square().mean()


def _flat_grads(model: torch.nn.ModuleList) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def _groups(model: torch.nn.ModuleList, stage: int) -> list[dict]:
    """ZeRO-2: two param groups (two runtimes, whose buckets share indices: their exchange tags must not).  ZeRO-1:
    one, since collectives of several runtimes still interleave in each rank's own backward order (a known limit)."""
    if stage == 1:
        return [{"params": list(model.parameters())}]
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]


def scenarios(rank: int, world: int, stage: int = 2) -> Scenarios:
    """Per case, per parameter: whether it equals, after the ZeRO steps so far, that of a one-process optimizer fed
    the average ``sum_r g_r / world`` (rank order, fp32) of every rank's gradients; plus the staging buffers."""
    from sharded_optim import ShardedOptimizer, zero_grads

    zero_grads.STAGING_BUFFERS = 2   # fewer kept buffers than buckets: reuse and transient buffers both happen
    out = Scenarios()
    model, ref = _model(), _model()
    # buckets of 64 elements: the 7 parameters spread over more buckets than there are staging buffers
    opt = ShardedOptimizer(_groups(model, stage), algorithm="adamw", lr=1e-2, zero_stage=stage, bucket_mb=256 / 2**20,
                           kernel="eager")
    ref_opt = ShardedOptimizer(_groups(ref, stage), algorithm="adamw", lr=1e-2, zero_stage=0, kernel="eager")
    gen = torch.Generator().manual_seed(100 + rank)
    cases = {"one backward": (1, ""), "two micro-batches": (2, ""), "a parameter without gradient": (1, "middle"),
             "ranks launching buckets in different orders": (1, "disjoint")}
    for name, (micro, skip) in cases.items():
        average = None
        for _ in range(micro):   # each backward's bucket reductions average that micro-batch: the sum of averages
            x = torch.randn(4, 11, generator=gen)
            _loss(model, x, rank, skip).backward()
            ref_opt.zero_grad()
            _loss(ref, x, rank, skip).backward()
            mine = _flat_grads(ref)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            this = every[0] / world
            for g in every[1:]:
                this = this + g / world
            average = this if average is None else average + this
        offset = 0
        for p in ref.parameters():
            p.grad = average[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        # (bitwise equal, max |difference|) per parameter: tensors do not cross the process boundary
        out[name] = [(torch.equal(a, b), float((a - b).abs().max())) for a, b in zip(model.parameters(),
                                                                                   ref.parameters())]
    rt = opt._runtimes[id(opt.param_groups[0])][0]
    out["buckets"] = len(rt.layout.buckets)
    out["staging buffers"] = len(rt._staging_free)
    out["staging limit"] = zero_grads.STAGING_BUFFERS
    return out
