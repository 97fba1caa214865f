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
    dispatch.run(dispatch.update(variant), "eager", *cpu, torch.tensor(hs.values, dtype=torch.float32))
    dispatch.run(dispatch.update(variant), "compiled", *gpu, torch.tensor(hs.values, dtype=torch.float32, device="cuda"))
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
        # AdaMod bounds each step size by its own EMA (beta3): with the default 0.999 the bound warms up over ~1000
        # steps, so 30 steps barely move (loss x0.87 on CPU too, measured): the old assertion expected too much of
        # the algorithm, not of the code.  beta3=0.9 warms up in ~10 steps; lr 1e-2: the loss falls to ~1% (CPU).
        opt = so.ShardedOptimizer(model.parameters(), algorithm="adamod", zero_stage=2, lr=1e-2, beta3=0.9)
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


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)).cuda().to(dtype)


@pytest.mark.parametrize("algorithm,options", CASES)
def test_cuda_step_never_synchronises_with_the_host(algorithm: str, options: dict) -> None:
    """zero_grad + backward + clip_grad_norm_ + step under ``set_sync_debug_mode("error")``: the norm, the clip
    coefficient, the skip decision and the step counters stay on the device (the CUDA default path)."""
    model = _mlp()
    opt = so.ShardedOptimizer(model.parameters(), algorithm=algorithm, **options)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):   # compiles, and uploads the hyperparameters once
        model(x).pow(2).mean().backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(opt.state[model[0].weight]["step"]) == 5 and opt.skipped_steps["nonfinite"] == 0


def test_cuda_device_decisions_match_the_host_path_and_skip_on_device() -> None:
    """The device path (default on CUDA) against the host path (``nonfinite_policy="raise"`` keeps it) on the same
    CUDA gradients, with clipping and, for the device path, a NaN step that must leave everything unchanged.

    Same kernels up to the gate and scalars computed in float64 on the GPU instead of the host (CUDA's pow may
    differ in the last float64 bit, almost never visible after the cast to float32): 4 ulp of |p| <= ~1 bounds it."""
    dev_model, host_model = _mlp(), _mlp()
    dev = so.ShardedOptimizer(dev_model.parameters(), algorithm="adamod", lr=1e-2, beta3=0.9)
    host = so.ShardedOptimizer(host_model.parameters(), algorithm="adamod", lr=1e-2, beta3=0.9,
                               nonfinite_policy="raise")
    for i in range(6):
        x = torch.randn(32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        for model, opt in ((dev_model, dev), (host_model, host)):
            model(x).pow(2).mean().backward()
            if i == 3 and opt is dev:
                before = [p.detach().clone() for p in model.parameters()]
                model[0].weight.grad[0, 0] = float("nan")
                opt.clip_grad_norm_(0.1)
                opt.step()
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
                opt.zero_grad()
                model(x).pow(2).mean().backward()   # the same gradient again, finite: the step the host takes
            opt.clip_grad_norm_(0.1)
            opt.step()
            opt.zero_grad()
    assert dev.skipped_steps["nonfinite"] == 1
    for a, b in zip(dev_model.parameters(), host_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_capturable_step_replays_as_a_cuda_graph() -> None:
    """``capturable=True``: forward + backward + step captured once and replayed equals the same steps run eagerly."""
    eager_model, graph_model = _mlp(), _mlp()
    eager = so.ShardedOptimizer(eager_model.parameters(), capturable=True)
    graphed = so.ShardedOptimizer(graph_model.parameters(), capturable=True)
    x = torch.randn(32, 64, device="cuda")

    def iteration(model, opt) -> None:
        model(x).pow(2).mean().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            graphed.zero_grad(set_to_none=True)
            iteration(graph_model, graphed)
    torch.cuda.current_stream().wait_stream(side)
    graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iteration(graph_model, graphed)
    for _ in range(3):
        eager.zero_grad(set_to_none=True)
        iteration(eager_model, eager)
    for _ in range(5):
        graph.replay()
        eager.zero_grad(set_to_none=True)
        iteration(eager_model, eager)
    torch.cuda.synchronize()
    assert int(graphed.state[graph_model[0].weight]["step"]) == 8
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)


def _low_precision_against_fp32(precision: str, device: str) -> None:
    """Teacher-forced steps of ``precision`` state against fp32 state on ``device`` (compiled kernels, the default
    device path); on CUDA the low-precision steps after the first (which compiles) run under
    ``set_sync_debug_mode("error")``."""
    from tests.test_int8_state import bound as int8_bound
    from tests.test_low_precision import NEAREST_KEYS, spacing
    n, lr = 5000, 1e-2   # >= 4096 elements: int8 blocks
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(n, device=device) * 0.1)
    plow = torch.nn.Parameter(p32.detach().clone())
    kw = dict(algorithm="adamod", amsgrad=True, lr=lr)
    o32 = so.ShardedOptimizer([p32], **kw)
    olow = so.ShardedOptimizer([plow], state_precision=precision, **kw)
    for step in range(4):
        o32.load_state_dict(olow.state_dict())   # the same (exported, exact) state on both sides
        g = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)
        p32.grad, plow.grad = g.clone(), g.clone()
        o32.step()
        if device == "cuda" and step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            olow.step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        assert float((plow - p32).detach().abs().max()) < lr * 1e-4, (precision, step)
        for key, got in olow.state_dict()["state"][0].items():
            if key == "step":
                continue
            want = o32.state[p32][key].detach().double().cpu()
            if precision == "int8":
                from sharded_optim.kernels.int8_state import SIGNED_KEYS
                limit = int8_bound(want, key in SIGNED_KEYS) * 1.001
            else:   # within a bf16 spacing (stochastic), half of one (nearest), plus the kernels' FMA slack
                limit = spacing(want) * (0.5 if key in NEAREST_KEYS else 1.0) + want.abs() * 1e-6
            assert bool(((got.double().cpu() - want).abs() <= limit).all()), (precision, step, key)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_state_on_cuda_follows_fp32_within_its_bound(precision: str) -> None:
    """bf16/int8 state through the compiled Triton kernels: parameters within lr * 1e-4 of fp32 state's from the
    same state and gradient, every stored element within the quantizer's bound (the CPU tests' bounds), and no
    host synchronisation inside ``step()``."""
    _low_precision_against_fp32(precision, "cuda")
