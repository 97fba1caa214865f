"""Statistics-step kernels, two per variant.

``<variant>_pre`` runs the fused update in place and returns the sums that need the state from *before* the update
(``PRE_FIELDS`` of :mod:`.stats`: the gradient and the previous first moment, for the momentum/gradient cosine).
``<variant>_post`` reads the updated state, changes nothing, and returns the rest (``POST_FIELDS``: parameter and
update norms, epsilon dominance, the per-algorithm counts and the effective-LR histogram).

Why two calls and not one: the post sums are most of a statistics step's cost on CPU (the twelve histogram counts
alone are ~1.7 ms per 2.1M fp32 elements), and they only read state that nothing changes before the next update.
Sharded, the optimizer runs them at the start of the next step, while the main thread would otherwise only wait
for that step's gradient reduce-scatters (gloo's worker threads or NCCL's stream do the transfer).  The update and
the pre sums still share one call: a reduction over the previous momentum must read it before the update
overwrites it.

Called on real (unpadded) ranges only, so padding never enters the sums.  Distinct top-level functions, one per
variant, so each has its own compile cache entry (as in :mod:`.adam_family`).  ``finite`` is a Python bool (the
caller's norm pass found every gradient element finite); ``torch.compile`` keeps one graph per value, and the
``True`` graph skips the non-finite masking.
"""
from __future__ import annotations

from torch import Tensor

from .adam_family import adam_mv, adam_mvx, adamax_mu, bound_mv, bound_mvs, bound_mvx, bound_mvxs
from .stats import _post, _pre


def adam_mv_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor, gscale: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adam_mv(p, g, m, v, sc)
    return pre


def adam_mvx_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, gscale: Tensor,
                 finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adam_mvx(p, g, m, v, vmax, sc)
    return pre


def bound_mv_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor, gscale: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mv(p, g, m, v, sc)
    return pre


def bound_mvx_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, gscale: Tensor,
                  finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvx(p, g, m, v, vmax, sc)
    return pre


def bound_mvs_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor, gscale: Tensor,
                  finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvs(p, g, m, v, s, sc)
    return pre


def bound_mvxs_pre(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, s: Tensor, sc: Tensor,
                   gscale: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvxs(p, g, m, v, vmax, s, sc)
    return pre


def adamax_mu_pre(p: Tensor, g: Tensor, m: Tensor, u: Tensor, sc: Tensor, gscale: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adamax_mu(p, g, m, u, sc)
    return pre


def adam_mv_post(p: Tensor, m: Tensor, v: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("adam_mv", p, m, v, None, None, sc, edges)


def adam_mvx_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("adam_mvx", p, m, v, vmax, None, sc, edges)


def bound_mv_post(p: Tensor, m: Tensor, v: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("bound_mv", p, m, v, None, None, sc, edges)


def bound_mvx_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("bound_mvx", p, m, v, vmax, None, sc, edges)


def bound_mvs_post(p: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("bound_mvs", p, m, v, None, s, sc, edges)


def bound_mvxs_post(p: Tensor, m: Tensor, v: Tensor, vmax: Tensor, s: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("bound_mvxs", p, m, v, vmax, s, sc, edges)


def adamax_mu_post(p: Tensor, m: Tensor, u: Tensor, sc: Tensor, edges: Tensor) -> Tensor:
    return _post("adamax_mu", p, m, u, None, None, sc, edges)


PRE = {
    "adam_mv": adam_mv_pre,
    "adam_mvx": adam_mvx_pre,
    "bound_mv": bound_mv_pre,
    "bound_mvx": bound_mvx_pre,
    "bound_mvs": bound_mvs_pre,
    "bound_mvxs": bound_mvxs_pre,
    "adamax_mu": adamax_mu_pre,
}

POST = {
    "adam_mv": adam_mv_post,
    "adam_mvx": adam_mvx_post,
    "bound_mv": bound_mv_post,
    "bound_mvx": bound_mvx_post,
    "bound_mvs": bound_mvs_post,
    "bound_mvxs": bound_mvxs_post,
    "adamax_mu": adamax_mu_post,
}
