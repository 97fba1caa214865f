"""The CUDA path: the same kernels compiled to Triton, NCCL collectives, bf16 with an fp32 master.

Marked ``gpu``: these skip only where no CUDA device exists (the CPU suite covers the same code on gloo).
"""
from __future__ import annotations

import pytest
import torch

import sharded_optim as so
from sharded_optim import rules
from sharded_optim.kernels import dispatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [("adamw", {}), ("adam", {"amsgrad": True}), ("adamax", {}), ("nadam", {}), ("radam", {}),
         ("adamod", {}), ("adabound", {"amsgrad": True})]


@pytest.mark.parametrize("algorithm,options", CASES)
def test_compiled_cuda_kernel_matches_cpu_eager(algorithm: str, options: dict) -> None:
    """One step of every variant on CUDA (Triton) against the CPU eager kernel on the same inputs.

    CUDA contracts a*b+c into FMA and may use a different sqrt/div rounding, so elements can differ by a few ulp;
    4 ulp of the largest magnitude involved (|p| <= ~5) bounds that with margin.
    """
    lr = rules.SPECS[algorithm].lr
    group = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
             **rules.resolve_options(algorithm, options)}
    keys = rules.state_keys(algorithm, group)
    variant = rules.kernel_variant(algorithm, group)
    hs = rules.host_scalars(algorithm, group, 7, initial_lr=lr)
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    cpu = [torch.randn(n, generator=g), torch.randn(n, generator=g)] + \
        [torch.rand(n, generator=g) * (1e-3 if k != "exp_avg" else 1.0) for k in keys]
    gpu = [t.cuda() for t in cpu]
    dispatch.run(variant, "eager", *cpu, torch.tensor(hs.values, dtype=torch.float32))
    dispatch.run(variant, "compiled", *gpu, torch.tensor(hs.values, dtype=torch.float32, device="cuda"))
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


def test_nccl_single_rank_bf16_master(tmp_path) -> None:
    """A 1-rank NCCL group through the ZeRO code path: bf16 parameters, fp32 master, no host sync in the kernel."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda().bfloat16()
        opt = so.ShardedOptimizer(model.parameters(), algorithm="adamod", zero_stage=2)
        losses = []
        x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
        for _ in range(30):
            loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        assert losses[-1] < 0.5 * losses[0]
        state = opt.state_dict()["state"][0]
        assert state["exp_avg"].dtype == torch.float32 and state["master_param"].dtype == torch.float32
        assert torch.equal(state["master_param"].to(torch.bfloat16), next(model.parameters()).detach())
    finally:
        dist.destroy_process_group()
