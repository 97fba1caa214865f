r"""State stored in 8-bit blocks (``state_precision="int8"``, sharded_optim/kernels/int8_state.py).

The bounds are the quantizer's own (ALGORITHMS.md section 15: teacher forcing): from the same dequantized state and
the same gradient the int8 step moves the parameters exactly as the fp32 step does (the update uses the fp32 values
before they are quantized), and each stored element is the fp32 result rounded once to one of its two neighbouring
levels: within one level spacing, :math:`2^{\lfloor\log_2|x|\rfloor-3} \le |x|/8`, or below the last level within
the last level.
"""
from __future__ import annotations

import math

import pytest
import torch

from sharded_optim import ShardedOptimizer
from sharded_optim.kernels import int8_state as q8
from tests.test_low_precision import CASES   # every algorithm and option set, and the gated device path

N = 5000   # >= SMALL_NUMEL: int8 state; not a multiple of the block, so the last block is part padding


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The level spacing at each value: 2**(exponent - 3), 8 levels per octave."""
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().double().clamp_min(2.0 ** -149))) - 3)


def last_level(want: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per element: the last non-zero level of its block."""
    padded = torch.nn.functional.pad(want.float(), (0, -want.numel() % q8.BLOCK))
    last = q8.last_level(q8.block_scales(padded.view(-1, q8.BLOCK)), signed)
    return last.view(-1).repeat_interleave(q8.BLOCK)[: want.numel()].double()


def bound(want: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per element: one level spacing at the value, or the last level of its block below it."""
    return torch.maximum(spacing(want), last_level(want, signed))


def bits16(n: int) -> torch.Tensor:
    """16 random bits per element, as the kernel's hash gives them."""
    return torch.randint(0, 65536, (n,), dtype=torch.int32)


def test_quantizer_bound_grid_exactness_zero_and_unbiased():
    torch.manual_seed(0)
    x = torch.randn(64 * q8.BLOCK) * torch.pow(10.0, torch.randint(-6, 1, (64 * q8.BLOCK,)).float())
    for signed in (True, False):
        v = x if signed else x.abs()
        u = bits16(v.numel())
        codes, scales = q8.quantize(v, signed, u)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        got = q8.dequantize(codes, scales).double()
        assert bool(((got - v.double()).abs() < bound(v.double(), signed)).all())
        above = v.double().abs() >= last_level(v.double(), signed)   # on the grid's range: relative error <= 1/8
        assert bool(above.float().mean() > 0.5)
        assert bool(((got - v.double()).abs()[above] <= v.double().abs()[above] / 8).all())
        for again in (u, None):   # on the grid: stored exactly (the codes may differ where a block's scale halved)
            assert torch.equal(q8.dequantize(*q8.quantize(got.float(), signed, again)).double(), got)
        if not signed:
            assert bool((got[v > 0] > 0).all())   # a non-negative state never rounds to zero
        zero = torch.zeros(q8.BLOCK, dtype=codes.dtype)
        assert bool((q8.dequantize(zero, torch.ones(1)) == 0).all())   # a zeroed buffer is a zero state
    # unbiased: the mean of many stochastic roundings of one value is the value
    n = 200 * q8.BLOCK
    value = torch.full((n,), 0.3)
    value[:: q8.BLOCK] = 1.0   # the block maximum: scale 1; 0.3 lies between the levels 0.28125 and 0.3125
    got = q8.dequantize(*q8.quantize(value, True, bits16(n))).double()
    rest = got.view(-1, q8.BLOCK)[:, 1:]
    assert set(rest.unique().tolist()) == {0.28125, 0.3125}
    sigma = 2 ** -5 / 2 / math.sqrt(rest.numel())
    assert abs(float(rest.mean()) - 0.3) < 5 * sigma


def _pair(algorithm: str, opts: dict, kernel: str) -> tuple:
    torch.manual_seed(1)
    p32 = torch.nn.Parameter(torch.randn(N) * 0.1)
    p8 = torch.nn.Parameter(p32.detach().clone())
    kw = dict(algorithm=algorithm, lr=1e-2, kernel=kernel, **opts)
    return p32, ShardedOptimizer([p32], **kw), p8, ShardedOptimizer([p8], state_precision="int8", **kw)


@pytest.mark.parametrize("algorithm,opts", CASES, ids=[f"{a}{''.join(f'-{k}' for k in o)}" for a, o in CASES])
def test_teacher_forced_steps_every_algorithm(algorithm, opts):
    """Each step starts the fp32 optimizer from the int8 one's state (exported in fp32: exact), feeds both the same
    gradient, and checks the parameters bitwise and every state element against the quantizer's bound."""
    p32, o32, p8, o8 = _pair(algorithm, opts, "eager")
    for step in range(6):
        if step:
            o32.load_state_dict(o8.state_dict())
            assert torch.equal(p32, p8)
        g = torch.randn(N, generator=torch.Generator().manual_seed(step)) * (0.01 if step % 2 else 1.0)
        p32.grad, p8.grad = g.clone(), g.clone()
        o32.step()
        o8.step()
        assert torch.equal(p8, p32), f"step {step}: the parameters differ"
        exported = o8.state_dict()["state"][0]
        for key, got in exported.items():
            if key in ("step", "mu_product"):
                assert torch.equal(got.double(), torch.as_tensor(o32.state[p32][key]).double()), key
                continue
            assert o8.state[p8][key].dtype in (torch.int8, torch.uint8), key
            want = o32.state[p32][key].double()
            err = (got.double() - want).abs()
            limit = bound(want, key in q8.SIGNED_KEYS)
            assert bool((err <= limit).all()), f"step {step} {key}: worst error {float((err / limit).max()):.3f}"


def test_compiled_int8_kernel_follows_fp32_within_rounding():
    """Compiled on both sides: parameters agree to lr * 1e-4 (the step is lr * m / sqrt(v) <= ~lr; the two
    compiled loops may contract the same math differently), states within the quantizer's bound."""
    for algorithm, opts in (("adamw", {}), ("adamod", {"amsgrad": True})):
        p32, o32, p8, o8 = _pair(algorithm, opts, "compiled")
        for step in range(3):
            g = torch.randn(N, generator=torch.Generator().manual_seed(step))
            o32.load_state_dict(o8.state_dict())
            p32.grad, p8.grad = g.clone(), g.clone()
            o32.step()
            o8.step()
            assert float((p8 - p32).detach().abs().max()) < 1e-2 * 1e-4, (algorithm, step)
            for key, got in o8.state_dict()["state"][0].items():
                if key != "step":
                    want = o32.state[p32][key].double()
                    limit = bound(want, key in q8.SIGNED_KEYS) * 1.001
                    assert bool(((got.double() - want).abs() <= limit).all()), (algorithm, step, key)


def test_int8_state_bytes_per_parameter_and_small_tensors_stay_fp32():
    params = [torch.nn.Parameter(torch.randn(100_000)), torch.nn.Parameter(torch.randn(24, 10))]
    numel = 100_240
    per_param = {}
    for name, opts in (("adamw", {}), ("amsgrad", {"amsgrad": True})):
        algorithm = "adam" if name == "amsgrad" else name
        opt = ShardedOptimizer(params, algorithm=algorithm, state_precision="int8", **opts)
        per_param[name] = opt.memory_report()["state_bytes"] / numel   # held: codes, scales, padding, fp32 small
        assert opt.state[params[0]]["exp_avg"].dtype == torch.int8
        assert opt.state[params[0]]["exp_avg_sq"].dtype == torch.uint8
        assert opt.state[params[1]]["exp_avg"].dtype == torch.float32   # 240 < SMALL_NUMEL elements
    assert per_param["adamw"] <= 2.1 and per_param["amsgrad"] <= 3.1, per_param


def test_statistics_read_the_dequantized_state():
    """On a statistics step the sums over the first moment are those of its 8-bit values (dequantized), exactly
    as the float64 sums over the exported state before the step."""
    from sharded_optim.telemetry.fields import FIELD_INDEX as field
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N))
    opt = ShardedOptimizer([p], lr=1e-2, kernel="eager", stats_interval=1, state_precision="int8")
    reports = []
    opt.add_report_hook(reports.append)
    for step in range(3):
        m_before = opt.state_dict()["state"][0]["exp_avg"].double() if step else torch.zeros(N, dtype=torch.float64)
        p.grad = torch.randn(N)
        opt.step()
    stats = reports[-1].stats[0]
    g = p.grad.double()
    assert float(stats[field["mom_sumsq"]]) == pytest.approx(float((m_before * m_before).sum()), rel=1e-6)
    assert float(stats[field["mom_grad_dot"]]) == pytest.approx(float((m_before * g).sum()), rel=1e-6)


@pytest.mark.parametrize("capturable", [False, True])
def test_chunked_kernel_calls_are_bitwise_the_one_call(monkeypatch, capturable):
    """Shards above CHUNK elements are updated in several calls (bounded temporaries); blocks and rounding bits
    are per element, so the result is bitwise that of one call."""
    def train():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(N))
        opt = ShardedOptimizer([p], algorithm="adamod", amsgrad=True, lr=1e-2, kernel="eager",
                               state_precision="int8", capturable=capturable)
        for step in range(3):
            p.grad = torch.randn(N, generator=torch.Generator().manual_seed(step))
            opt.step()
        return p.detach().clone(), opt.state_dict()["state"][0]
    whole = train()
    monkeypatch.setattr(q8, "CHUNK", 4 * q8.BLOCK)   # 5 calls over the 5120-element shard
    calls = []
    real = q8.blocked_calls

    def counted(*args):
        out = real(*args)
        calls.append(len(out))
        return out
    monkeypatch.setattr(q8, "blocked_calls", counted)
    parts = train()
    assert calls and max(calls) == 5, f"the shard was not cut into 5 chunks: {calls}"
    assert torch.equal(whole[0], parts[0])
    for key, value in whole[1].items():
        assert torch.equal(value, parts[1][key]), key


def test_whole_block_gradients_are_read_in_place_bitwise_the_copied_path(monkeypatch):
    """One rank, 8-bit state: a parameter over ``DIRECT_MIN_NUMEL`` whose size is a whole number of blocks is
    updated from its own ``.grad`` (no copy into the flat buffer); one that ends inside a block is still copied (its
    run's last block reads padding).  Bitwise the all-copied path, through a skipped NaN step and a statistics step."""
    from torch import nn

    from sharded_optim import zero

    def train(threshold: int) -> tuple[list[torch.Tensor], ShardedOptimizer]:
        monkeypatch.setitem(zero.DIRECT_MIN_NUMEL, "cpu", threshold)
        torch.manual_seed(0)
        # the layout follows backward's order: the last layer's weight (not whole blocks) comes first, its run
        # then ends inside a block before the in-place ones and must be extended to whole blocks
        model = nn.Sequential(nn.Linear(300, 512), nn.Tanh(), nn.Linear(512, 300, bias=False), nn.Tanh(),
                              nn.Linear(300, 300, bias=False))
        opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=1e-2, state_precision="int8",
                               stats_interval=3)
        for i in range(5):
            model(torch.randn(4, 300, generator=torch.Generator().manual_seed(i))).square().mean().backward()
            if i == 3:
                model[2].weight.grad[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], opt

    direct, opt = train(1 << 16)
    copied, _ = train(1 << 40)
    assert all(torch.equal(a, b) for a, b in zip(direct, copied))
    assert opt.skipped_steps["nonfinite"] == 1
    shapes = sorted(tuple(rt.layout.slots[s].shape) for rts in opt._runtimes.values() for rt in rts
                    if rt.state_precision == "int8" for s in rt._direct_slots)
    assert shapes == [(300, 512), (512, 300)]   # 153,600 elements each; 300x300 = 90,000 is not whole blocks
