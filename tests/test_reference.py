"""Validates the float64 reference (tests/support/reference.py) itself.

Where torch.optim implements the same math, the reference must follow torch's float64 trajectory to ~1e-12
over 50 steps (both sides are float64, so the only differences are rounding order).  Algorithms torch does
not have (AdaMod, AdaBound/AMSBound, RAdam without the SGD phase, no bias correction) are tied to a torch
class through exact identities (ALGORITHMS.md section 0: E0 with eps == E1 with eps/sqrt(bc2)) or checked
against the published numbers (ALGORITHMS.md sections 7 and 9).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.support.numerics import NoisyQuadratic, assert_rel, default_dtype, to64
from tests.support.reference import (ReferenceLookahead, ReferenceTrajectory, adabound_bounds, friction,
                                     radam_rect, reference_step, resolve_hp)

N = 48
STEPS = 50
REL = 1e-12   # float64 vs float64: ~50 steps x a few 1e-16 roundings, amplified little by the contracting problem


def run_both(torch_cls, torch_kw, algorithm, hp, steps=STEPS, torch_group_fn=None, ref_hp_fn=None,
             keys=("exp_avg", "exp_avg_sq"), seed=0, rel=REL):
    """Free-running float64 trajectories of torch and the reference on the same problem, compared every step."""
    # torch's Adamax/NAdam default to lr=2e-3, our family to 1e-3: always pass lr explicitly
    torch_kw = dict(torch_kw, lr=torch_kw.get("lr", 1e-3))
    hp = dict(hp, lr=hp.get("lr", torch_kw["lr"]))
    prob = NoisyQuadratic(N, seed=seed)
    p = torch.tensor(prob.p0(), dtype=torch.float64, requires_grad=True)
    opt = torch_cls([p], **torch_kw)
    ref = ReferenceTrajectory(algorithm, prob.p0(), hp)
    for t in range(1, steps + 1):
        if torch_group_fn is not None:
            opt.param_groups[0].update(torch_group_fn(t))
        g = prob(p.detach(), t)
        p.grad = torch.tensor(g, dtype=torch.float64)
        with default_dtype(torch.float64):   # torch's lazily created NAdam mu_product is then float64
            opt.step()
        ref.step(prob(ref.p, t), ref_hp_fn(t) if ref_hp_fn else None)
        assert_rel(f"p at t={t}", p, ref.p, rel)
        for k in keys:
            assert_rel(f"{k} at t={t}", opt.state[p][k], ref.state[k], rel)
    return opt, ref


@pytest.mark.parametrize("kw", [
    dict(),
    dict(weight_decay=0.1),
    dict(maximize=True, weight_decay=0.05),
    dict(betas=(0.8, 0.99), eps=1e-6, lr=1e-2),
], ids=["plain", "l2", "maximize", "betas"])
def test_adam_matches_torch(kw):
    run_both(torch.optim.Adam, kw, "adam", kw)


def test_amsgrad_matches_torch():
    kw = dict(amsgrad=True, weight_decay=0.01, betas=(0.9, 0.99))
    run_both(torch.optim.Adam, kw, "adam", kw, keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.3, lr=1e-2), dict(amsgrad=True, maximize=True)])
def test_adamw_matches_torch(kw):
    # In float64 torch's p*(1 - lr*wd) and our p - (lr*wd)*p differ only by rounding (ALGORITHMS.md 15.4 is fp32).
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ())
    run_both(torch.optim.AdamW, kw, "adamw", kw, keys=keys)
    # adamw is adam with decoupled decay (default wd 1e-2)
    assert resolve_hp("adamw")["weight_decay"] == 1e-2 and resolve_hp("adamw")["decoupled_weight_decay"]
    assert resolve_hp("adam")["weight_decay"] == 0.0 and not resolve_hp("adam")["decoupled_weight_decay"]


def test_adam_decoupled_equals_adamw():
    kw = dict(weight_decay=0.2, decoupled_weight_decay=True)
    run_both(torch.optim.Adam, kw, "adam", kw)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, maximize=True), dict(lr=2e-2, eps=1e-3)])
def test_adamax_matches_torch(kw):
    run_both(torch.optim.Adamax, kw, "adamax", kw, keys=("exp_avg", "exp_inf"))


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                                dict(momentum_decay=0.3, maximize=True)])
def test_nadam_matches_torch(kw):
    _, ref = run_both(torch.optim.NAdam, kw, "nadam", kw)
    psi = kw.get("momentum_decay", 4e-3)
    prod = math.prod(0.9 * (1 - 0.5 * 0.96 ** (t * psi)) for t in range(1, STEPS + 1))
    assert ref.state["mu_product"] == pytest.approx(prod, rel=1e-14)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                                dict(betas=(0.9, 0.9), maximize=True)])
def test_radam_matches_torch(kw):
    run_both(torch.optim.RAdam, kw, "radam", kw)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True)])
def test_radam_without_sgd_phase(kw):
    """degenerated_to_sgd=False == torch RAdam with lr = 0 while unrectified (moments still move, p does not)."""
    hp = dict(kw, degenerated_to_sgd=False)
    first = next(t for t in range(1, 100) if radam_rect(0.999, t) is not None)
    assert first == 6     # ALGORITHMS.md section 7: first rectified step is t = 6 for torch (> 5)
    run_both(torch.optim.RAdam, kw, "radam", hp,
             torch_group_fn=lambda t: {"lr": 0.0 if t < first else 1e-3})
    # and p really stays put in those steps even with weight decay
    p0, g = np.linspace(-2, 2, 9), np.linspace(1, -1, 9)
    st = {"p": p0, "g": g, "exp_avg": np.zeros(9), "exp_avg_sq": np.zeros(9)}
    for t in range(1, first):
        st = {**reference_step("radam", st, t, dict(hp, weight_decay=0.5)), "g": g}
        assert np.array_equal(st["p"], p0)
    assert not np.array_equal(reference_step("radam", st, first, hp)["p"], p0)


def _e0_as_torch_eps(eps, beta2, bias_correction=True):
    # E0 with eps  ==  E1 with eps/sqrt(bc2)  (ALGORITHMS.md section 0)
    return lambda t: {"eps": eps / math.sqrt(1 - beta2 ** t) if bias_correction else eps}


@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True), dict(weight_decay=0.1)])
def test_adamod_beta3_zero_is_e0_adamw(kw):
    """With beta3 = 0, s = eta and min(eta, s) = eta: AdaMod is E0 Adam with decoupled lr*wd decay."""
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ())
    tkw = dict(kw, weight_decay=kw.get("weight_decay", 0.0))
    run_both(torch.optim.AdamW, tkw, "adamod", dict(kw, beta3=0.0), keys=keys,
             torch_group_fn=_e0_as_torch_eps(1e-8, 0.999))


def test_adamod_bound_and_state():
    """s is the EMA of eta (authors' code form) and the step uses min(eta, s)."""
    rng = np.random.default_rng(3)
    p, g, m, v, s = (rng.normal(size=16), rng.normal(size=16), rng.normal(size=16), rng.uniform(0, 2, 16),
                     rng.uniform(0, 2e-3, 16))
    t, lr, b3 = 7, 1e-3, 0.9
    out = reference_step("adamod", dict(p=p, g=g, exp_avg=m, exp_avg_sq=v, exp_avg_lr=s), t,
                         dict(lr=lr, beta3=b3, weight_decay=0.1))
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g * g
    eta = lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) / (np.sqrt(v1) + 1e-8)
    s1 = b3 * s + (1 - b3) * eta
    np.testing.assert_allclose(out["exp_avg_lr"], s1, rtol=1e-14)
    np.testing.assert_allclose(out["p"], p - lr * 0.1 * p - np.minimum(eta, s1) * m1, rtol=1e-13, atol=1e-16)
    assert np.any(eta < s1) and np.any(eta > s1)     # both branches of the min were exercised


DIFF_KEYS = ("exp_avg", "exp_avg_sq", "previous_grad")


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(betas=(0.8, 0.99), eps=1e-6, lr=1e-2)],
                         ids=["plain", "l2", "betas"])
def test_diffgrad_matches_torch_optimizer(kw):
    """torch-optimizer's DiffGrad is the diffGrad v2 code (ALGORITHMS.md section 10); float64, 50 steps: 1e-14
    (measured <= 4e-16 on every tensor)."""
    import torch_optimizer
    run_both(torch_optimizer.DiffGrad, kw, "diffgrad", kw, keys=DIFF_KEYS, rel=1e-14)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1)], ids=["plain", "l2"])
def test_diffmod_beta3_zero_is_diffgrad(kw):
    """beta3 = 0 makes s = eta, min(eta, s) = eta: DiffMod with the decay folded into g is diffGrad."""
    import torch_optimizer
    run_both(torch_optimizer.DiffGrad, kw, "diffmod", dict(kw, beta3=0.0, decoupled_weight_decay=False),
             keys=DIFF_KEYS, rel=1e-14)


def test_diffmod_bound_friction_and_state():
    """One DiffMod step by hand: AdaMod's s and min, times xi = sigmoid(|g_prev - g|) on m; g_prev <- g;
    decoupled lr*wd decay by default."""
    rng = np.random.default_rng(5)
    p, g, m, v, s = (rng.normal(size=16), rng.normal(size=16), rng.normal(size=16), rng.uniform(0, 2, 16),
                     rng.uniform(0, 2e-3, 16))
    g_prev = g + rng.normal(size=16) * 10.0 ** rng.uniform(-3, 1, 16)
    t, lr, b3, wd = 7, 1e-3, 0.9, 0.1
    out = reference_step("diffmod", dict(p=p, g=g, exp_avg=m, exp_avg_sq=v, exp_avg_lr=s, previous_grad=g_prev),
                         t, dict(lr=lr, beta3=b3, weight_decay=wd))
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g * g
    eta = lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) / (np.sqrt(v1) + 1e-8)
    s1 = b3 * s + (1 - b3) * eta
    xi = 1 / (1 + np.exp(-np.abs(g_prev - g)))
    np.testing.assert_array_equal(out["previous_grad"], g)
    np.testing.assert_allclose(out["exp_avg_lr"], s1, rtol=1e-14)
    np.testing.assert_allclose(out["p"], p - lr * wd * p - np.minimum(eta, s1) * xi * m1, rtol=1e-13, atol=1e-16)
    assert np.any(eta < s1) and np.any(eta > s1)     # both branches of the min were exercised
    assert np.min(xi) < 0.51 and np.max(xi) > 0.95   # friction near both ends of [0.5, 1)


def test_friction_first_step_and_unchanged_gradient():
    """g_prev starts at 0, so xi_1 = sigmoid(|g_1|); a repeated gradient gives xi = 1/2 exactly: diffGrad is then
    E0 Adam at half the learning rate (the v1 aliasing bug made every step after the first like this)."""
    g = np.array([-3.0, 0.0, 1e-3, 2.0])
    np.testing.assert_array_equal(friction(np.zeros(4), g), 1 / (1 + np.exp(-np.abs(g))))
    np.testing.assert_array_equal(friction(g, g), np.full(4, 0.5))
    st = dict(p=np.ones(4), g=g, exp_avg=np.full(4, 0.3), exp_avg_sq=np.full(4, 0.2), previous_grad=g)
    half = reference_step("diffgrad", st, 3, dict(lr=2e-3))
    adam = reference_step("adabound", {k: v for k, v in st.items() if k != "previous_grad"}, 3,
                          dict(lr=1e-3, gamma=1e-30))   # unclamped AdaBound: E0 Adam (test above)
    np.testing.assert_allclose(half["p"], adam["p"], rtol=1e-15)


def test_adabound_bounds_table():
    # ALGORITHMS.md section 9, defaults final_lr=0.1, gamma=1e-3, lr = base lr
    table = {1: (9.99e-5, 100.1), 1000: (0.05, 0.2), 10_000: (0.0909, 0.11), 100_000: (0.0990, 0.101)}
    for t, (lo, hi) in table.items():
        got = adabound_bounds(0.1, 1e-3, 1e-3, 1e-3, t)
        assert got[0] == pytest.approx(lo, rel=1e-3) and got[1] == pytest.approx(hi, rel=1e-3), t
    # an LR scheduler halving lr halves both bounds
    assert adabound_bounds(0.1, 5e-4, 1e-3, 1e-3, 10) == pytest.approx(
        tuple(x / 2 for x in adabound_bounds(0.1, 1e-3, 1e-3, 1e-3, 10)))


@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True), dict(weight_decay=0.1)])
def test_adabound_unclamped_is_e0_adam(kw):
    """With tiny gamma the bounds are ~[0, inf): AdaBound is E0 Adam with L2 (AMSBound: torch amsgrad)."""
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ())
    run_both(torch.optim.Adam, kw, "adabound", dict(kw, gamma=1e-30), keys=keys,
             torch_group_fn=_e0_as_torch_eps(1e-8, 0.999))


def test_adabound_clamped_is_momentum_sgd():
    """With gamma huge the bounds close on fl: p <- p - fl*m, fl = final_lr*lr/initial_lr; AdaBoundW adds wd*p."""
    rng = np.random.default_rng(4)
    p, g, m, v = rng.normal(size=8), rng.normal(size=8), rng.normal(size=8), rng.uniform(0, 1, 8)
    hp = dict(gamma=1e12, final_lr=0.2, lr=5e-4, initial_lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True)
    out = reference_step("adabound", dict(p=p, g=g, exp_avg=m, exp_avg_sq=v), 9, hp)
    m1 = 0.9 * m + 0.1 * g
    np.testing.assert_allclose(out["p"], p - 0.1 * m1 - 0.05 * p, rtol=1e-9)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_without_bias_correction(decoupled):
    """bc1 = bc2 = 1: torch Adam with lr_t = lr*bc1/sqrt(bc2), eps_t = eps/sqrt(bc2) (and wd rescaled)."""
    lr, eps, wd, b1, b2 = 1e-3, 1e-8, 0.1, 0.9, 0.999

    def group(t):
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        lr_t = lr * bc1 / math.sqrt(bc2)
        return {"lr": lr_t, "eps": eps / math.sqrt(bc2), "weight_decay": wd * lr / lr_t if decoupled else wd}

    kw = dict(weight_decay=wd, decoupled_weight_decay=decoupled)
    run_both(torch.optim.Adam, kw, "adam", dict(kw, bias_correction=False), torch_group_fn=group)
    # first step of Adam without bias correction is lr*(1-b1)/sqrt(1-b2) in size (ALGORITHMS.md section 1)
    out = reference_step("adam", dict(p=np.zeros(1), g=np.ones(1), exp_avg=np.zeros(1), exp_avg_sq=np.zeros(1)),
                         1, dict(bias_correction=False, eps=0.0))
    assert out["p"][0] == pytest.approx(-lr * 0.1 / math.sqrt(0.001), rel=1e-14)


def test_adamax_without_bias_correction():
    run_both(torch.optim.Adamax, dict(weight_decay=0.1), "adamax", dict(weight_decay=0.1, bias_correction=False),
             keys=("exp_avg", "exp_inf"), torch_group_fn=lambda t: {"lr": 1e-3 * (1 - 0.9 ** t)})


def test_one_cycle_uses_current_beta1():
    """OneCycleLR(cycle_momentum=True) rewrites lr and betas[0]; bias correction uses the current beta1."""
    prob = NoisyQuadratic(N, seed=5)
    p = torch.tensor(prob.p0(), requires_grad=True)
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=60, cycle_momentum=True)
    ref = ReferenceTrajectory("adam", prob.p0(), dict(lr=1e-3))
    beta1s = set()
    for t in range(1, 61):
        grp = opt.param_groups[0]
        hp = {"lr": grp["lr"], "betas": tuple(grp["betas"])}
        beta1s.add(hp["betas"][0])
        p.grad = torch.tensor(prob(p.detach(), t))
        opt.step()
        sched.step() if t < 60 else None
        ref.step(prob(ref.p, t), hp)
        assert_rel(f"p at t={t}", p, ref.p, REL)
        assert_rel(f"m at t={t}", opt.state[p]["exp_avg"], ref.state["exp_avg"], REL)
    assert len(beta1s) > 30     # beta1 really changed along the way


def test_lookahead_reference():
    """Lookahead(k, alpha) on a reference trajectory: explicit recomputation of the slow/fast rule."""
    prob = NoisyQuadratic(8, seed=6)
    la = ReferenceLookahead(k=5, alpha=0.5)
    ref = ReferenceTrajectory("adam", prob.p0(), dict(lr=1e-2), lookahead=la)
    plain = ReferenceTrajectory("adam", prob.p0(), dict(lr=1e-2))
    slow = prob.p0()
    for t in range(1, 21):
        plain.p = ref.p.copy()        # the inner optimizer state is never reset by Lookahead
        plain.state = {k: np.copy(v) for k, v in ref.state.items()}
        plain.t = ref.t
        g = prob(ref.p, t)
        fast = plain.step(g)
        got = ref.step(g)
        if t % 5 == 0:
            slow = slow + 0.5 * (fast - slow)
            np.testing.assert_allclose(got, slow, rtol=1e-15)
            np.testing.assert_array_equal(la.slow, got)
        else:
            np.testing.assert_array_equal(got, fast)


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="nonsense"):
        resolve_hp("nonsense")
    with pytest.raises(ValueError, match="step"):
        reference_step("adam", dict(p=[1.0], g=[1.0], exp_avg=[0.0], exp_avg_sq=[0.0]), 0)


def test_reference_does_not_modify_inputs():
    st = dict(p=np.ones(3), g=np.ones(3), exp_avg=np.zeros(3), exp_avg_sq=np.zeros(3))
    before = {k: v.copy() for k, v in st.items()}
    reference_step("adam", st, 1, dict(weight_decay=0.1))
    for k in st:
        assert np.array_equal(st[k], before[k])
    assert to64(torch.ones(2)).dtype == np.float64
