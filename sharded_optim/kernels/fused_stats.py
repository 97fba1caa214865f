"""Statistics-step kernels of the updated state, one per variant.

``<variant>_post`` reads the state after the update, changes nothing, and returns the ``POST_FIELDS`` sums of
:mod:`.stats` (parameter and update norms, epsilon dominance, the per-algorithm counts and the effective-LR
histogram).  The sums that need the state from *before* the update (gradient and previous first moment, for the
momentum/gradient cosine) come from :func:`.stats.pre_sums`, which is the gradient-norm pass of a statistics step;
the update itself is the plain kernel of :mod:`.adam_family`, so a statistics step changes nothing numerically.

Why the post sums are a call of their own: they are most of a statistics step's cost on CPU (the twelve histogram
counts alone are ~0.7 ms per 2.1M fp32 elements on one core), and they only read state that nothing changes before
the next update.  Sharded, the optimizer runs them at the start of the next step, while the main thread would
otherwise only wait for that step's gradient reduce-scatters (gloo's worker threads or NCCL's stream do the
transfer).  Fusing them into the update measured no faster: the compiler kept the parameter norm in a second loop,
and the loop is bound by the sums' arithmetic, not by reading the state again.

The diffGrad/DiffMod kernels (``adam_mvg_post``, ``bound_mvsg_post``) also take ``g_before``, the previous
gradient as it was before the update (see :func:`.stats._post`).

Called on real (unpadded) ranges only, so padding never enters the sums.  Distinct top-level functions, one per
variant, so each has its own compile cache entry (as in :mod:`.adam_family`).
"""
from __future__ import annotations

from torch import Tensor

from .stats import _post


def adam_mv_post(p: Tensor, m: Tensor, v: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after :func:`.adam_family.adam_mv` (Adam, AdamW, L2-Adam, NAdam, RAdam): step size
    ``step / (sqrt(v) * dscale + eps)``."""
    return _post("adam_mv", p, m, v, None, None, sc, edges)


def adam_mvx_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AMSGrad: the step size from ``vmax``, and the count of elements where ``vmax > v``."""
    return _post("adam_mvx", p, m, v, vmax, None, sc, edges)


def bound_mv_post(p: Tensor, m: Tensor, v: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AdaBound: step size ``step / d`` clamped to ``[lo, hi]``, and the count of elements the clamp
    changed."""
    return _post("bound_mv", p, m, v, None, None, sc, edges)


def bound_mvx_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AMSBound: as :func:`bound_mv_post` with ``vmax`` in the denominator."""
    return _post("bound_mvx", p, m, v, vmax, None, sc, edges)


def bound_mvs_post(p: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AdaMod: step size ``min(step / d, s)`` clamped to ``[lo, hi]``, and the count of elements where the
    memory ``s`` capped it."""
    return _post("bound_mvs", p, m, v, None, s, sc, edges)


def bound_mvxs_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, s: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AdaMod with AMSGrad's ``vmax`` in the denominator."""
    return _post("bound_mvxs", p, m, v, vmax, s, sc, edges)


def adamax_mu_post(p: Tensor, m: Tensor, u: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    """Sums after AdaMax: step size ``step / u`` (``u`` the infinity-norm moment, eps inside the max)."""
    return _post("adamax_mu", p, m, u, None, None, sc, edges)


def adam_mvg_post(p: Tensor, m: Tensor, v: Tensor, g_prev: Tensor, g_before: Tensor, sc: Tensor,
                  edges: Tensor) -> Tensor:
    """Sums after diffGrad: the step size and update include the friction ``xi = 1 / (1 + exp(-|g_before - g_prev|))``
    the update used (``g_prev``: this step's gradient, now stored)."""
    return _post("adam_mvg", p, m, v, None, None, sc, edges, g_prev, g_before)


def bound_mvsg_post(p: Tensor, m: Tensor, v: Tensor, s: Tensor, g_prev: Tensor, g_before: Tensor, sc: Tensor,
                    edges: Tensor) -> Tensor:
    """Sums after DiffMod: AdaMod's bounded step size times the friction ``xi`` (``g_prev``, ``g_before`` as in
    :func:`adam_mvg_post`)."""
    return _post("bound_mvsg", p, m, v, None, s, sc, edges, g_prev, g_before)


POST = {
    "adam_mv": adam_mv_post,
    "adam_mvx": adam_mvx_post,
    "bound_mv": bound_mv_post,
    "bound_mvx": bound_mvx_post,
    "bound_mvs": bound_mvs_post,
    "bound_mvxs": bound_mvxs_post,
    "adamax_mu": adamax_mu_post,
    "adam_mvg": adam_mvg_post,
    "bound_mvsg": bound_mvsg_post,
}
