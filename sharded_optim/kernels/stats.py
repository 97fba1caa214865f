"""The statistics pass: optimizer-health partial sums over one rank's shard.

Run only on statistics steps (every ``stats_interval`` steps), in two short passes around the fused update:
:func:`pre_update_sums` reads the gradient and the *previous* first moment (for the momentum/gradient cosine),
:func:`post_update_sums` re-derives each element's step size from the new state and the same scalar vector the
kernel used, so no extra state is kept.  Both are pure functions returning float64 sums; compiled (like the update
kernels) each becomes one fused loop per variant that reads every tensor once and accumulates in float64 without
materialising temporaries.  The layout of the sums is :mod:`sharded_optim.telemetry.fields`; padding is excluded
by passing only the real ranges.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ..rules import DSCALE, EPS, HI, LO, STEP
from ..telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS

_F64 = torch.float64
_CHUNK = 4096
PRE_FIELDS = ("numel", "grad_sumsq", "nonfinite_grad", "zero_grad", "mom_grad_dot", "mom_sumsq")
POST_FIELDS = ("param_sumsq", "update_sumsq", "eps_dominated", "amsgrad_max_active", "adamod_clipped",
               "adabound_clamped", "eff_lr_sum") + tuple(f"eff_lr_le_{i}" for i in range(len(EFF_LR_EDGES)))


def sumsq(x: Tensor) -> Tensor:
    """Sum of squares in float64, fast in eager mode: fp32 norms of 4096-element chunks combined in float64.

    ``vector_norm(x, dtype=float64)`` is ~12x slower on CPU (it converts every element), and one fp32 norm over
    16M elements is off by ~1e-3 relative; per-chunk fp32 norms combined in float64 measured 5e-9.
    """
    x = x.reshape(-1)
    n = x.numel() - x.numel() % _CHUNK
    total = torch.zeros((), dtype=_F64, device=x.device)
    if n:
        total = torch.linalg.vector_norm(x[:n].view(-1, _CHUNK), dim=1).to(_F64).square().sum()
    if n < x.numel():
        total = total + torch.linalg.vector_norm(x[n:], dtype=_F64).square()
    return total


def _sum64(x: Tensor) -> Tensor:
    return torch.sum(x, dtype=_F64)  # compiled: a float64 accumulator inside the fused loop, no temporary


def _pre(grad: Tensor, m_prev: Tensor, gscale: Tensor) -> Tensor:
    g = grad.to(m_prev.dtype) * gscale.to(m_prev.dtype)
    m = m_prev
    finite = torch.isfinite(g)
    numel = torch.full((), g.numel(), dtype=_F64, device=g.device)
    return torch.stack([numel, _sum64(g * g), _sum64(~finite), _sum64(g == 0),
                        _sum64(m * torch.where(finite, g, 0.0)), _sum64(m * m)])


def _post(variant: str, p: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, s: Tensor | None, sc: Tensor,
          edges: Tensor) -> Tensor:
    """Elementwise work in the state's dtype (the kernel's own precision), sums accumulated in float64."""
    zero = torch.zeros((), dtype=_F64, device=p.device)
    sc = sc.to(p.dtype)
    if variant == "adamax_mu":
        denom = v
        eps_dominated = _sum64(denom <= 2 * sc[EPS])
    else:
        vhat = vmax if vmax is not None else v
        root = vhat.sqrt() * sc[DSCALE]
        eps_dominated = _sum64(root < sc[EPS])
        denom = root + sc[EPS]
    ams = _sum64(vmax > v) if vmax is not None else zero
    eta = sc[STEP] / denom
    clipped, clamped = zero, zero
    if variant.startswith("bound"):
        if s is not None:
            clipped = _sum64(s < eta)
            eta = torch.minimum(eta, s)
        else:
            clamped = _sum64((eta < sc[LO]) | (eta > sc[HI]))
        eta = torch.clamp(eta, sc[LO], sc[HI])
    delta = eta * m
    edges = edges.to(p.dtype)
    counts = [_sum64(eta <= edges[i]) for i in range(len(EFF_LR_EDGES))]
    return torch.stack([_sum64(p * p), _sum64(delta * delta), eps_dominated, ams, clipped, clamped,
                        _sum64(eta)] + counts)


@functools.cache
def _compiled(name: str) -> Callable[..., Tensor]:
    return torch.compile(_pre if name == "pre" else _post, dynamic=True)


def _run(name: str, mode: str, *args) -> Tensor:
    fn = _pre if name == "pre" else _post
    if mode == "eager":
        return fn(*args)
    try:
        return _compiled(name)(*args)
    except Exception:  # compilation problems: the eager form computes the same sums
        if mode == "compiled":
            raise
        return fn(*args)


def pre_update_sums(out: Tensor, grad: Tensor, m_prev: Tensor, gscale: float, mode: str = "eager") -> None:
    """Add the gradient statistics of one real range to ``out`` (float64, ``NUM_FIELDS``)."""
    sums = _run("pre", mode, grad, m_prev, torch.tensor(gscale, dtype=_F64, device=grad.device))
    for i, name in enumerate(PRE_FIELDS):
        out[FIELD_INDEX[name]] += sums[i]


def post_update_sums(out: Tensor, variant: str, scalars: list[float], lr: float, p: Tensor,
                     state: dict[str, Tensor], mode: str = "eager") -> None:
    """Add the update statistics of one real range to ``out``.

    ``state`` maps torch.optim state names to this range's (already updated) tensors.  The step size per element
    is ``eta = step / (sqrt(v_hat)*dscale + eps)`` (bounded for AdaMod/AdaBound; ``step/u`` for AdaMax), the
    applied adaptive update ``delta = eta*m`` (weight decay and NAdam's gradient term excluded).
    """
    v = state["exp_inf"] if variant == "adamax_mu" else state["exp_avg_sq"]
    sc = torch.tensor(scalars, dtype=_F64, device=p.device)
    edges = torch.tensor(EFF_LR_EDGES, dtype=_F64, device=p.device)
    sums = _run("post", mode, variant, p, state["exp_avg"], v, state.get("max_exp_avg_sq"), state.get("exp_avg_lr"),
                sc, edges)
    for i, name in enumerate(POST_FIELDS):
        out[FIELD_INDEX[name]] += sums[i]
    if lr > 0:
        out[FIELD_INDEX["unit_update_sumsq"]] += sums[1] / (lr * lr)


def new_sums(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(NUM_FIELDS, dtype=_F64, device=device)
