"""Turn the global per-group sums of a :class:`StepReport` into optimizer-health statistics.

The optimizer fills ``report.stats`` (shape ``(G, NUM_FIELDS)``, float64, layout in
:mod:`sharded_optim.telemetry.fields`) with sums that are already global after one ``all_reduce``; the only
work left is square roots and ratios, done here in plain Python floats (``G`` is small, so there is no point
in keeping tensors around).  Every function is pure.

Division conventions (documented so that dashboards and alerts can rely on them):

* a ratio over elements (``numel`` in the denominator) is ``0.0`` for an empty group;
* ``update_to_param_ratio`` is ``0.0`` when nothing moved, ``inf`` when a zero parameter moved;
* ``momentum_grad_cosine`` is ``0.0`` when either vector is zero (the first step has no momentum yet), so a
  fresh run never shows a NaN that looks like a non-finite gradient;
* non-finite sums (a NaN gradient) propagate as NaN/inf: that is the truth, and the non-finite counters say why.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS


@dataclass(frozen=True)
class GroupStats:
    """Finalised statistics of one parameter group on one statistics step."""

    numel: float
    grad_norm: float                 # sqrt(sum g^2), pre-clip
    param_norm: float                # sqrt(sum theta^2) after the update
    update_to_param_ratio: float     # ||delta|| / ||theta||
    adam_update_rms: float           # sqrt(sum (delta/lr)^2 / numel)
    eps_dominated_ratio: float       # fraction with sqrt(v_hat) < eps
    momentum_grad_cosine: float      # cos(m_{t-1}, g_t)
    grad_zero_ratio: float           # fraction of exactly-zero gradient elements
    nonfinite_count: float           # non-finite gradient elements
    amsgrad_max_active_ratio: float  # fraction with v_max > v
    adamod_clipped_ratio: float      # fraction where AdaMod's smoothed bound was taken
    adabound_clamped_ratio: float    # fraction where AdaBound clamped eta
    effective_lr_sum: float          # sum of per-element eta
    effective_lr_mean: float         # effective_lr_sum / numel
    effective_lr_buckets: tuple[float, ...]  # cumulative counts eta <= EFF_LR_EDGES[i]
    friction_mean: float = 0.0       # mean diffGrad friction xi in [0.5, 1) (diffgrad/diffmod; else 0)
    friction_near_half_ratio: float = 0.0  # fraction with xi <= 0.5 + FRICTION_NEAR_HALF
    state_quantized: bool = False    # the state is stored in bf16 or int8 (the two errors below are measured)
    quant_error_m: float = 0.0       # ||stored m - fp32 m|| / ||fp32 m|| (0 for fp32 state or a zero m)
    quant_error_v: float = 0.0       # the same for the second moment (v; AdaMax: u)


def _ratio(num: float, den: float) -> float:
    """num/den for element fractions: an empty denominator gives 0.0 instead of raising."""
    return num / den if den != 0.0 else 0.0


def _norm_ratio(num_sumsq: float, den_sumsq: float) -> float:
    """sqrt(num)/sqrt(den): 0.0 when nothing moved, inf when a zero vector moved."""
    if den_sumsq == 0.0:
        return 0.0 if num_sumsq == 0.0 else math.inf
    return math.sqrt(num_sumsq) / math.sqrt(den_sumsq)


def _cosine(dot: float, a_sumsq: float, b_sumsq: float) -> float:
    """dot/(|a||b|) clamped to [-1, 1] (rounding can overshoot); 0.0 if either vector is zero."""
    den = math.sqrt(a_sumsq) * math.sqrt(b_sumsq)
    if den == 0.0:
        return 0.0
    c = dot / den
    return max(-1.0, min(1.0, c)) if math.isfinite(c) else c


def finalize_group(row: Sequence[float]) -> GroupStats:
    """Finalise one group's row of global sums (a sequence of ``NUM_FIELDS`` floats)."""
    if len(row) != NUM_FIELDS:
        raise ValueError(f"stats row: expected {NUM_FIELDS} fields (telemetry.fields), got {len(row)}")
    s = {name: float(row[i]) for name, i in FIELD_INDEX.items()}
    n = s["numel"]
    buckets = tuple(s[f"eff_lr_le_{i}"] for i in range(len(EFF_LR_EDGES)))
    return GroupStats(
        numel=n,
        grad_norm=math.sqrt(s["grad_sumsq"]) if s["grad_sumsq"] >= 0 else math.nan,
        param_norm=math.sqrt(s["param_sumsq"]) if s["param_sumsq"] >= 0 else math.nan,
        update_to_param_ratio=_norm_ratio(s["update_sumsq"], s["param_sumsq"]),
        adam_update_rms=math.sqrt(_ratio(s["unit_update_sumsq"], n)),
        eps_dominated_ratio=_ratio(s["eps_dominated"], n),
        momentum_grad_cosine=_cosine(s["mom_grad_dot"], s["mom_sumsq"], s["grad_sumsq"]),
        grad_zero_ratio=_ratio(s["zero_grad"], n),
        nonfinite_count=s["nonfinite_grad"],
        amsgrad_max_active_ratio=_ratio(s["amsgrad_max_active"], n),
        adamod_clipped_ratio=_ratio(s["adamod_clipped"], n),
        adabound_clamped_ratio=_ratio(s["adabound_clamped"], n),
        effective_lr_sum=s["eff_lr_sum"],
        effective_lr_mean=_ratio(s["eff_lr_sum"], n),
        effective_lr_buckets=buckets,
        friction_mean=_ratio(s["friction_sum"], n),
        friction_near_half_ratio=_ratio(s["friction_near_half"], n),
        state_quantized=s["quant_ref_m_sumsq"] > 0 or s["quant_ref_v_sumsq"] > 0,
        quant_error_m=_norm_ratio(s["quant_err_m_sumsq"], s["quant_ref_m_sumsq"]),
        quant_error_v=_norm_ratio(s["quant_err_v_sumsq"], s["quant_ref_v_sumsq"]),
    )


def finalize(stats: torch.Tensor, group_names: Sequence[str]) -> dict[str, GroupStats]:
    """Finalise a ``(G, NUM_FIELDS)`` statistics tensor into ``{group name: GroupStats}``."""
    if stats.dim() != 2 or stats.shape[1] != NUM_FIELDS:
        raise ValueError(f"StepReport.stats: expected shape (G, {NUM_FIELDS}), got {tuple(stats.shape)}")
    if stats.shape[0] != len(group_names):
        raise ValueError(f"StepReport.stats has {stats.shape[0]} rows but group_names has {len(group_names)}")
    rows = stats.detach().to("cpu", torch.float64).tolist()  # one device sync for the whole report
    return {name: finalize_group(row) for name, row in zip(group_names, rows)}
