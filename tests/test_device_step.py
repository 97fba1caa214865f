"""The step decided on the device (``sharded_optim.device_step``) against the host path, and the gradient collection.

On CPU the device path is opt-in (``capturable=True``); it runs the same code a CUDA step runs, with the device
being the CPU, so everything it decides can be checked here bitwise against the host path: step counters on the
device, scalars computed there from them in float64, the clip coefficient folded into the gradient scale, and a
non-finite step skipped by the gated kernel instead of by the host.  The eager kernels keep the suite fast; one test
checks that the compiled gated kernel equals the compiled plain one.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sharded_optim import ShardedOptimizer
from sharded_optim.kernels import dispatch
from sharded_optim.kernels.adam_family import VARIANTS

CASES = [
    ("adam", {}), ("adam", {"amsgrad": True, "weight_decay": 1e-2}), ("adamw", {"maximize": True}),
    ("adamw", {"bias_correction": False}), ("adamax", {"weight_decay": 1e-2}), ("nadam", {}),
    ("radam", {}), ("radam", {"degenerated_to_sgd": False, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
    ("adamod", {}), ("adamod", {"amsgrad": True}), ("adabound", {}),
    ("adabound", {"amsgrad": True, "weight_decay": 1e-3, "decoupled_weight_decay": True}),
    ("diffgrad", {"weight_decay": 1e-2}), ("diffmod", {"len_memory": 50}),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))   # 4 tensors, none of shape (4,)


def _train(algorithm: str, options: dict, capturable: bool, *, clip: float | None, nan_at: int | None,
           steps: int = 8, kernel: str = "eager") -> tuple[list[torch.Tensor], ShardedOptimizer]:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=1e-2, capturable=capturable, kernel=kernel,
                           **options)
    for i in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
        if i == nan_at:
            model[0].weight.grad[0, 0] = float("nan")
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("algorithm,options", CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in CASES])
def test_device_decisions_equal_host_path_bitwise(algorithm, options):
    # clip at 0.05 scales most steps (norms ~0.1-1); step 3 has a NaN gradient and must be skipped on both paths
    for clip in (None, 0.05):
        host, host_opt = _train(algorithm, options, False, clip=clip, nan_at=3)
        dev, dev_opt = _train(algorithm, options, True, clip=clip, nan_at=3)
        for a, b in zip(host, dev):
            assert torch.equal(a, b), (algorithm, options, clip, float((a - b).abs().max()))
        for p_host, p_dev in zip(host_opt.state, dev_opt.state):
            for key, value in host_opt.state[p_host].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(dev_opt.state[p_dev][key])), key
        assert host_opt.skipped_steps == dev_opt.skipped_steps == {"nonfinite": 1, "spike": 0}


def test_skipped_step_leaves_parameters_state_and_counters_bitwise_unchanged():
    model = _model()
    opt = ShardedOptimizer(model.parameters(), algorithm="adamod", capturable=True, kernel="eager")
    for i in range(2):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    model(torch.randn(5, 8)).square().mean().backward()
    model[2].bias.grad[0] = float("inf")
    opt.clip_grad_norm_(1.0)   # an infinite norm: the coefficient stays 1, the step is skipped
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(state[id(p)][key], torch.as_tensor(value)), key
    assert int(opt.state[model[0].weight]["step"]) == 2
    assert opt.skipped_steps["nonfinite"] == 1


def test_ignore_policy_on_device_takes_the_nonfinite_step():
    model = _model()
    opt = ShardedOptimizer(model.parameters(), capturable=True, kernel="eager", nonfinite_policy="ignore")
    model(torch.randn(5, 8)).square().mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(model[0].weight[0, 0]) and opt.skipped_steps["nonfinite"] == 0
    assert int(opt.state[model[0].weight]["step"]) == 1


def test_compiled_gated_kernel_equals_compiled_plain_kernel():
    torch.manual_seed(1)
    n = 4099   # not a multiple of the vector width: the tail loop is checked too
    p, g, m, v = torch.randn(n), torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01
    sc = torch.tensor([1.0, 0.0, 1e-5, 0.1, 0.999, 0.001, 1e-3, 1.0, 1e-8, 0.0, float("inf"), 1.0, 0.0, 0.0])
    plain = [p.clone(), g, m.clone(), v.clone(), sc]
    gated = [p.clone(), g, m.clone(), v.clone(), sc]
    dispatch.run(dispatch.update("adam_mv"), "compiled", *plain)
    dispatch.run(dispatch.gated("adam_mv"), "compiled", torch.tensor(True), *gated)
    assert all(torch.equal(a, b) for a, b in zip(plain, gated))
    skipped = [p.clone(), g * float("nan"), m.clone(), v.clone(), sc]
    dispatch.run(dispatch.gated("adam_mv"), "compiled", torch.tensor(False), *skipped)
    assert torch.equal(skipped[0], p) and torch.equal(skipped[2], m) and torch.equal(skipped[3], v)


def test_unknown_kernel_name_is_an_error_not_a_fallback():
    # the registry is typed: an unknown variant fails where the kernel is named, a string is not a kernel, and a
    # role without variants takes none
    with pytest.raises(KeyError, match="unknown kernel variant 'adam_mvq' for role 'update'"):
        dispatch.update("adam_mvq")
    with pytest.raises(KeyError, match="unknown kernel variant 'lookahead_sync' for role 'gated'"):
        dispatch.gated("lookahead_sync")
    with pytest.raises(ValueError, match="role 'pre_sums' takes no variant"):
        dispatch.Kernel(dispatch.Role.PRE_SUMS, "adam_mv")
    with pytest.raises(TypeError, match="kernel must be a sharded_optim.kernels.dispatch.Kernel"):
        dispatch.run("adam_mv", "eager", torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                     torch.zeros(14))
    with pytest.raises(ValueError, match="state precision must be one of"):
        dispatch.update("adam_mv", "int4")
    for precision in ("bf16", "int8"):
        with pytest.raises(ValueError, match=f"role 'post_sums' has no {precision} form"):
            dispatch.Kernel(dispatch.Role.POST_SUMS, "adam_mv", precision)
    assert dispatch.update("adam_mv") is dispatch.update("adam_mv")   # interned: the compile cache hits
    assert dispatch.update("adam_mv").function() is VARIANTS["adam_mv"]


@pytest.mark.parametrize("kwargs", [{"nonfinite_policy": "raise"}, {"spike_sigma": 3.0}])
def test_capturable_refuses_options_that_need_the_host(kwargs):
    with pytest.raises(ValueError, match="capturable=True"):
        ShardedOptimizer(_model().parameters(), capturable=True, **kwargs)


def _copies_in_step(model: nn.Module, opt: ShardedOptimizer, set_to_none: bool) -> dict[str, int]:
    """aten copy kernels one step launches: multi-tensor copies, and single copies of a gradient (a tensor shaped
    like a parameter) not inside one (the scalar vector and the norm's float64 tail are other copies)."""
    from torch.profiler import ProfilerActivity, profile
    opt.zero_grad(set_to_none=set_to_none)
    model(torch.randn(5, 8)).square().mean().backward()
    shapes = [list(p.shape) for p in model.parameters()]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    events = prof.events()
    foreach = sum(e.name == "aten::_foreach_copy_" for e in events)

    def inside_foreach(e) -> bool:
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name == "aten::_foreach_copy_":
                return True
        return False
    single = sum(e.name == "aten::copy_" and not inside_foreach(e) and any(s in shapes for s in e.input_shapes)
                 for e in events)
    return {"foreach": foreach, "single": single}


def test_gradient_collection_is_one_multi_tensor_copy_and_none_for_grad_views():
    model = _model()
    opt = ShardedOptimizer(model.parameters(), kernel="eager")
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    # fresh gradients from autograd (set_to_none=True): one multi-tensor copy into the flat buffer, no per-parameter
    # copy (the scalar vector is built with torch.tensor, not copy_)
    assert _copies_in_step(model, opt, set_to_none=True) == {"foreach": 1, "single": 0}
    # set_to_none=False: the parameters' .grad are views of our buffer, backward accumulated in place: no copy
    assert _copies_in_step(model, opt, set_to_none=False) == {"foreach": 0, "single": 0}
    assert all(p.grad.data_ptr() != 0 for p in model.parameters())


def _big_model() -> nn.Module:
    torch.manual_seed(0)   # 300x300 = 90,000 elements: the tests lower the in-place threshold below it
    return nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 3))


@pytest.mark.parametrize("capturable", [False, True])
def test_large_gradients_read_in_place_equal_the_copied_path(monkeypatch, capturable):
    """One rank: a parameter over ``DIRECT_MIN_NUMEL`` is updated from its own ``.grad`` (no copy); the result
    equals the all-copied path bitwise, with a skipped NaN step, a statistics step and set_to_none=False in between.
    With clipping the norm is summed in other chunks (fp32 norms of 4096-element chunks, combined in float64), so it
    is compared with the float64 norm instead: ~1e-8 relative measured for such sums, bound 1e-6."""
    from sharded_optim import zero

    def train(threshold: int, clip: bool) -> tuple[list[torch.Tensor], ShardedOptimizer, list[float]]:
        monkeypatch.setitem(zero.DIRECT_MIN_NUMEL, "cpu", threshold)
        model = _big_model()
        opt = ShardedOptimizer(model.parameters(), algorithm="adamod", lr=1e-2, kernel="eager", stats_interval=3,
                               capturable=capturable)
        norm_errors = []
        for i in range(6):
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).square().mean().backward()
            if i == 4:
                model[2].weight.grad[0, 0] = float("nan")
            if clip:
                exact = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt()
                norm = opt.clip_grad_norm_(0.05)
                if i != 4:
                    norm_errors.append(float((norm.double() - exact).abs() / exact))
            opt.step()
            # alternating: after a copying step (statistics) .grad are our buffer's views, and set_to_none=False
            # accumulates into them; such a gradient is read there, never zeroed as a stale copy
            opt.zero_grad(set_to_none=i % 2 == 1)
        return [p.detach().clone() for p in model.parameters()], opt, norm_errors

    direct, direct_opt, _ = train(1 << 16, clip=False)
    copied, _, _ = train(1 << 40, clip=False)
    assert all(torch.equal(a, b) for a, b in zip(direct, copied))
    assert direct_opt.skipped_steps["nonfinite"] == 1
    _, clipped_opt, errors = train(1 << 16, clip=True)
    assert max(errors) < 1e-6 and clipped_opt.skipped_steps["nonfinite"] == 1
    rt = next(iter(direct_opt._runtimes.values()))[0]
    assert [tuple(rt.layout.slots[s].shape) for s in rt._direct_slots] == [(300, 300)]


def test_norm_when_every_gradient_is_read_in_place(monkeypatch):
    """One rank, every parameter read in place: the flat gradient buffer holds zeros only and is not summed; the
    norm still covers every gradient, also right after a statistics step copied them into that buffer (zeroed
    again before they are read in place), and a NaN still skips the step."""
    from sharded_optim import zero
    monkeypatch.setitem(zero.DIRECT_MIN_NUMEL, "cpu", 1 << 16)
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(300, 300))
    opt = ShardedOptimizer([weight], algorithm="adamw", lr=1e-2, kernel="eager", stats_interval=2)
    for i in range(5):
        weight.grad = torch.randn(300, 300, generator=torch.Generator().manual_seed(i))
        if i == 3:
            weight.grad[0, 0] = float("nan")
        exact = weight.grad.double().square().sum().sqrt()
        norm = opt.clip_grad_norm_(1e9)
        assert (i == 3 and norm.isnan()) or abs(float(norm) - float(exact)) <= 1e-6 * float(exact), (i, norm, exact)
        opt.step()
    rt = next(iter(opt._runtimes.values()))[0]
    assert rt._direct_slots == {0} and opt.skipped_steps["nonfinite"] == 1


def test_large_gradient_is_not_copied(monkeypatch):
    from sharded_optim import zero
    monkeypatch.setitem(zero.DIRECT_MIN_NUMEL, "cpu", 1 << 16)
    model = _big_model()
    opt = ShardedOptimizer(model.parameters(), kernel="eager")
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    from torch.profiler import ProfilerActivity, profile
    opt.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    copied = [s for e in prof.events() if e.name == "aten::copy_" for s in e.input_shapes if s == [300, 300]]
    assert copied == [] and model[2].weight.grad.shape == (300, 300)


def test_parameters_without_gradient_keep_their_counters_on_the_device_path():
    """One rank: a parameter with no gradient is not stepped (torch.optim semantics); its counter then lags the
    others, and later steps use each parameter's own count: the device path equals the host path bitwise."""
    def train(capturable: bool) -> tuple[list[torch.Tensor], list[int]]:
        model = _model()
        opt = ShardedOptimizer(model.parameters(), algorithm="nadam", capturable=capturable, kernel="eager")
        for i in range(5):
            model(torch.randn(5, 8, generator=torch.Generator().manual_seed(i))).square().mean().backward()
            if i in (1, 2):
                model[2].bias.grad = None
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], [int(opt.state[p]["step"]) for p in
                                                                   model.parameters()]
    host, host_steps = train(False)
    dev, dev_steps = train(True)
    assert host_steps == dev_steps == [5, 5, 5, 3]
    assert all(torch.equal(a, b) for a, b in zip(host, dev))
