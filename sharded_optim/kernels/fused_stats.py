"""Update and statistics in one pass: each function runs the fused update in place and returns the float64
statistics sums of the same elements (the ``PRE_FIELDS`` then ``POST_FIELDS`` of :mod:`.stats`).

Used on statistics steps instead of "statistics pass, update, statistics pass": compiled, the reductions share the
update's loop over memory, so a statistics step reads the state once instead of three times.  Called on real
(unpadded) ranges only, so padding never enters the sums.  Distinct top-level functions, one per variant, so each
has its own compile cache entry (as in :mod:`.adam_family`).  ``finite`` is a Python bool (the caller's norm pass
found every gradient element finite); ``torch.compile`` keeps one graph per value, and the ``True`` graph skips
the non-finite masking.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .adam_family import adam_mv, adam_mvx, adamax_mu, bound_mv, bound_mvs, bound_mvx, bound_mvxs
from .stats import _post, _pre


def adam_mv_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor,
                  gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adam_mv(p, g, m, v, sc)
    return torch.cat([pre, _post("adam_mv", p, m, v, None, None, sc, edges)])


def adam_mvx_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor,
                   gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adam_mvx(p, g, m, v, vmax, sc)
    return torch.cat([pre, _post("adam_mvx", p, m, v, vmax, None, sc, edges)])


def bound_mv_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor,
                   gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mv(p, g, m, v, sc)
    return torch.cat([pre, _post("bound_mv", p, m, v, None, None, sc, edges)])


def bound_mvx_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, sc: Tensor,
                    gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvx(p, g, m, v, vmax, sc)
    return torch.cat([pre, _post("bound_mvx", p, m, v, vmax, None, sc, edges)])


def bound_mvs_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor,
                    gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvs(p, g, m, v, s, sc)
    return torch.cat([pre, _post("bound_mvs", p, m, v, None, s, sc, edges)])


def bound_mvxs_stats(p: Tensor, g: Tensor, m: Tensor, v: Tensor, vmax: Tensor, s: Tensor, sc: Tensor,
                     gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    bound_mvxs(p, g, m, v, vmax, s, sc)
    return torch.cat([pre, _post("bound_mvxs", p, m, v, vmax, s, sc, edges)])


def adamax_mu_stats(p: Tensor, g: Tensor, m: Tensor, u: Tensor, sc: Tensor,
                    gscale: Tensor, edges: Tensor, finite: bool) -> Tensor:
    pre = _pre(g, m, gscale, finite)
    adamax_mu(p, g, m, u, sc)
    return torch.cat([pre, _post("adamax_mu", p, m, u, None, None, sc, edges)])


FUSED = {
    "adam_mv": adam_mv_stats,
    "adam_mvx": adam_mvx_stats,
    "bound_mv": bound_mv_stats,
    "bound_mvx": bound_mvx_stats,
    "bound_mvs": bound_mvs_stats,
    "bound_mvxs": bound_mvxs_stats,
    "adamax_mu": adamax_mu_stats,
}
