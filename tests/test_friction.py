"""diffGrad and DiffMod beyond the teacher-forced steps of test_numerics: float32 trajectories against
torch-optimizer's DiffGrad and the float64 reference, ``len_memory``, and what a step without a gradient does to
``previous_grad``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharded_optim import ShardedOptimizer
from tests.support.numerics import NoisyQuadratic, to64, ulp32
from tests.support.reference import ReferenceTrajectory, reference_step

STEPS, LR = 200, 1e-3


def _drift_bound(pmax: float) -> float:
    """ALGORITHMS.md 15.1 (as test_numerics.test_float32_trajectory_matches_torch): two independent float32
    rounding walks of STEPS steps, 2 sqrt(N) ulp(max|p|)."""
    return 2 * math.sqrt(STEPS) * float(ulp32(pmax))


def _run(opt_factory, prob: NoisyQuadratic) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    p = torch.tensor(prob.p0(), dtype=torch.float32, requires_grad=True)
    opt = opt_factory([p])
    for t in range(1, STEPS + 1):
        p.grad = torch.tensor(prob(p.detach(), t), dtype=torch.float32)  # a fresh tensor: DiffGrad edits it
        opt.step()
    return p, opt


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_diffgrad_float32_trajectory_matches_torch_optimizer(wd: float, kernel: str) -> None:
    import torch_optimizer
    prob = NoisyQuadratic(64, seed=8)
    p_t, o_t = _run(lambda ps: torch_optimizer.DiffGrad(ps, lr=LR, weight_decay=wd), prob)
    p_s, o_s = _run(lambda ps: ShardedOptimizer(ps, algorithm="diffgrad", lr=LR, weight_decay=wd, kernel=kernel),
                    prob)
    pmax = float(torch.max(torch.abs(p_t.detach())))
    err = float(torch.max(torch.abs(p_s.detach() - p_t.detach())))
    assert err <= _drift_bound(pmax), f"max |p - p_torch_optimizer| = {err:.3e}"
    for k in ("exp_avg", "exp_avg_sq", "previous_grad"):
        a, b = o_s.state[p_s][k], o_t.state[p_t][k]
        assert float(torch.max(torch.abs(a - b))) <= 1e-4 * float(torch.max(torch.abs(b))), k
    assert not np.allclose(to64(p_s), prob.p0(), atol=1e-3)   # it went somewhere


@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.05, "beta3": 0.99}], ids=["plain", "wd"])
def test_diffmod_float32_trajectory_matches_reference(opts: dict) -> None:
    """No library has DiffMod: the float32 run against the float64 reference, from the same float32 start
    (one rounding walk instead of two, so the bound of the DiffGrad test holds with room)."""
    prob = NoisyQuadratic(64, seed=8)
    p_s, _ = _run(lambda ps: ShardedOptimizer(ps, algorithm="diffmod", lr=LR, kernel="eager", **opts), prob)
    ref = ReferenceTrajectory("diffmod", to64(torch.tensor(prob.p0(), dtype=torch.float32)), dict(opts, lr=LR))
    ref.run(STEPS, prob)
    err = float(np.max(np.abs(to64(p_s) - ref.p)))
    assert err <= _drift_bound(float(np.max(np.abs(ref.p)))), f"max |p - p_ref| = {err:.3e}"


def test_len_memory_is_beta3() -> None:
    """len_memory = 100 is beta3 = 0.99 (constructor and param groups); the groups store beta3 only."""
    prob = NoisyQuadratic(16, seed=2)
    a = torch.tensor(prob.p0(), requires_grad=True)
    b = torch.tensor(prob.p0(), requires_grad=True)
    c = torch.tensor(prob.p0(), requires_grad=True)
    by_memory = ShardedOptimizer([a], algorithm="diffmod", len_memory=100, kernel="eager")
    by_beta3 = ShardedOptimizer([b], algorithm="diffmod", beta3=0.99, kernel="eager")
    by_group = ShardedOptimizer([{"params": [c], "len_memory": 100}], algorithm="diffmod", kernel="eager")
    assert by_memory.param_groups[0]["beta3"] == pytest.approx(0.99, rel=1e-15)
    assert by_group.param_groups[0]["beta3"] == pytest.approx(0.99, rel=1e-15)
    assert "len_memory" not in by_memory.param_groups[0] and "len_memory" not in by_group.param_groups[0]
    assert ShardedOptimizer([torch.zeros(1, requires_grad=True)], algorithm="diffmod").defaults["beta3"] == 0.999
    for t in range(1, 31):
        g = torch.tensor(prob(a.detach(), t))
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        by_memory.step()
        by_beta3.step()
        by_group.step()
    assert torch.equal(a, b) and torch.equal(a, c)
    # a group may not give both spellings, nor len_memory to an algorithm without beta3
    with pytest.raises(ValueError, match="len_memory"):
        by_memory.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "len_memory": 10,
                                   "beta3": 0.9})
    with pytest.raises(ValueError, match="len_memory"):
        by_memory.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "len_memory": 1})
    plain = ShardedOptimizer([torch.zeros(1, requires_grad=True)], algorithm="diffgrad")
    with pytest.raises(ValueError, match="len_memory"):
        plain.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "len_memory": 10})
    assert len(by_memory.param_groups) == 1 and len(plain.param_groups) == 1   # rejected groups left no trace
    # written into a group after it was added, len_memory would do nothing: the next step refuses it
    by_memory.param_groups[0]["len_memory"] = 10
    a.grad = torch.ones_like(a)
    with pytest.raises(ValueError, match="len_memory"):
        by_memory.step()


def test_step_without_gradient_keeps_previous_grad() -> None:
    """One process, torch.optim semantics: a parameter without a gradient is skipped entirely, so its
    previous_grad still holds the gradient of its last step, and the next step's friction is measured against
    that one (not against zero)."""
    wd = 0.1
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    opt = ShardedOptimizer([a, b], algorithm="diffgrad", lr=0.1, weight_decay=wd, kernel="eager")
    a.grad, b.grad = torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64), torch.tensor([0.2, -0.1],
                                                                                        dtype=torch.float64)
    opt.step()
    state_b = {k: v.clone() for k, v in opt.state[b].items()}
    p_b = b.detach().clone()
    torch.testing.assert_close(state_b["previous_grad"], torch.tensor([0.2, -0.1], dtype=torch.float64)
                               + wd * torch.tensor([0.3, 0.7], dtype=torch.float64), rtol=0, atol=0)
    a.grad, b.grad = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), None
    opt.step()
    for k, v in state_b.items():
        assert torch.equal(opt.state[b][k], v), k
    assert torch.equal(b.detach(), p_b)
    g3 = np.array([-0.4, 0.9])
    b.grad, a.grad = torch.tensor(g3), None
    opt.step()
    ref = reference_step("diffgrad", dict(p=to64(p_b), g=g3, exp_avg=to64(state_b["exp_avg"]),
                                          exp_avg_sq=to64(state_b["exp_avg_sq"]),
                                          previous_grad=to64(state_b["previous_grad"])), 2,
                         dict(lr=0.1, weight_decay=wd))
    np.testing.assert_allclose(to64(b), ref["p"], rtol=1e-14)
    np.testing.assert_allclose(to64(opt.state[b]["previous_grad"]), ref["previous_grad"], rtol=1e-15)
    assert int(opt.state[b]["step"]) == 2 and int(opt.state[a]["step"]) == 2
