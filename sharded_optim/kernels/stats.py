"""The statistics math: optimizer-health partial sums over one rank's shard.

On statistics steps (every ``stats_interval`` steps) the optimizer's gradient-norm pass is :func:`pre_sums`, which
reads the gradient and the *previous* first moment (for the momentum/gradient cosine) before the update; after the
plain update, :func:`_post` reads the new state in a second, read-only call (sharded: at the start of the next
step, see :mod:`.fused_stats`).  :func:`_post` re-derives each element's step size from the new state and the same
scalar vector the update used, so no extra state is kept.  Both are pure functions returning float64 sums
(float64 accumulators, elementwise work in the state's dtype).  The layout is
:mod:`sharded_optim.telemetry.fields`; the optimizer passes real (unpadded) ranges only.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..rules import DSCALE, EPS, HI, LO, STEP
from ..telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, FRICTION_NEAR_HALF
from .adam_family import friction

_F64 = torch.float64
_CHUNK = 4096
PRE_FIELDS = ("numel", "grad_sumsq", "nonfinite_grad", "zero_grad", "mom_grad_dot", "mom_sumsq")
POST_FIELDS = ("param_sumsq", "update_sumsq", "eps_dominated", "amsgrad_max_active", "adamod_clipped",
               "adabound_clamped", "eff_lr_sum") + tuple(f"eff_lr_le_{i}" for i in range(len(EFF_LR_EDGES))) + (
               "friction_sum", "friction_near_half")


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

# Integer type of each float type's width: counts compare IEEE bit patterns (see _count_le).
_BITS_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


def _sum64(x: Tensor) -> Tensor:
    return torch.sum(x, dtype=_F64)  # compiled: a float64 accumulator inside the fused loop, no temporary


def _count(mask: Tensor) -> Tensor:
    # int32 accumulators vectorise twice as wide as float64 ones: counting in float64 (or int64) made a
    # statistics step 1.8x slower on CPU; exact because a call never covers more than MAX_CALL_NUMEL elements
    return torch.sum(mask, dtype=torch.int32).to(_F64)


def _magnitude_bits(x: Tensor) -> Tensor:
    """IEEE bits of ``|x|`` as signed integers: ordered exactly like ``|x|``, with NaN above +inf."""
    int_type = _BITS_OF[x.dtype]
    return x.view(int_type) & torch.iinfo(int_type).max


def _count_below(bits: Tensor, bound: Tensor) -> Tensor:
    """How many elements have ``bits < bound`` (integers from :func:`_magnitude_bits`, ``bound`` 0-d).

    ``bits - bound`` is negative exactly then, and an arithmetic shift by width-1 turns it into -1 or 0: two
    integer operations per element where a float compare plus mask conversion took twice as long.  The
    effective-LR histogram does twelve of these per element (1.47 ms -> 0.77 ms for 2.1M fp32, one core)."""
    shift = torch.iinfo(bits.dtype).bits - 1
    return -torch.sum((bits - bound) >> shift, dtype=torch.int32).to(_F64)


def _count_le(bits: Tensor, limit: Tensor) -> Tensor:
    """``_count(|x| <= limit)`` for ``limit >= 0`` (0-d, ``x``'s float type) from ``bits = _magnitude_bits(x)``;
    NaN never counts, as with the float compare."""
    return _count_below(bits, _magnitude_bits(limit) + 1)


def _count_lt(bits: Tensor, limit: Tensor) -> Tensor:
    """``_count(|x| < limit)``, as :func:`_count_le`."""
    return _count_below(bits, _magnitude_bits(limit))


def pre_sums(grad: Tensor, m_prev: Tensor, gscale: Tensor, finite: bool) -> Tensor:
    """The ``PRE_FIELDS`` sums: gradient and previous-momentum statistics, read before the update.

    On a statistics step this *is* the gradient-norm pass (its ``grad_sumsq`` is the shard's sum of squares), so
    the statistics cost one extra read of the first moment instead of a second pass over the gradient.  Computing
    them inside the update kernel instead cost more: the update overwrites ``m``, so the compiler put the sums in a
    separate loop over ``g`` and ``m`` ahead of it (+1.0 ms per 2.1M fp32 elements, one core, against +0.6 ms
    here over the plain norm).  ``gscale`` (+-1, 0-d) is the sign the update applies (``maximize``).
    ``finite=False`` masks non-finite gradient elements out of the momentum sums and counts them; ``True`` assumes
    none (the caller re-runs with ``False`` when the global norm says otherwise) and skips the masking, a third of
    this pass.  The gradient is read in the wider of its dtype and the first moment's: the update's own compute
    dtype (a bf16 first moment of ``state_precision="bf16"`` must not round the fp32 gradient of the norm)."""
    dt = torch.promote_types(grad.dtype, m_prev.dtype)
    g = grad.to(dt) * gscale.to(dt)
    m = m_prev
    numel = torch.full((), g.numel(), dtype=_F64, device=g.device)
    zero = _count_le(_magnitude_bits(g), torch.zeros((), dtype=g.dtype, device=g.device))
    if finite:
        nonfinite, g_finite = torch.zeros((), dtype=_F64, device=g.device), g
    else:
        ok = torch.isfinite(g)
        nonfinite, g_finite = _count(~ok), torch.where(ok, g, 0.0)
    return torch.stack([numel, _sum64(g * g), nonfinite, zero, _sum64(m * g_finite), _sum64(m * m)])


def _post(variant: str, p: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, s: Tensor | None, sc: Tensor,
          edges: Tensor, g_prev: Tensor | None = None, g_before: Tensor | None = None) -> Tensor:
    """Elementwise work in the state's dtype (the kernel's own precision), sums accumulated in float64.

    diffGrad/DiffMod: the update replaced ``previous_grad`` by this step's gradient, so the friction it used,
    ``xi = sigmoid(|g_before - g_prev|)``, needs ``g_before``, a copy of ``previous_grad`` taken before the update
    (the optimizer's statistics pass keeps one); the step size and the update then include ``xi``."""
    zero = torch.zeros((), dtype=_F64, device=p.device)
    sc = sc.to(p.dtype)
    if variant == "adamax_mu":
        denom = v
        eps_dominated = _count_le(_magnitude_bits(denom), 2 * sc[EPS])
    else:
        vhat = vmax if vmax is not None else v
        root = vhat.sqrt() * sc[DSCALE]
        eps_dominated = _count_lt(_magnitude_bits(root), sc[EPS])  # root >= 0
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
    friction_sums = [zero, zero]
    if g_prev is not None and g_before is not None:
        xi = friction(g_before, g_prev)
        eta = eta * xi
        near = torch.full((), 0.5 + FRICTION_NEAR_HALF, dtype=xi.dtype, device=xi.device)
        friction_sums = [_sum64(xi), _count_le(_magnitude_bits(xi), near)]
    delta = eta * m
    eta_bits = _magnitude_bits(eta)  # eta >= 0: |eta| <= edge is eta <= edge
    edges = edges.to(p.dtype)
    counts = [_count_le(eta_bits, edges[i]) for i in range(len(EFF_LR_EDGES))]
    return torch.stack([_sum64(p * p), _sum64(delta * delta), eps_dominated, ams, clipped, clamped,
                        _sum64(eta)] + counts + friction_sums)


def edges_for(device: torch.device) -> Tensor:
    """The effective-LR histogram edges as a float64 tensor on ``device`` (cached)."""
    return _edges_on(torch.device(device))


@functools.cache
def _edges_on(device: torch.device) -> Tensor:
    return torch.tensor(EFF_LR_EDGES, dtype=_F64, device=device)


@functools.cache
def _field_index(names: tuple[str, ...], device: torch.device) -> Tensor:
    """Where each of a kernel's sums (``names``, in order) goes in the statistics vector."""
    return torch.tensor([FIELD_INDEX[name] for name in names], device=device)


def add_pre_sums(out: Tensor, sums: Tensor) -> None:
    """Add the ``PRE_FIELDS`` sums of a :func:`pre_sums` call to the statistics row ``out``.

    One ``index_add_`` instead of a Python loop of scalar additions (0.2 ms per call on CPU)."""
    out.index_add_(0, _field_index(PRE_FIELDS, out.device), sums)


def add_post_sums(out: Tensor, sums: Tensor, lr: float) -> None:
    """Add the ``POST_FIELDS`` sums of a ``<variant>_post`` call to ``out``, and the update RMS before the LR."""
    out.index_add_(0, _field_index(POST_FIELDS, out.device), sums)
    if lr > 0:
        out[FIELD_INDEX["unit_update_sumsq"]] += sums[POST_FIELDS.index("update_sumsq")] / (lr * lr)
