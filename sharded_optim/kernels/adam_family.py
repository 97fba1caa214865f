r"""The fused Adam-family updates: pure in-place elementwise functions, one per state set.

Each function takes the parameter (or fp32 master) shard ``p``, the gradient shard ``g`` (any float dtype; cast
in-kernel so a bf16 gradient costs no extra pass), the state shards, and ``sc``: a 1-D tensor of per-step scalars in
``p``'s dtype, laid out as in :mod:`sharded_optim.rules` (``GSCALE, L2, DECAY, W1, B2, W2, STEP, DSCALE, EPS, LO, HI,
B3, W3, CG``).  All algorithm knowledge lives in those host scalars; the kernels are device-agnostic tensor code
that ``torch.compile`` turns into one loop (C++/OpenMP on CPU, Triton on CUDA).

Shared prologue (every variant except AdaMax):

.. math::
    g &\leftarrow \mathrm{gscale}\cdot g + \mathrm{l2}\cdot p \qquad
    p \leftarrow p - \mathrm{decay}\cdot p \\
    m &\leftarrow m + (1-\beta_1)(g - m) \qquad (\text{torch's lerp}) \\
    v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \qquad [\,\hat v \leftarrow \max(\hat v, v)\,] \\
    d &\leftarrow \sqrt{v}\cdot\mathrm{dscale} + \epsilon

``adam_*`` (Adam, AdamW, L2-Adam, NAdam, RAdam): :math:`p \leftarrow p - \mathrm{step}\cdot m/d - c_g\, g/d`.

``bound_*`` (AdaMod, AdaBound): :math:`\eta = \mathrm{step}/d`; AdaMod: :math:`s \leftarrow \beta_3 s +
(1-\beta_3)\eta,\ \eta \leftarrow \min(\eta, s)`; both: :math:`\eta \leftarrow \mathrm{clamp}(\eta, lo, hi)`;
:math:`p \leftarrow p - \eta m`.

``adam_mvg`` (diffGrad) and ``bound_mvsg`` (DiffMod) add the friction of the previous gradient ``g_prev``
(state ``previous_grad``, the transformed gradient of the last step, 0 before the first):
:math:`\xi = 1/(1 + e^{-|g_{prev} - g|}) \in [0.5, 1)`, :math:`g_{prev} \leftarrow g`, and the first moment
enters the final step as :math:`\xi m` (the stored ``m`` is not scaled).

``adamax_mu``: :math:`u \leftarrow \max(\beta_2 u, |g| + \epsilon)`, :math:`p \leftarrow p - \mathrm{step}\cdot m/u`.

Every function mutates its arguments in place and returns nothing: the in-place form compiles to a single loop
that reads and writes each tensor once; a functional form followed by copies was 15x slower (DESIGN.md section 3).
Top-level functions are distinct code objects on purpose: each gets its own compile cache entry.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..rules import B2, B3, CG, DECAY, DSCALE, EPS, GSCALE, HI, L2, LO, STEP, W1, W2, W3


def _prologue(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor) -> Tensor:
    """Gradient transform, decoupled decay, first and second moments. Returns the transformed gradient."""
    g = g.to(p.dtype) * sc[GSCALE] + sc[L2] * p
    p.sub_(sc[DECAY] * p)
    m.lerp_(g, sc[W1])
    v.mul_(sc[B2]).add_(sc[W2] * g * g)  # addcmul's rounding order: (value*g)*g
    return g


def _adam_finish(p: Tensor, g: Tensor, m: Tensor, vhat: Tensor, sc: Tensor) -> None:
    denom = vhat.sqrt() * sc[DSCALE] + sc[EPS]
    p.sub_(sc[STEP] * (m / denom) + sc[CG] * (g / denom))


def _bound_finish(p: Tensor, m: Tensor, vhat: Tensor, s: Tensor | None, sc: Tensor) -> None:
    eta = sc[STEP] / (vhat.sqrt() * sc[DSCALE] + sc[EPS])
    if s is not None:
        s.mul_(sc[B3]).add_(sc[W3] * eta)
        eta = torch.minimum(eta, s)
    eta = torch.clamp(eta, sc[LO], sc[HI])
    p.sub_(eta * m)


def adam_mv(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor) -> None:
    """Adam / AdamW / L2-Adam / NAdam / RAdam with state {m, v}."""
    g = _prologue(p, g, m, v, sc)
    _adam_finish(p, g, m, v, sc)


def adam_mvx(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor) -> None:
    """AMSGrad (torch form): the max is over raw v, divided by the current sqrt(bc2) through ``dscale``."""
    g = _prologue(p, g, m, v, sc)
    vmax.copy_(torch.maximum(vmax, v))
    _adam_finish(p, g, m, vmax, sc)


def bound_mv(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor) -> None:
    """AdaBound: step sizes clamped to [lo, hi]."""
    _prologue(p, g, m, v, sc)
    _bound_finish(p, m, v, None, sc)


def bound_mvx(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor) -> None:
    """AMSBound: AdaBound with the raw-v max."""
    _prologue(p, g, m, v, sc)
    vmax.copy_(torch.maximum(vmax, v))
    _bound_finish(p, m, vmax, None, sc)


def bound_mvs(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor) -> None:
    """AdaMod: step sizes bounded by their exponential moving average ``s`` (state ``exp_avg_lr``)."""
    _prologue(p, g, m, v, sc)
    _bound_finish(p, m, v, s, sc)


def bound_mvxs(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, s: Tensor, sc: Tensor) -> None:
    """AdaMod with the AMSGrad max in the step size."""
    _prologue(p, g, m, v, sc)
    vmax.copy_(torch.maximum(vmax, v))
    _bound_finish(p, m, vmax, s, sc)


def friction(g_prev: Tensor, g: Tensor) -> Tensor:
    """diffGrad's friction ``1/(1 + exp(-|g_prev - g|))`` in [0.5, 1): exp of a non-positive argument, never
    overflows (ALGORITHMS.md 15.8); the explicit form of the authors' code rather than ``torch.sigmoid``."""
    return 1.0 / (1.0 + torch.exp(-(g_prev - g).abs()))


def adam_mvg(p: Tensor, g: Tensor, m: Tensor, v: Tensor, g_prev: Tensor, sc: Tensor) -> None:
    """diffGrad (v2 code): E0 Adam step with ``xi*m``; ``g_prev`` keeps the transformed (L2-augmented) gradient."""
    g = _prologue(p, g, m, v, sc)
    xi = friction(g_prev, g)
    g_prev.copy_(g)
    _adam_finish(p, g, xi * m, v, sc)


def bound_mvsg(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, g_prev: Tensor, sc: Tensor) -> None:
    """DiffMod: AdaMod's bounded step size ``min(eta, s)`` applied to ``xi*m``."""
    g = _prologue(p, g, m, v, sc)
    xi = friction(g_prev, g)
    g_prev.copy_(g)
    _bound_finish(p, xi * m, v, s, sc)


def adamax_mu(p: Tensor, g: Tensor, m: Tensor, u: Tensor, sc: Tensor) -> None:
    """AdaMax (torch form): infinity-norm second moment with eps inside the max."""
    g = g.to(p.dtype) * sc[GSCALE] + sc[L2] * p
    p.sub_(sc[DECAY] * p)
    m.lerp_(g, sc[W1])
    u.copy_(torch.maximum(u * sc[B2], g.abs() + sc[EPS]))
    p.sub_(sc[STEP] * (m / u))


def lookahead_sync(fast: Tensor, slow: Tensor, alpha: Tensor) -> None:
    """Lookahead: ``slow <- slow + alpha*(fast - slow)``; ``fast <- slow``."""
    slow.add_(alpha * (fast - slow))
    fast.copy_(slow)


VARIANTS = {
    "adam_mv": adam_mv,
    "adam_mvx": adam_mvx,
    "bound_mv": bound_mv,
    "bound_mvx": bound_mvx,
    "bound_mvs": bound_mvs,
    "bound_mvxs": bound_mvxs,
    "adamax_mu": adamax_mu,
    "adam_mvg": adam_mvg,
    "bound_mvsg": bound_mvsg,
}
