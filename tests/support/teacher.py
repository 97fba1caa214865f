"""Teacher forcing for ShardedOptimizer: put a chosen state into the optimizer, take one step, and derive the
per-element tolerances of ALGORITHMS.md section 15.2 for every output tensor.

Tolerance model (float32 compute against exact math on the same float32 inputs; ``ulp`` = float32 ulp):

* The gradient the moments see is ``g' = ±g + l2*p``; it can cancel, so its error scale is ``G = |g| + l2*|p|``,
  and forming it rounds twice (product, sum): ``dG = 1.5 ulp(G)`` (0 without L2: then g' is exact).
* m: ``beta1*m + (1-beta1)*g'`` via lerp; section 15.2 measures <= 1.6 ulp of ``beta1|m| + (1-beta1)|g|``.  We
  allow 2 ulp of ``M = beta1|m| + (1-beta1)G`` plus the propagated ``(1-beta1)*dG``.
* v: sum of non-negative terms; section 15.2 measures <= 2.25 ulp(v).  We allow 3 ulp of
  ``V = beta2*v + (1-beta2)G^2`` plus the propagated ``(1-beta2)*2G*dG``.  v_max = max(v_max, v): the same.
* u (AdaMax): a max of rounded non-negative terms: 2 ulp of ``max(beta2*u, G + eps)`` plus ``dG``.
* p: ``p_new = p - decay - update``.  The final subtraction and the decoupled decay each round once in p's
  magnitude (2 ulp of max(|p_old|, |p_new|)), the decay product once more (2^-23 * |decay|).  The update is a
  product/quotient chain: m carries <= ~3.5 * 2^-23 of M (not of |m|: m may cancel, which is where section
  15.2's "most of this comes from cancellation in m" comes from), sqrt(v) 1.5 ulp, the denominator's scale and
  eps additions, the division and the fp32-cast host scalar 0.5 ulp each: about 8 * 2^-23 of
  ``U = |step| * M / denom`` (plus ``|c_g| * G / denom`` for NAdam).  We allow 12 * 2^-23 * U.
* s (AdaMod's exp_avg_lr): an EMA of positive eta, eta carrying ~4 * 2^-23 relative error: 6 * 2^-23 of
  ``beta3*s + (1-beta3)*eta`` plus 1 ulp.  With L2, v also carries the propagated ``dv = (1-beta2)*2G*dG``, which
  is not small relative to v where g' cancels (v fresh at t = 1 is ``(1-beta2)*g'^2``): eta = step/(sqrt(v)+eps)
  then moves by ``eta * dv / (2 sqrt(v) (sqrt(v) + eps))``, times (1-beta3) in s.
* g_prev (diffGrad's previous_grad) is the kernel's g': exact without L2, else ``dG``.  The friction
  ``xi = 1/(1 + exp(-|D|))``, ``D = g_prev - g'``: D carries 0.5 ulp(|g_prev| + G) (the subtraction) plus ``dG``;
  ``dxi/xi = (1 - xi) dD <= dD/2`` since xi >= 0.5; exp, add and divide round once each and ``xi*m`` once more:
  ``xi`` scales the update by a factor with relative error ``dD/2 + 4 * 2^-23``, added to the update's tolerance.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from tests.support.numerics import EPS32, TINY32, to64, ulp32
from tests.support.reference import (adabound_bounds, friction, nadam_mu, radam_rect, reference_step, resolve_hp,
                                     state_keys)

N_ELEM = 35   # one size throughout, so compiled kernels are not re-specialised per test


def random_state(algorithm: str, hp: Mapping[str, Any], p: np.ndarray, g: np.ndarray, t: int, seed: int) -> dict:
    """A plausible float32 state before step t (t >= 2): moments on the gradient's scale, positive where needed."""
    rng = np.random.default_rng(seed + 1000)
    n = p.size
    h = resolve_hp(algorithm, hp)
    gs = np.abs(g.astype(np.float64)) * 10.0 ** rng.uniform(-1, 1, n) + 1e-12
    st: dict[str, Any] = {}
    for k in state_keys(algorithm, hp):
        if k == "exp_avg":
            st[k] = (rng.normal(size=n) * gs).astype(np.float32)
        elif k == "exp_avg_sq":
            st[k] = (gs ** 2 * rng.uniform(0.2, 2.0, n)).astype(np.float32)
        elif k == "max_exp_avg_sq":
            st[k] = (gs ** 2 * rng.uniform(0.2, 4.0, n)).astype(np.float32)
        elif k == "exp_inf":
            st[k] = (gs * rng.uniform(0.5, 2.0, n) + h["eps"]).astype(np.float32)
        elif k == "exp_avg_lr":
            # around the step size eta = lr*sqrt(bc2)/bc1/(sqrt(v)+eps), so that min(eta, s) picks both sides
            bc = math.sqrt(1 - h["betas"][1] ** t) / (1 - h["betas"][0] ** t) if h["bias_correction"] else 1.0
            eta = h["lr"] * bc / (gs + h["eps"])
            st[k] = (eta * 10.0 ** rng.uniform(-1, 1, n)).astype(np.float32)
        elif k == "previous_grad":
            # around g, so that |g_prev - g| spans ~0 (xi near 0.5) to large (xi near 1)
            st[k] = (g * rng.uniform(0.5, 1.5, n) + rng.normal(size=n) * gs * 10.0 ** rng.uniform(-4, 1, n)
                     ).astype(np.float32)
        elif k == "mu_product":
            b1, psi = h["betas"][0], h["momentum_decay"]
            st[k] = math.prod(nadam_mu(b1, i, psi) for i in range(1, t)) if t <= 2000 else 1e-30
    return st


def make_optimizer(ShardedOptimizer, algorithm, hp, kernel, p32: np.ndarray, state: dict | None, t: int):
    """A one-parameter optimizer whose next step is step t, holding ``state`` (None: fresh, t must be 1)."""
    p = torch.tensor(p32, dtype=torch.float32, requires_grad=True)
    opt = ShardedOptimizer([p], algorithm=algorithm, kernel=kernel, **hp)
    if t > 1:
        sd = opt.state_dict()
        st = {"step": torch.tensor(t - 1, dtype=torch.int64)}
        for k, v in state.items():
            st[k] = torch.tensor(v, dtype=torch.float64) if k == "mu_product" else torch.tensor(v, dtype=torch.float32)
        sd["state"] = {0: st}
        opt.load_state_dict(sd)
    return opt, p


def tolerances(algorithm: str, hp: Mapping[str, Any], inp: Mapping[str, Any], out: Mapping[str, Any], t: int) -> dict:
    """Per-element tolerances (float64 arrays) for every tensor produced by one step (see module docstring)."""
    h = resolve_hp(algorithm, hp)
    b1, b2 = h["betas"]
    wd, eps, lr = h["weight_decay"], h["eps"], h["lr"]
    dec = bool(h["decoupled_weight_decay"])
    p = to64(inp["p"])
    G = np.abs(to64(inp["g"])) + (0.0 if dec else wd) * np.abs(p)
    M = b1 * np.abs(to64(inp["exp_avg"])) + (1 - b1) * G
    bc1 = 1 - b1 ** t if h["bias_correction"] else 1.0
    bc2 = 1 - b2 ** t if h["bias_correction"] else 1.0
    dG = 1.5 * ulp32(G) if (wd and not dec) else np.zeros_like(G)
    tol = {"exp_avg": 2 * ulp32(M) + (1 - b1) * dG}
    if "exp_avg_sq" in inp:
        V = b2 * to64(inp["exp_avg_sq"]) + (1 - b2) * G * G
        tol["exp_avg_sq"] = 3 * ulp32(V) + (1 - b2) * 2 * G * dG
    if "max_exp_avg_sq" in inp:
        tol["max_exp_avg_sq"] = np.maximum(tol["exp_avg_sq"], 3 * ulp32(to64(inp["max_exp_avg_sq"])))
    vuse = to64(out["max_exp_avg_sq"] if "max_exp_avg_sq" in out else out.get("exp_avg_sq", 0.0))

    def s_tolerance(S: np.ndarray, eta: np.ndarray) -> np.ndarray:
        dv = (1 - b2) * 2 * G * dG  # the propagated L2 error of v (0 without L2)
        root = np.sqrt(vuse)
        eta_from_v = eta * dv / np.maximum(2 * root * (root + eps), np.finfo(np.float64).tiny)
        return 6 * EPS32 * S + ulp32(S) + (1 - h["beta3"]) * eta_from_v

    decay = np.zeros_like(p)
    friction_extra = np.zeros_like(p)
    if wd and dec:
        decay = (wd if algorithm == "adabound" else lr * wd) * np.abs(p)
    if algorithm in ("adam", "adamw"):
        U = (lr / bc1) * M / (np.sqrt(vuse) / math.sqrt(bc2) + eps)
    elif algorithm == "adamax":
        u = np.maximum(b2 * to64(inp["exp_inf"]), G + eps)
        tol["exp_inf"] = 2 * ulp32(u) + dG
        U = (lr / bc1) * M / to64(out["exp_inf"])
    elif algorithm == "nadam":
        psi = h["momentum_decay"]
        mu, mu_next = nadam_mu(b1, t, psi), nadam_mu(b1, t + 1, psi)
        prod = float(inp["mu_product"]) * mu
        d = np.sqrt(vuse / (1 - b2 ** t)) + eps
        U = (lr * (1 - mu) / (1 - prod) * G + lr * mu_next / (1 - prod * mu_next) * M) / d
    elif algorithm == "radam":
        r = radam_rect(b2, t)
        if r is not None:
            U = lr * r * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * M / (np.sqrt(vuse) + eps)
        elif h["degenerated_to_sgd"]:
            U = lr / (1 - b1 ** t) * M
        else:
            U = np.zeros_like(p)
            decay = np.zeros_like(p)
    elif algorithm in ("diffgrad", "diffmod"):
        gp = to64(inp["previous_grad"])
        tol["previous_grad"] = np.maximum(dG, TINY32)
        xi = friction(gp, to64(out["previous_grad"]))
        xi_rel = 0.5 * (0.5 * ulp32(np.abs(gp) + G) + dG) + 4 * EPS32
        eta = (lr * math.sqrt(bc2) / bc1) / (np.sqrt(vuse) + eps)
        if algorithm == "diffmod":
            S = h["beta3"] * to64(inp["exp_avg_lr"]) + (1 - h["beta3"]) * eta
            tol["exp_avg_lr"] = s_tolerance(S, eta)
            eta = np.minimum(eta, to64(out["exp_avg_lr"]))
        U = eta * xi * M
        friction_extra = U * xi_rel
    elif algorithm in ("adamod", "adabound"):
        eta = (lr * math.sqrt(bc2) / bc1) / (np.sqrt(vuse) + eps)
        if algorithm == "adamod":
            S = h["beta3"] * to64(inp["exp_avg_lr"]) + (1 - h["beta3"]) * eta
            tol["exp_avg_lr"] = s_tolerance(S, eta)
            eta = np.minimum(eta, to64(out["exp_avg_lr"]))
        else:
            lo, hi = adabound_bounds(h["final_lr"], lr, h["initial_lr"], h["gamma"], t)
            eta = np.clip(eta, lo, hi)
        U = eta * M
    else:  # pragma: no cover
        raise AssertionError(algorithm)
    pmax = np.maximum(np.abs(p), np.abs(to64(out["p"])))
    tol["p"] = 2 * ulp32(pmax) + EPS32 * decay + 12 * EPS32 * U + friction_extra
    return tol


def ref_inputs(p32, g32, state) -> dict:
    d = {"p": p32.astype(np.float64), "g": g32.astype(np.float64)}
    for k, v in state.items():
        d[k] = float(v) if k == "mu_product" else np.asarray(v, dtype=np.float64)
    return d


def reference_for(algorithm, hp, p32, g32, state, t):
    inp = ref_inputs(p32, g32, state)
    return inp, reference_step(algorithm, inp, t, hp)
