"""The statistics pass: optimizer-health partial sums over one rank's shard.

Run only on statistics steps (every ``stats_interval`` steps), in two short passes around the fused update:
:func:`pre_update_sums` reads the gradient and the *previous* first moment (for the momentum/gradient cosine),
:func:`post_update_sums` re-derives each element's step size from the new state and the same host scalars the
kernel used, so no extra state is kept.  Elementwise work stays in the state's dtype; every sum accumulates in
float64 and counts are exact.  The effective-LR histogram is one ``bucketize`` + ``bincount`` pass.  The layout is
:mod:`sharded_optim.telemetry.fields`; padding is excluded by passing only the real ranges.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..rules import DSCALE, EPS, HI, LO, STEP
from ..telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS

_F64 = torch.float64
_EDGE_CACHE: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _sum(x: Tensor) -> Tensor:
    return torch.sum(x, dtype=_F64)


_CHUNK = 4096


def sumsq(x: Tensor) -> Tensor:
    """Sum of squares in float64, fast: exact-enough fp32 norms of 4096-element chunks combined in float64.

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


_sumsq = sumsq


def _edges(like: Tensor) -> Tensor:
    key = (like.dtype, like.device)
    if key not in _EDGE_CACHE:
        _EDGE_CACHE[key] = torch.tensor(EFF_LR_EDGES, dtype=like.dtype, device=like.device)
    return _EDGE_CACHE[key]


def pre_update_sums(out: Tensor, grad: Tensor, m_prev: Tensor, gscale: float) -> None:
    """Add the gradient statistics of one real range to ``out`` (float64, ``NUM_FIELDS``)."""
    g = grad.to(m_prev.dtype)
    finite = torch.isfinite(g)
    nonfinite = g.numel() - int(finite.sum())
    out[FIELD_INDEX["numel"]] += g.numel()
    out[FIELD_INDEX["grad_sumsq"]] += _sumsq(g)
    out[FIELD_INDEX["nonfinite_grad"]] += nonfinite
    out[FIELD_INDEX["zero_grad"]] += int((g == 0).sum())
    dot = torch.dot(m_prev, torch.where(finite, g, 0.0) if nonfinite else g) if m_prev.dim() == 1 \
        else _sum(m_prev * g)
    out[FIELD_INDEX["mom_grad_dot"]] += float(dot) * gscale
    out[FIELD_INDEX["mom_sumsq"]] += _sumsq(m_prev)


def post_update_sums(out: Tensor, variant: str, scalars: list[float], lr: float, p: Tensor,
                     state: dict[str, Tensor]) -> None:
    """Add the update statistics of one real range to ``out``.

    ``state`` maps torch.optim state names to this range's (already updated) tensors.  The step size per element
    is ``eta = step / (sqrt(v_hat)*dscale + eps)`` (bounded for AdaMod/AdaBound; ``step/u`` for AdaMax), the
    applied adaptive update ``delta = eta*m`` (weight decay and NAdam's gradient term excluded).
    """
    m = state["exp_avg"]
    if variant == "adamax_mu":
        denom = state["exp_inf"]
        out[FIELD_INDEX["eps_dominated"]] += int((denom <= 2 * scalars[EPS]).sum())
    else:
        vhat = state["max_exp_avg_sq"] if "max_exp_avg_sq" in state else state["exp_avg_sq"]
        root = vhat.sqrt().mul_(scalars[DSCALE])
        out[FIELD_INDEX["eps_dominated"]] += int((root < scalars[EPS]).sum())
        if "max_exp_avg_sq" in state:
            out[FIELD_INDEX["amsgrad_max_active"]] += int((vhat > state["exp_avg_sq"]).sum())
        denom = root.add_(scalars[EPS])
    eta = torch.reciprocal(denom).mul_(scalars[STEP]) if variant == "adamax_mu" else denom.reciprocal_().mul_(scalars[STEP])
    if variant.startswith("bound"):
        if "exp_avg_lr" in state:
            s = state["exp_avg_lr"]
            out[FIELD_INDEX["adamod_clipped"]] += int((s < eta).sum())
            eta = torch.minimum(eta, s)
        else:
            out[FIELD_INDEX["adabound_clamped"]] += int(((eta < scalars[LO]) | (eta > scalars[HI])).sum())
        eta = eta.clamp(scalars[LO], scalars[HI])
    delta = eta * m
    update_sumsq = _sumsq(delta)
    out[FIELD_INDEX["param_sumsq"]] += _sumsq(p)
    out[FIELD_INDEX["update_sumsq"]] += update_sumsq
    if lr > 0:
        out[FIELD_INDEX["unit_update_sumsq"]] += update_sumsq / (lr * lr)
    out[FIELD_INDEX["eff_lr_sum"]] += _sum(eta)
    # bucket i counts eta in (edge_{i-1}, edge_i]; the cumulative sum gives the "<= edge" counts Prometheus wants
    counts = torch.bincount(torch.bucketize(eta, _edges(eta)), minlength=len(EFF_LR_EDGES) + 1)
    base = FIELD_INDEX["eff_lr_le_0"]
    out[base: base + len(EFF_LR_EDGES)] += torch.cumsum(counts[: len(EFF_LR_EDGES)], 0).to(_F64)


def new_sums(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(NUM_FIELDS, dtype=_F64, device=device)
