"""What the optimizer hands to telemetry after every step (taken or skipped)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepReport:
    """One optimizer step, as seen by this rank.

    Global quantities (``grad_norm``, ``stats``) are identical on every rank; the exporter publishes them
    from one rank only.  ``stats`` is a float64 tensor of shape ``(num_groups, NUM_FIELDS)`` holding the
    *global* sums laid out as in :mod:`sharded_optim.telemetry.fields`, of optimizer step ``stats_step``.
    Statistics are computed every ``stats_interval`` steps; sharded, they become global inside the next step's
    gradient-norm all-reduce, so the report of step ``t + 1`` carries those of step ``t`` (one process: the
    same step's report).  ``ShardedOptimizer.flush_stats()`` fetches the last ones at the end of training.
    """

    step: int                                   # optimizer steps attempted so far (taken + skipped)
    skipped_reason: str | None                  # None if the update was applied, else "nonfinite"/"spike"/"manual"
    group_names: list[str]                      # one bounded label value per param group
    lrs: list[float]                            # learning rate used by each group on this step
    grad_norm: float                            # global pre-clip gradient norm over all groups (nan if unknown)
    group_grad_norms: list[float]               # global pre-clip gradient norm per group
    clipped: bool                               # gradient clipping scaled the gradients on this step
    algorithm: str
    stats: torch.Tensor | None = None           # (G, NUM_FIELDS) float64 global sums of step stats_step
    stats_step: int | None = None               # the optimizer step ``stats`` describe (None: no stats)
    radam_rectification: list[float | None] = field(default_factory=list)  # r_t per group (None: SGD phase / n.a.)
    # per-rank series
    rank: int = 0
    shard_grad_norm: float = float("nan")       # this rank's shard of the averaged gradient
    shard_nonfinite: int = 0                    # non-finite elements in this rank's gradient shard
    state_bytes: int = 0                        # optimizer state bytes held by this rank
    step_seconds: float = 0.0                   # wall time of optimizer.step() on this rank
    loss_scale: float | None = None
