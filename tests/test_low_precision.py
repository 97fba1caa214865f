"""State stored in bfloat16 (``state_precision="bf16"``, sharded_optim/kernels/low_precision.py), and what bf16
and int8 state share: fp32 export, checkpoints across precisions, bitwise results on 1, 2, 3 ranks and N->M resume
(the int8 quantizer itself: tests/test_int8_state.py).

The bounds are the quantizer's own (ALGORITHMS.md section 15: teacher forcing): from the same dequantized state and
the same gradient, the bf16 step moves the parameters exactly as the fp32 step does (the update uses the fp32
values before they are rounded), and each stored state element is the fp32 result rounded once: within one
bfloat16 spacing for stochastic rounding, half a spacing for nearest.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharded_optim import ShardedOptimizer, checkpoint
from sharded_optim.kernels import low_precision
from tests.support import low_precision_scenarios as lps
from tests.support.multiproc import run_ranks

NEAREST_KEYS = ("max_exp_avg_sq", "previous_grad")

CASES = [
    ("adam", {}), ("adamw", {}), ("adam", {"amsgrad": True}), ("adam", {"bias_correction": False}),
    ("adam", {"decoupled_weight_decay": False, "weight_decay": 0.01}), ("adamax", {}), ("nadam", {}),
    ("radam", {}), ("adamod", {}), ("adamod", {"amsgrad": True}), ("adabound", {}), ("adabound", {"amsgrad": True}),
    ("diffgrad", {"weight_decay": 0.01}), ("diffmod", {"weight_decay": 0.01}),
    ("adamw", {"capturable": True}), ("adamod", {"amsgrad": True, "capturable": True}),   # the gated device path
]


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 spacing (ulp) at each fp32 value: 2**(exponent - 7); the subnormal spacing at 0."""
    exp = torch.floor(torch.log2(x.abs().double().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, exp - 7)


def test_stochastic_rounding_is_within_one_spacing_unbiased_and_deterministic():
    torch.manual_seed(0)
    x = torch.randn(200_000) * torch.pow(10.0, torch.randint(-20, 20, (200_000,)).float())
    salt = torch.randint(-2**31, 2**31 - 1, (200_000,), dtype=torch.int32)
    q = low_precision.round_stochastic(x, salt)
    assert q.dtype == torch.bfloat16
    err = (q.double() - x.double()).abs()
    assert bool((err < spacing(x)).all())
    # one of the two neighbours: never further than the spacing, and the same bits for the same inputs
    assert torch.equal(q, low_precision.round_stochastic(x, salt))
    # representable values, zeros and non-finite values pass unchanged
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0 * 2**-100, float("inf"), -float("inf")])
    assert torch.equal(low_precision.round_stochastic(exact, torch.arange(7, dtype=torch.int32)).float(), exact)
    assert torch.isnan(low_precision.round_stochastic(torch.tensor([float("nan")]), torch.arange(1, dtype=torch.int32))).all()
    # unbiased: a value at a fraction f of the spacing rounds up with probability f (the mean stays put)
    for f in (0.001, 0.25, 0.7):
        n = 100_000
        value = 1.0 + f * 2**-7
        r = low_precision.round_stochastic(torch.full((n,), value), torch.arange(n, dtype=torch.int32)).double()
        sigma = 2**-7 * math.sqrt(f * (1 - f) / n)
        assert abs(float(r.mean()) - value) < 5 * sigma, (f, float(r.mean()), value)


def _pair(algorithm: str, opts: dict, kernel: str) -> tuple:
    torch.manual_seed(1)
    p32 = torch.nn.Parameter(torch.randn(3001) * 0.1)
    p16 = torch.nn.Parameter(p32.detach().clone())
    kw = dict(algorithm=algorithm, lr=1e-2, kernel=kernel, **opts)
    return p32, ShardedOptimizer([p32], **kw), p16, ShardedOptimizer([p16], state_precision="bf16", **kw)


@pytest.mark.parametrize("algorithm,opts", CASES, ids=[f"{a}{''.join(f'-{k}' for k in o)}" for a, o in CASES])
def test_teacher_forced_steps_every_algorithm(algorithm, opts):
    """Each step starts the fp32 optimizer from the bf16 one's state (exported in fp32: exact), feeds both the same
    gradient, and checks the parameters bitwise and every state element against its rounding bound."""
    p32, o32, p16, o16 = _pair(algorithm, opts, "eager")
    for step in range(6):
        if step:
            o32.load_state_dict(o16.state_dict())
            assert torch.equal(p32, p16)
        g = torch.randn(3001, generator=torch.Generator().manual_seed(step)) * (0.01 if step % 2 else 1.0)
        p32.grad, p16.grad = g.clone(), g.clone()
        o32.step()
        o16.step()
        assert torch.equal(p16, p32), f"step {step}: the parameters differ"
        for key, got in o16.state[p16].items():
            if key in ("step", "mu_product"):
                assert torch.equal(torch.as_tensor(got).double(), torch.as_tensor(o32.state[p32][key]).double())
                continue
            assert got.dtype == torch.bfloat16, key
            want = o32.state[p32][key].double()
            err = (got.double() - want).abs()
            bound = spacing(want.float()) / (2 if key in NEAREST_KEYS else 1)
            ok = (err <= bound) if key in NEAREST_KEYS else (err < bound) | (err == 0)
            assert bool(ok.all()), f"step {step} {key}: worst error {float((err / bound).max()):.3f} spacings"


def test_compiled_bf16_kernel_equals_eager_bound_and_fp32_parameters():
    for algorithm, opts in (("adamw", {}), ("adamod", {"amsgrad": True})):
        p32, o32, p16, o16 = _pair(algorithm, opts, "compiled")
        for step in range(3):
            g = torch.randn(3001, generator=torch.Generator().manual_seed(step))
            o32.load_state_dict(o16.state_dict())
            p32.grad, p16.grad = g.clone(), g.clone()
            o32.step()
            o16.step()
            assert torch.equal(p16, p32), (algorithm, step)
            for key in o32.state[p32]:
                if key != "step":
                    want = o32.state[p32][key].double()
                    assert bool(((o16.state[p16][key].double() - want).abs() < spacing(want.float()) + 0).all())


def test_second_moment_keeps_moving_where_nearest_rounding_stalls():
    """beta2 = 0.999 moves v by 0.1% a step, under half a bfloat16 spacing: round-to-nearest keeps the old value
    forever; stochastic rounding follows fp32 without bias.  Stationary error of the SR average: each step adds
    a rounding error of variance <= ulp**2/4, decayed by beta2, so its std is <= ulp/(2 sqrt(1 - beta2**2))."""
    n, steps, beta2 = 4096, 3000, 0.999
    g = 1.5 + 0.5 * torch.rand(n, generator=torch.Generator().manual_seed(0))   # v climbs to g**2 in [2.25, 4)
    p32, p16 = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    kw = dict(algorithm="adam", lr=0.0, betas=(0.9, beta2), kernel="compiled")
    o32, o16 = ShardedOptimizer([p32], **kw), ShardedOptimizer([p16], state_precision="bf16", **kw)
    for p, o in ((p32, o32), (p16, o16)):
        p.grad = g.clone()
        o.step()                    # v = (1 - beta2) g**2 after one step
    for p, o in ((p32, o32), (p16, o16)):
        o.state[p]["exp_avg_sq"].fill_(1.0)   # start every element at 1 and let it climb towards g**2
        for _ in range(steps):
            p.grad = g.clone()
            o.step()
    v32 = o32.state[p32]["exp_avg_sq"].double()
    v16 = o16.state[p16]["exp_avg_sq"].double()
    nearest = torch.ones(n, dtype=torch.bfloat16)
    for _ in range(50):             # the same recursion rounded to nearest: stuck at 1
        nearest = (beta2 * nearest.float() + (1 - beta2) * g * g).to(torch.bfloat16)
    assert bool((nearest == 1.0).all())
    assert bool((v32 - 1.0 > 0.9 * (g * g - 1.0)).all())   # fp32 went 1 - beta2**3000 = 95% of the way
    rel = (v16 - v32) / v32
    std_bound = 2**-7 / (2 * math.sqrt(1 - beta2**2))   # relative: the spacing is <= 2**-7 of the value
    assert float(rel.std()) <= std_bound
    assert abs(float(rel.mean())) < 5 * std_bound / math.sqrt(n)   # unbiased


def test_bf16_state_halves_the_bytes():
    params = [torch.nn.Parameter(torch.randn(100_000)), torch.nn.Parameter(torch.randn(24, 10))]
    numel = 100_240
    per_param = {}
    for name, opts in (("adamw", {}), ("amsgrad", {"amsgrad": True}), ("adamod", {})):
        algorithm = "adam" if name == "amsgrad" else name
        for precision in ("fp32", "bf16"):
            report = ShardedOptimizer(params, algorithm=algorithm, state_precision=precision, **opts).memory_report()
            per_param[f"{name} {precision}"] = report["state_bytes"] / numel   # held, alignment padding included
            itemsize = 2 if precision == "bf16" else 4
            states = [k for k in report["by_key"] if k not in ("master", "grad_shard")]
            assert report["unsharded_state_bytes"] == numel * itemsize * len(states)   # real elements only
    assert per_param["adamw bf16"] <= 4.1 and per_param["adamw fp32"] >= 8.0, per_param
    assert per_param["amsgrad bf16"] <= 6.1 and per_param["adamod bf16"] <= 6.1, per_param


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_state_dict_exports_fp32_for_torch_and_round_trips(precision):
    torch.manual_seed(0)
    n = 5000   # int8 state needs >= 4096 elements
    p = torch.nn.Parameter(torch.randn(n))
    opt = ShardedOptimizer([p], algorithm="adamw", lr=1e-2, state_precision=precision, kernel="eager")
    for _ in range(3):
        p.grad = torch.randn(n)
        opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([q], lr=1e-2)
    ref.load_state_dict({k: v for k, v in sd.items() if k != "algorithm"})
    assert torch.equal(ref.state[q]["exp_avg"], sd["state"][0]["exp_avg"])
    if precision == "bf16":
        assert torch.equal(ref.state[q]["exp_avg"], opt.state[p]["exp_avg"].float())
    again = ShardedOptimizer([torch.nn.Parameter(p.detach().clone())], algorithm="adamw", lr=1e-2,
                             state_precision=precision, kernel="eager")
    again.load_state_dict(sd)
    for key, value in again.state_dict()["state"][0].items():   # the same values stored again
        assert torch.equal(value, sd["state"][0][key]), key
    assert again.state[again.param_groups[0]["params"][0]]["exp_avg"].dtype == opt.state[p]["exp_avg"].dtype


@pytest.mark.parametrize("saved_as", ["bf16", "int8"])
def test_checkpoints_load_across_precisions(tmp_path, saved_as):
    """bf16 values widen to fp32 exactly; int8 checkpoints hold codes and block scales, which decode into values
    on the code grid: stored back exactly in an int8 runtime, and exact in fp32 (bf16 rounds them to nearest)."""
    def build(precision):
        torch.manual_seed(0)
        model = torch.nn.Linear(80, 64)   # a 5120-element weight (int8 state) and a 64-element bias (fp32 in int8)
        return model, ShardedOptimizer(model.parameters(), algorithm="adamod", lr=1e-2, state_precision=precision,
                                       kernel="eager")
    model, opt = build(saved_as)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 80)).square().sum().backward()
        opt.step()
    checkpoint.save(tmp_path / saved_as, model, opt, step=3)
    saved = opt.state_dict()["state"]   # fp32 values of the stored state
    for precision in ("fp32", "bf16", "int8"):
        m2, o2 = build(precision)
        checkpoint.load(tmp_path / saved_as, m2, o2)
        for a, b in zip(model.parameters(), m2.parameters()):
            assert torch.equal(a, b)
        for i, entry in o2.state_dict()["state"].items():
            for key, value in entry.items():
                want = saved[i][key]
                if precision == "int8" and saved_as == "bf16" and key != "step" and value.numel() >= 4096:
                    continue   # bf16 values rounded to the 8-bit grid: the quantizer's own tests bound that
                if precision == "bf16" and key != "step":
                    # int8 grid values (3 significant bits) are bf16 values; the fp32 state of an int8
                    # optimizer's small tensors rounds to nearest
                    want = want.to(torch.bfloat16).float()
                assert torch.equal(value, want), (precision, saved_as, i, key)
        weight = next(m2.parameters())
        assert o2.state[weight]["exp_avg"].dtype == {"bf16": torch.bfloat16, "int8": torch.int8,
                                                     "fp32": torch.float32}[precision]


def test_int8_checkpoints_store_codes_and_block_scales(tmp_path):
    """An int8 runtime's state goes to disk as it lives: 1-byte codes plus one fp32 scale per 256 elements
    (format version 3, so older readers refuse it); a checkpoint without 8-bit state stays version 2.  The
    offline reader decodes the codes into the values state_dict() gives."""
    import json

    from torch.distributed.checkpoint import FileSystemReader

    from sharded_optim.checkpoint.verify import read_checkpoint

    def run(precision):
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256, bias=False)   # 65536 weights: the state dominates the files
        opt = ShardedOptimizer(model.parameters(), algorithm="adam", amsgrad=True, lr=1e-2, kernel="eager",
                               state_precision=precision)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 256)).square().sum().backward()
            opt.step()
        checkpoint.save(tmp_path / precision, model, opt, step=2)
        files = sum(f.stat().st_size for f in (tmp_path / precision).glob("*.distcp"))
        return opt, files, json.loads((tmp_path / precision / "meta.json").read_text())
    o8, bytes8, meta8 = run("int8")
    _, bytes32, meta32 = run("fp32")
    assert (meta8["format_version"], meta32["format_version"]) == (3, 2)
    assert meta8["params"]["weight"]["state_format"] == "int8"
    stored = FileSystemReader(str(tmp_path / "int8")).read_metadata().state_dict_metadata
    assert stored["optim.weight.exp_avg"].properties.dtype == torch.int8
    assert stored["optim.weight.exp_avg_sq"].properties.dtype == torch.uint8
    assert tuple(stored["optim.weight.exp_avg_block_scales"].size) == (65536 // 256,)
    # model 4 B/element in both; state 3 x 4 B (fp32) against 3 x (1 + 4/256) B (int8), plus file framing
    # framing: DCP's headers, measured ~11 KiB; fp32 state instead of codes would add 576 KiB
    model, numel, framing = 4 * 65536, 65536, 64 << 10
    assert bytes32 >= model + 3 * 4 * numel, (bytes32, "fp32 state stored in full")
    assert bytes8 <= model + 3 * numel * (1 + 4 / 256) + framing, (bytes8, "int8 state stored as codes + scales")
    _, tensors = read_checkpoint(tmp_path / "int8")
    assert not any(k.endswith("_block_scales") for k in tensors)
    for key, value in o8.state_dict()["state"][0].items():
        if key != "step":
            assert torch.equal(tensors[f"optim.weight.{key}"], value), key


@pytest.mark.parametrize("precision,limit", [("bf16", 2.0 ** -7), ("int8", 1 / 8)])
@pytest.mark.parametrize("algorithm,opts", [("adamw", {}), ("adamax", {}), ("adamw", {"capturable": True})])
def test_quantization_error_statistics_equal_the_direct_computation(precision, limit, algorithm, opts):
    """On a statistics step the reported relative error of each stored moment is ||q(x) - x|| / ||x|| with x the
    fp32 state from the same state and gradient (teacher forcing, computed here with an fp32 optimizer), and lies
    within the quantizer's relative bound, which holds per element and so for the norms: stochastic rounding errs
    by less than one spacing, a bf16 spacing is at most 2**-7 of the value (measured here about 2.3e-3), an int8
    level at most 1/8 above the block's last level (measured about 4e-2; the elements below it are 2**-15 of the
    block's largest and weigh nothing in the norm)."""
    from sharded_optim.telemetry.finalize import finalize
    torch.manual_seed(0)
    n = 5000
    p = torch.nn.Parameter(torch.randn(n))
    ref = torch.nn.Parameter(p.detach().clone())
    kw = dict(algorithm=algorithm, lr=1e-2, kernel="eager", **opts)
    opt = ShardedOptimizer([p], stats_interval=2, state_precision=precision, **kw)
    fp32 = ShardedOptimizer([ref], **kw)
    reports = []
    opt.add_report_hook(reports.append)
    for step in range(4):
        fp32.load_state_dict(opt.state_dict())
        with torch.no_grad():
            ref.copy_(p)
        g = torch.randn(n, generator=torch.Generator().manual_seed(step))
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        fp32.step()
        keys = list(opt.state_dict()["state"][0])[1:3]   # after "step": the first and the second moment
        stats = reports[-1].stats
        if step % 2 == 0:
            assert stats is None or reports[-1].stats_step != step + 1
            continue
        got = finalize(stats, reports[-1].group_names)["group0"]
        assert got.state_quantized
        stored = opt.state_dict()["state"][0]
        for key, reported in zip(keys, (got.quant_error_m, got.quant_error_v)):
            x = fp32.state[ref][key].double()
            want = float((stored[key].double() - x).norm() / x.norm())
            assert reported == pytest.approx(want, rel=1e-9, abs=1e-15), (step, key)
            assert 0 < reported < limit, (step, key, reported)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_gradient_norm_of_a_statistics_step_is_not_rounded_to_the_state(precision):
    """On a statistics step the gradient norm comes out of the statistics pass, which also reads the first moment:
    the gradient is read in fp32 there, not rounded to a bf16 moment's dtype (that was 3e-5..8e-5 off).  Bound: one
    fp32 rounding per squared element, summed in float64 (2**-24 relative; 1e-6 allowed)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5000)) for _ in range(2)]
    opt = ShardedOptimizer(ps, lr=1e-2, kernel="eager", stats_interval=1, state_precision=precision)
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(5000)
        want = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps))
        got = float(opt.clip_grad_norm_(1e9))
        opt.step()
        assert abs(got - want) <= 1e-6 * want, (step, got, want)


def test_state_precision_per_param_group():
    """Each param group stores its state in its own ``state_precision`` (the constructor's is the default), with
    results bitwise those of one optimizer per group; the setting is fixed once the group has state, and a
    state_dict loads into any precision (the live optimizer's storage stays)."""
    torch.manual_seed(0)
    init = [torch.randn(5000), torch.randn(5000), torch.randn(10)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    alone = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(algorithm="adamw", lr=1e-2, kernel="eager")
    opt = ShardedOptimizer([{"params": params[:1], "state_precision": "int8"}, {"params": params[1:]}],
                           state_precision="bf16", **kw)
    ones = [ShardedOptimizer(alone[:1], state_precision="int8", **kw),
            ShardedOptimizer(alone[1:], state_precision="bf16", **kw)]
    assert [g["state_precision"] for g in opt.param_groups] == ["int8", "bf16"]
    for step in range(3):
        for p, q in zip(params, alone):
            p.grad = q.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
        for o in ones:
            o.step()
    for p, q in zip(params, alone):
        assert torch.equal(p, q)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.int8
    assert opt.state[params[1]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[params[2]]["exp_avg_sq"].dtype == torch.bfloat16
    fp32 = ShardedOptimizer([{"params": [torch.nn.Parameter(t.clone()) for t in init[:1]]},
                             {"params": [torch.nn.Parameter(t.clone()) for t in init[1:]]}], **kw)
    fp32.load_state_dict(opt.state_dict())
    assert [g["state_precision"] for g in fp32.param_groups] == ["fp32", "fp32"]
    assert fp32.state[fp32.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    assert torch.equal(fp32.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt.param_groups[0]["state_precision"] = "bf16"
    with pytest.raises(ValueError, match="state_precision of param group 'group0' was changed"):
        opt.step()
    with pytest.raises(ValueError, match="param group 0: state_precision must be one of"):
        ShardedOptimizer([{"params": [torch.nn.Parameter(torch.zeros(3))], "state_precision": "fp8"}])


def test_bad_precision_is_refused_by_name():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"state_precision must be one of \('fp32', 'bf16', 'int8'\), got 'int4'"):
        ShardedOptimizer([p], state_precision="int4")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("bf16")
    two = run_ranks(lps.scenarios, 2, str(base / "w2"), None)
    three = run_ranks(lps.scenarios, 3, str(base / "w3"), str(base / "w2"))
    one = [lps.scenarios(0, 1, str(base / "w1"), str(base / "w3"))]
    return {1: one, 2: two, 3: three}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("algorithm", ["adamw", "adamod"])
@pytest.mark.parametrize("world", [2, 3])
def test_low_precision_state_is_bitwise_the_same_on_1_2_3_ranks_and_resumes_n_to_m(worlds, world, algorithm,
                                                                                   precision):
    one = worlds[1][0]
    name = f"{algorithm} {precision}"
    for rank, r in enumerate(worlds[world]):
        for what in ("trained", "continued"):
            bad = lps.same(r[f"{name} {what}"], one[f"{name} {what}"])
            assert not bad, f"{name} {what}, world {world} rank {rank} vs one process: {bad} differ"
        if world == 3:   # resumed from the 2-rank checkpoint
            bad = lps.same(r[f"{name} resumed"], one[f"{name} continued"])
            assert not bad, f"{name} resumed 2 -> 3 ranks, rank {rank}: {bad} differ"
            # into fp32 state on 3 ranks: the values exactly (bf16 widens exactly, int8 codes decode exactly)
            bad = lps.same(r[f"{name} into fp32"], one[f"{name} trained"])
            assert not bad, f"{name} 2 ranks -> fp32 state on 3 ranks, rank {rank}: {bad} differ"
    bad = lps.same(one[f"{name} resumed"], one[f"{name} continued"])   # 3 -> 1
    assert not bad, f"{name} resumed 3 -> 1 rank: {bad} differ"
