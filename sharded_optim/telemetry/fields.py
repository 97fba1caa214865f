"""Layout of the per-group statistics vector that every rank fills from its own shard.

Every optimizer-health statistic is a sum, a count or a maximum over elements, so each rank reduces its
shard to one small float64 vector per parameter group; a single ``all_reduce(SUM)`` then makes all of them
global (see MONITORING.md section 1.5).  Counts are float64, exact up to 2**53 elements.

The vector is filled by the statistics-step kernels (:mod:`sharded_optim.kernels.fused_stats`, sums from
:mod:`sharded_optim.kernels.stats`) and turned into gauges by :mod:`sharded_optim.telemetry.exporter`.  Index with
``FIELD_INDEX[name]``.
"""
from __future__ import annotations

# Upper edges (inclusive) of the effective-learning-rate gauge histogram, one per decade.
EFF_LR_EDGES: tuple[float, ...] = tuple(10.0**e for e in range(-9, 3))  # 1e-9 ... 1e2 (12 edges)

# xi <= 0.5 + this counts as "near 0.5": |g_prev - g| <= ln(0.51/0.49) = 0.040, where diffGrad's step is within
# 2% of Adam's at half the learning rate.
FRICTION_NEAR_HALF: float = 0.01

SUM_FIELDS: tuple[str, ...] = (
    "numel",               # elements in the shard (padding excluded)
    "grad_sumsq",          # sum g^2 of the (averaged, pre-clip) gradient
    "param_sumsq",         # sum theta^2 after the update
    "update_sumsq",        # sum delta^2, delta = adaptive step applied (weight decay excluded)
    "unit_update_sumsq",   # sum (delta / lr)^2: Adam's m_hat/(sqrt(v_hat)+eps), "update RMS before LR"
    "mom_grad_dot",        # sum m_{t-1} * g_t (before m is updated)
    "mom_sumsq",           # sum m_{t-1}^2
    "nonfinite_grad",      # count of non-finite gradient elements
    "zero_grad",           # count of gradient elements exactly 0
    "eps_dominated",       # count of elements with sqrt(v_hat) < eps
    "amsgrad_max_active",  # count of elements with v_max > v (AMSGrad / AMSBound only)
    "adamod_clipped",      # count of elements where AdaMod's bound s < eta (min picks s)
    "adabound_clamped",    # count of elements where AdaBound's eta was outside [lower, upper]
    "eff_lr_sum",          # sum of the per-element effective learning rate eta (times xi for diffgrad/diffmod)
) + tuple(f"eff_lr_le_{i}" for i in range(len(EFF_LR_EDGES))) + (  # cumulative counts eta <= edge
    "friction_sum",        # sum of diffGrad's friction xi = sigmoid(|g_prev - g|) (diffgrad, diffmod; else 0)
    "friction_near_half",  # count of elements with xi <= 0.5 + FRICTION_NEAR_HALF (gradient ~unchanged)
    # bf16/int8 state only (else 0): the stored first moment m (second: v, AdaMax's u) against its fp32 value
    # before rounding, computed from the same state and gradient (step_stats.StepStats.quantization_error)
    "quant_err_m_sumsq",   # sum (stored m - fp32 m)^2
    "quant_ref_m_sumsq",   # sum (fp32 m)^2
    "quant_err_v_sumsq",   # sum (stored v - fp32 v)^2
    "quant_ref_v_sumsq",   # sum (fp32 v)^2
)

FIELD_INDEX: dict[str, int] = {name: i for i, name in enumerate(SUM_FIELDS)}
NUM_FIELDS: int = len(SUM_FIELDS)
