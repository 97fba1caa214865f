"""The statistics math: optimizer-health partial sums over one rank's shard.

On statistics steps (every ``stats_interval`` steps) the optimizer runs the update fused with these sums
(:mod:`.fused_stats`): :func:`_pre` reads the gradient and the *previous* first moment (for the momentum/gradient
cosine), :func:`_post` re-derives each element's step size from the new state and the same scalar vector the
kernel used, so no extra state is kept.  Both are pure functions returning float64 sums (float64 accumulators,
elementwise work in the state's dtype).  The layout is :mod:`sharded_optim.telemetry.fields`; the optimizer
passes real (unpadded) ranges only.
"""
from __future__ import annotations

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


MAX_CALL_NUMEL = 2**30  # counts accumulate in int32: callers split larger ranges (exact below 2**31)


def _sum64(x: Tensor) -> Tensor:
    return torch.sum(x, dtype=_F64)  # compiled: a float64 accumulator inside the fused loop, no temporary


def _count(mask: Tensor) -> Tensor:
    # int32 accumulators vectorise twice as wide as float64 ones: counting in float64 (or int64) made a
    # statistics step 1.8x slower on CPU; exact because a call never covers more than MAX_CALL_NUMEL elements
    return torch.sum(mask, dtype=torch.int32).to(_F64)


def _pre(grad: Tensor, m_prev: Tensor, gscale: Tensor) -> Tensor:
    g = grad.to(m_prev.dtype) * gscale.to(m_prev.dtype)
    m = m_prev
    finite = torch.isfinite(g)
    numel = torch.full((), g.numel(), dtype=_F64, device=g.device)
    return torch.stack([numel, _sum64(g * g), _count(~finite), _count(g == 0),
                        _sum64(m * torch.where(finite, g, 0.0)), _sum64(m * m)])


def _post(variant: str, p: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, s: Tensor | None, sc: Tensor,
          edges: Tensor) -> Tensor:
    """Elementwise work in the state's dtype (the kernel's own precision), sums accumulated in float64."""
    zero = torch.zeros((), dtype=_F64, device=p.device)
    sc = sc.to(p.dtype)
    if variant == "adamax_mu":
        denom = v
        eps_dominated = _count(denom <= 2 * sc[EPS])
    else:
        vhat = vmax if vmax is not None else v
        root = vhat.sqrt() * sc[DSCALE]
        eps_dominated = _count(root < sc[EPS])
        denom = root + sc[EPS]
    ams = _count(vmax > v) if vmax is not None else zero
    eta = sc[STEP] / denom
    clipped, clamped = zero, zero
    if variant.startswith("bound"):
        if s is not None:
            clipped = _count(s < eta)
            eta = torch.minimum(eta, s)
        else:
            clamped = _count((eta < sc[LO]) | (eta > sc[HI]))
        eta = torch.clamp(eta, sc[LO], sc[HI])
    delta = eta * m
    edges = edges.to(p.dtype)
    counts = [_count(eta <= edges[i]) for i in range(len(EFF_LR_EDGES))]
    return torch.stack([_sum64(p * p), _sum64(delta * delta), eps_dominated, ams, clipped, clamped,
                        _sum64(eta)] + counts)


_EDGES: dict[torch.device, Tensor] = {}


def edges_for(device: torch.device) -> Tensor:
    """The effective-LR histogram edges as a float64 tensor on ``device`` (cached)."""
    device = torch.device(device)
    if device not in _EDGES:
        _EDGES[device] = torch.tensor(EFF_LR_EDGES, dtype=_F64, device=device)
    return _EDGES[device]


def add_fused_sums(out: Tensor, sums: Tensor, lr: float) -> None:
    """Add the sums a fused update+statistics kernel returned (``PRE_FIELDS`` then ``POST_FIELDS``) to ``out``."""
    for i, name in enumerate(PRE_FIELDS + POST_FIELDS):
        out[FIELD_INDEX[name]] += sums[i]
    if lr > 0:
        out[FIELD_INDEX["unit_update_sumsq"]] += sums[len(PRE_FIELDS) + 1] / (lr * lr)
