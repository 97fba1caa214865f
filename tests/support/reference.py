"""Independent float64 reference of the Adam family, for the numerics tests.

Written only from the update equations in ALGORITHMS.md and the per-algorithm semantics chosen in
docs/ARCHITECTURE.md ("Semantics chosen per algorithm").  It deliberately does not import
``sharded_optim``: it is the yardstick the package is measured against.

Everything is computed in numpy float64, per element, in exact-math order (no attempt to copy any
implementation's rounding).  ``t`` is always the step count *after* the increment (first step: t = 1).

State keys use the torch.optim names: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (v_max),
``exp_avg_lr`` (AdaMod's s), ``exp_inf`` (AdaMax's u), ``mu_product`` (NAdam's running product, a float),
``previous_grad`` (diffGrad's g_prev, torch-optimizer's name).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

ALGORITHMS = ("adam", "adamw", "adamax", "nadam", "radam", "adamod", "adabound", "diffgrad", "diffmod")

# Options each algorithm accepts besides lr, betas, eps, weight_decay, decoupled_weight_decay, maximize.
OPTIONS = {
    "adam": {"amsgrad", "bias_correction"},
    "adamw": {"amsgrad", "bias_correction"},
    "adamax": {"bias_correction"},
    "nadam": {"momentum_decay"},
    "radam": {"degenerated_to_sgd"},
    "adamod": {"amsgrad", "bias_correction", "beta3"},
    "adabound": {"amsgrad", "bias_correction", "final_lr", "gamma"},
    "diffgrad": set(),
    "diffmod": {"beta3"},
}

_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=None, amsgrad=False, bias_correction=True,
    decoupled_weight_decay=None, maximize=False, beta3=0.999, final_lr=0.1, gamma=1e-3,
    momentum_decay=4e-3, degenerated_to_sgd=True, initial_lr=None,
)


def resolve_hp(algorithm: str, hp: Mapping[str, Any] | None = None) -> dict:
    """Fill in defaults the way ARCHITECTURE.md specifies (weight_decay / decoupled None = algorithm default)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    out = dict(_DEFAULTS)
    for k, v in (hp or {}).items():
        if k not in out:
            raise ValueError(f"unknown hyperparameter {k!r}")
        out[k] = v
    if out["weight_decay"] is None:
        out["weight_decay"] = 1e-2 if algorithm == "adamw" else 0.0
    if out["decoupled_weight_decay"] is None:
        out["decoupled_weight_decay"] = algorithm in ("adamw", "adamod", "diffmod")
    if out["initial_lr"] is None:
        out["initial_lr"] = out["lr"]
    out["betas"] = (float(out["betas"][0]), float(out["betas"][1]))
    return out


def state_keys(algorithm: str, hp: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The per-parameter state tensors (besides ``step``) an algorithm keeps."""
    h = resolve_hp(algorithm, hp)
    if algorithm == "adamax":
        return ("exp_avg", "exp_inf")
    keys = ["exp_avg", "exp_avg_sq"]
    if h["amsgrad"] and algorithm in ("adam", "adamw", "adamod", "adabound"):
        keys.append("max_exp_avg_sq")
    if algorithm in ("adamod", "diffmod"):
        keys.append("exp_avg_lr")
    if algorithm in ("diffgrad", "diffmod"):
        keys.append("previous_grad")
    if algorithm == "nadam":
        keys.append("mu_product")
    return tuple(keys)


def initial_state(algorithm: str, shape, hp: Mapping[str, Any] | None = None) -> dict:
    """The state before the first step (t = 0): zero moments, mu_product = 1."""
    st = {}
    for k in state_keys(algorithm, hp):
        st[k] = 1.0 if k == "mu_product" else np.zeros(shape, dtype=np.float64)
    return st


def _f64(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64, copy=True)


def radam_rho(beta2: float, t: int) -> tuple[float, float]:
    """(rho_inf, rho_t) of RAdam."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    b2t = beta2 ** t
    return rho_inf, rho_inf - 2.0 * t * b2t / (1.0 - b2t)


def radam_rect(beta2: float, t: int) -> float | None:
    """r_t when RAdam rectifies at step t (torch rule rho_t > 5), else None."""
    rho_inf, rho_t = radam_rho(beta2, t)
    if rho_t <= 5.0:
        return None
    return math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))


def nadam_mu(beta1: float, t: int, momentum_decay: float) -> float:
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


def adabound_bounds(final_lr: float, lr: float, initial_lr: float, gamma: float, t: int) -> tuple[float, float]:
    fl = final_lr * lr / initial_lr
    return fl * (1.0 - 1.0 / (gamma * t + 1.0)), fl * (1.0 + 1.0 / (gamma * t))


def friction(g_prev, g):
    """diffGrad's xi = 1/(1 + exp(-|g_prev - g|)), in [0.5, 1) (ALGORITHMS.md section 10)."""
    return 1.0 / (1.0 + np.exp(-np.abs(g_prev - g)))


def reference_step(algorithm: str, params: Mapping[str, Any], step: int, hp: Mapping[str, Any] | None = None) -> dict:
    """One step of ``algorithm`` in float64 (teacher forcing).

    ``params`` holds ``p``, ``g`` and the state before the step (keys of :func:`state_keys`); ``step`` is t,
    the count after the increment.  Returns a new dict with the updated ``p`` and state (``g`` unchanged).
    Inputs are not modified.
    """
    h = resolve_hp(algorithm, hp)
    t = int(step)
    if t < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    lr, eps, wd = float(h["lr"]), float(h["eps"]), float(h["weight_decay"])
    b1, b2 = h["betas"]
    decoupled = bool(h["decoupled_weight_decay"])
    bias_corr = bool(h["bias_correction"])
    amsgrad = bool(h["amsgrad"])

    p = _f64(params["p"])
    g = _f64(params["g"])
    if h["maximize"]:
        g = -g
    out = {"g": _f64(params["g"])}
    m = _f64(params["exp_avg"])

    # Coupled (L2) decay is part of the gradient: it enters both moments.
    if wd != 0.0 and not decoupled:
        g = g + wd * p

    bc1 = 1.0 - b1 ** t if bias_corr else 1.0
    bc2 = 1.0 - b2 ** t if bias_corr else 1.0

    # Decoupled decay, computed from p_old (the update term never depends on p).
    if wd != 0.0 and decoupled:
        if algorithm == "adabound":
            decay = wd * p               # AdaBoundW: not multiplied by lr (authors' code)
        else:
            decay = (lr * wd) * p
    else:
        decay = np.zeros_like(p)

    m = b1 * m + (1.0 - b1) * g
    out["exp_avg"] = m

    if algorithm == "adamax":
        u = np.maximum(b2 * _f64(params["exp_inf"]), np.abs(g) + eps)
        out["exp_inf"] = u
        out["p"] = p - decay - (lr / bc1) * m / u
        return out

    v = b2 * _f64(params["exp_avg_sq"]) + (1.0 - b2) * g * g
    out["exp_avg_sq"] = v
    v_use = v
    if amsgrad and algorithm in ("adam", "adamw", "adamod", "adabound"):
        vmax = np.maximum(_f64(params["max_exp_avg_sq"]), v)   # max over raw v (torch form)
        out["max_exp_avg_sq"] = vmax
        v_use = vmax

    if algorithm in ("adam", "adamw"):
        # E1: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        upd = (lr / bc1) * m / (np.sqrt(v_use) / math.sqrt(bc2) + eps)
    elif algorithm == "nadam":
        psi = float(h["momentum_decay"])
        mu = nadam_mu(b1, t, psi)
        mu_next = nadam_mu(b1, t + 1, psi)
        prod = float(params["mu_product"]) * mu
        out["mu_product"] = prod
        d = np.sqrt(v / bc2) + eps
        upd = lr * (1.0 - mu) / (1.0 - prod) * g / d + lr * mu_next / (1.0 - prod * mu_next) * m / d
    elif algorithm == "radam":
        r = radam_rect(b2, t)
        if r is not None:
            upd = lr * (m / bc1) * r * math.sqrt(bc2) / (np.sqrt(v) + eps)   # E0
        elif h["degenerated_to_sgd"]:
            upd = lr * m / bc1                                              # SGD with momentum
        else:
            # authors' code: neither the update nor the weight decay touches p before rectification
            upd = np.zeros_like(p)
            decay = np.zeros_like(p)
    elif algorithm == "adamod":
        eta = (lr * math.sqrt(bc2) / bc1) / (np.sqrt(v_use) + eps)          # E0, 1/bc1 folded in
        s = float(h["beta3"]) * _f64(params["exp_avg_lr"]) + (1.0 - float(h["beta3"])) * eta
        out["exp_avg_lr"] = s
        upd = np.minimum(eta, s) * m
    elif algorithm in ("diffgrad", "diffmod"):
        # g here is the transformed gradient (negated, L2 added): g_prev stores it (diffGrad v2 code)
        xi = friction(_f64(params["previous_grad"]), g)
        out["previous_grad"] = g.copy()
        eta = (lr * math.sqrt(bc2) / bc1) / (np.sqrt(v) + eps)              # E0, 1/bc1 folded in
        if algorithm == "diffmod":
            s = float(h["beta3"]) * _f64(params["exp_avg_lr"]) + (1.0 - float(h["beta3"])) * eta
            out["exp_avg_lr"] = s
            eta = np.minimum(eta, s)
        upd = eta * (xi * m)
    elif algorithm == "adabound":
        eta = (lr * math.sqrt(bc2) / bc1) / (np.sqrt(v_use) + eps)          # E0
        lo, hi = adabound_bounds(float(h["final_lr"]), lr, float(h["initial_lr"]), float(h["gamma"]), t)
        upd = np.clip(eta, lo, hi) * m
    else:  # pragma: no cover - resolve_hp rejected it
        raise AssertionError(algorithm)

    out["p"] = p - decay - upd
    return out


class ReferenceLookahead:
    """Lookahead on top of any reference step: every k steps slow <- slow + alpha*(fast - slow); fast <- slow."""

    def __init__(self, k: int = 5, alpha: float = 0.5):
        self.k, self.alpha = int(k), float(alpha)
        self.count = 0
        self.slow: np.ndarray | None = None

    def after_step(self, p: np.ndarray) -> np.ndarray:
        if self.slow is None:
            raise RuntimeError("call start(p0) first")
        self.count += 1
        if self.count >= self.k:
            self.slow = self.slow + self.alpha * (p - self.slow)
            self.count = 0
            return self.slow.copy()
        return p

    def start(self, p0) -> None:
        self.slow = _f64(p0)
        self.count = 0


class ReferenceTrajectory:
    """Runs ``reference_step`` repeatedly on one parameter.

    ``grad_fn(p, t) -> g`` gives the gradient at the current float64 parameter (step t about to be taken).
    ``hp_fn(t) -> dict`` may override hyperparameters per step (a schedule: lr, betas, ...); the values given
    to the constructor are the base.  ``lookahead`` is an optional :class:`ReferenceLookahead`.
    """

    def __init__(self, algorithm: str, p0, hp: Mapping[str, Any] | None = None,
                 lookahead: ReferenceLookahead | None = None):
        self.algorithm = algorithm
        self.hp = dict(hp or {})
        resolve_hp(algorithm, self.hp)  # validate early
        self.p = _f64(p0)
        self.state = initial_state(algorithm, self.p.shape, self.hp)
        self.t = 0
        self.lookahead = lookahead
        if lookahead is not None:
            lookahead.start(self.p)

    def step(self, g, hp_override: Mapping[str, Any] | None = None) -> np.ndarray:
        self.t += 1
        hp = dict(self.hp)
        hp.update(hp_override or {})
        new = reference_step(self.algorithm, {"p": self.p, "g": g, **self.state}, self.t, hp)
        self.p = new.pop("p")
        new.pop("g")
        self.state = new
        if self.lookahead is not None:
            self.p = self.lookahead.after_step(self.p)
        return self.p

    def run(self, steps: int, grad_fn: Callable[[np.ndarray, int], Any],
            hp_fn: Callable[[int], Mapping[str, Any]] | None = None) -> np.ndarray:
        for _ in range(steps):
            t = self.t + 1
            self.step(grad_fn(self.p, t), hp_fn(t) if hp_fn else None)
        return self.p
