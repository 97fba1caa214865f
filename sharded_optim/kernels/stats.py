"""The statistics pass: optimizer-health partial sums over one rank's shard.

Run only on statistics steps (every ``stats_interval`` steps), in two short passes around the fused update:
:func:`pre_update_sums` reads the gradient and the *previous* first moment (for the momentum/gradient cosine),
:func:`post_update_sums` re-derives each element's step size from the new state and the same host scalars the
kernel used, so no extra state is kept.  Sums are float64 and counts are exact; the layout is
:mod:`sharded_optim.telemetry.fields`.  Padding elements are excluded by passing only the real ranges.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..rules import DSCALE, EPS, GSCALE, HI, LO, STEP
from ..telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def pre_update_sums(out: Tensor, grad: Tensor, m_prev: Tensor, gscale: float) -> None:
    """Add the gradient statistics of one real range to ``out`` (float64, ``NUM_FIELDS``)."""
    g = _f64(grad) * gscale
    finite = torch.isfinite(g)
    out[FIELD_INDEX["numel"]] += g.numel()
    out[FIELD_INDEX["grad_sumsq"]] += g.square().sum()
    out[FIELD_INDEX["nonfinite_grad"]] += (~finite).sum()
    out[FIELD_INDEX["zero_grad"]] += (g == 0).sum()
    m = _f64(m_prev)
    out[FIELD_INDEX["mom_grad_dot"]] += (m * torch.where(finite, g, 0.0)).sum()
    out[FIELD_INDEX["mom_sumsq"]] += m.square().sum()


def post_update_sums(out: Tensor, variant: str, scalars: list[float], lr: float, p: Tensor,
                     state: dict[str, Tensor], v_before_max: Tensor | None = None) -> None:
    """Add the update statistics of one real range to ``out``.

    ``state`` maps torch.optim state names to this range's (already updated) tensors.  The step size per element
    is ``eta = step / (sqrt(v_hat)*dscale + eps)`` (bounded for AdaMod/AdaBound; ``step/u`` for AdaMax), the
    applied adaptive update ``delta = eta*m`` (weight decay and NAdam's gradient term excluded).
    """
    m = _f64(state["exp_avg"])
    step = scalars[STEP]
    if variant == "adamax_mu":
        denom = _f64(state["exp_inf"])
        eps_dominated = denom <= 2 * scalars[EPS]
    else:
        vhat = _f64(state["max_exp_avg_sq"] if "max_exp_avg_sq" in state else state["exp_avg_sq"])
        root = vhat.sqrt() * scalars[DSCALE]
        denom = root + scalars[EPS]
        eps_dominated = root < scalars[EPS]
        if "max_exp_avg_sq" in state:
            out[FIELD_INDEX["amsgrad_max_active"]] += (vhat > _f64(state["exp_avg_sq"])).sum()
    eta = step / denom
    if variant.startswith("bound"):
        if "exp_avg_lr" in state:
            s = _f64(state["exp_avg_lr"])
            out[FIELD_INDEX["adamod_clipped"]] += (s < eta).sum()
            eta = torch.minimum(eta, s)
        else:
            out[FIELD_INDEX["adabound_clamped"]] += ((eta < scalars[LO]) | (eta > scalars[HI])).sum()
        eta = eta.clamp(scalars[LO], scalars[HI])
    delta = eta * m
    out[FIELD_INDEX["param_sumsq"]] += _f64(p).square().sum()
    out[FIELD_INDEX["update_sumsq"]] += delta.square().sum()
    if lr > 0:
        out[FIELD_INDEX["unit_update_sumsq"]] += (delta / lr).square().sum()
    out[FIELD_INDEX["eps_dominated"]] += eps_dominated.sum()
    out[FIELD_INDEX["eff_lr_sum"]] += eta.sum()
    base = FIELD_INDEX["eff_lr_le_0"]
    for i, edge in enumerate(EFF_LR_EDGES):
        out[base + i] += (eta <= edge).sum()


def new_sums(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(NUM_FIELDS, dtype=torch.float64, device=device)
