"""Prometheus metrics for one rank, fed by :class:`StepReport` (MONITORING.md 1.3, 1.4, 2.2).

* Everything lives in an explicit :class:`CollectorRegistry` owned by :class:`OptimizerMetrics`, never the
  process-global ``REGISTRY``: no import-time side effects, no clashes between instances in tests.
* ``_created`` series are dropped by a filtering collector instead of the process-wide
  ``disable_created_metrics()`` switch, so a user's own metrics in the same process are left alone.
* Global series (identical on every rank) are exported by the export rank only; per-rank series carry the
  ``rank`` label and are exported by every rank.  Labels are limited to ``param_group``, ``reason``, ``le``
  and ``rank`` (plus the constant metadata of ``exporter_info``).
"""
from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeHistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..rules import FRICTION_ALGORITHMS
from .fields import EFF_LR_EDGES
from .finalize import GroupStats, finalize
from .report import StepReport

PREFIX = "sharded_optim_"
SKIP_REASONS: tuple[str, ...] = ("nonfinite", "overflow", "spike", "manual")
# Pre-clip gradient norms span many decades between layers, models and phases of training: one bucket per
# decade 1e-4..1e4 keeps the histogram at 10 series per group.
GRAD_NORM_BUCKETS: tuple[float, ...] = tuple(10.0**e for e in range(-4, 5))
# Optimizer steps take ~1 ms (tiny models) to tens of seconds (pipeline bubbles, stragglers).
STEP_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# GroupStats field (also the metric name after the prefix) -> help, for the gauges set on statistics steps.
GROUP_GAUGES: dict[str, str] = {
    "param_norm": "L2 norm of the parameters after the update",
    "update_to_param_ratio": "||applied update|| / ||parameters|| (aim ~1e-3)",
    "adam_update_rms": "RMS of m_hat/(sqrt(v_hat)+eps), the update before the LR",
    "eps_dominated_ratio": "fraction of elements with sqrt(v_hat) < eps",
    "momentum_grad_cosine": "cosine between m_{t-1} and g_t",
    "grad_zero_ratio": "fraction of gradient elements exactly zero",
    "amsgrad_max_active_ratio": "fraction of elements with v_max > v (0 off AMSGrad)",
    "adamod_clipped_ratio": "fraction of elements clipped by AdaMod's bound (0 off AdaMod)",
    "adabound_clamped_ratio": "fraction of elements clamped by AdaBound (0 off AdaBound)",
}
# diffgrad/diffmod only: created on the first report of such an algorithm (a 0 elsewhere would be a lie, and a
# series that never exists keeps the dashboard's friction panels empty for the other algorithms).
FRICTION_GAUGES: dict[str, str] = {
    "friction_mean": "mean of diffGrad's friction xi = sigmoid(|g_prev - g|), in [0.5, 1)",
    "friction_near_half_ratio": "fraction of elements with xi <= 0.51 (gradient unchanged: an Adam step at lr/2)",
}

# bf16/int8 state only: created on the first statistics of such state, one series per group and moment
QUANT_GAUGE = "state_quantization_error"
QUANT_HELP = ("relative error of the stored (bf16/int8) optimizer state against its fp32 value before rounding, "
              "||q(x) - x|| / ||x||, per moment (first: m; second: v, AdaMax's u)")


class _DropCreated(Collector):
    """Serves another registry's metrics without the ``_created`` samples (extra series in Prometheus)."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


_EFF_LR_LE: tuple[str, ...] = tuple(floatToGoString(e) for e in EFF_LR_EDGES) + ("+Inf",)


class _EffectiveLRCollector(Collector):
    """``sharded_optim_effective_lr`` as a GaugeHistogram: a gauge with an ``le`` label fails promtool."""

    def __init__(self) -> None:
        self._snapshot: dict[str, tuple[list[tuple[str, float]], float]] = {}

    def update(self, stats: dict[str, GroupStats]) -> None:
        # Built here, on the (rarer) statistics step, so that a scrape only copies references.
        self._snapshot = {  # one reference swap: a concurrent scrape sees the old or the new snapshot
            group: (list(zip(_EFF_LR_LE, (*st.effective_lr_buckets, st.numel))), st.effective_lr_sum)
            for group, st in stats.items()}

    def collect(self) -> Iterable[Metric]:
        fam = GaugeHistogramMetricFamily(
            PREFIX + "effective_lr", "Distribution of the per-element effective learning rate on the last "
            "statistics step (_gsum/_gcount = mean)", labels=["param_group"])
        for group, (buckets, gsum) in self._snapshot.items():
            fam.add_metric([group], buckets, gsum_value=gsum)
        yield fam


class OptimizerMetrics:
    """The metric families of one rank and :meth:`observe`, the report hook that updates them."""

    def __init__(self, *, rank: int = 0, export_global: bool | None = None, world_size: int = 1) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self.export_global = (rank == 0) if export_global is None else export_global
        self._metrics = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry(auto_describe=False)  # what the HTTP server serves
        self.registry.register(_DropCreated(self._metrics))
        self._groups: tuple[str, ...] = ()
        self._children: dict[str, tuple] = {}
        r = self._metrics
        self.last_step = Gauge(PREFIX + "last_step_timestamp_seconds", "Unix time of this rank's last step",
                               ["rank"], registry=r).labels(str(rank))
        self.step_seconds = Histogram(PREFIX + "step_duration_seconds", "Wall time of optimizer.step()",
                                      ["rank"], buckets=STEP_SECONDS_BUCKETS, registry=r).labels(str(rank))
        self.shard_grad_norm = Gauge(PREFIX + "shard_grad_norm", "Norm of this rank's gradient shard",
                                     ["rank"], registry=r).labels(str(rank))
        self.shard_nonfinite = Gauge(PREFIX + "shard_nonfinite_grad_elements",
                                     "Non-finite elements in this rank's gradient shard on the last step",
                                     ["rank"], registry=r).labels(str(rank))
        self.state_bytes = Gauge(PREFIX + "state_bytes", "Optimizer state bytes held by this rank",
                                 ["rank"], registry=r).labels(str(rank))
        Info(PREFIX + "exporter", "Exporter metadata, for joins on rank", registry=r).info(
            {"rank": str(rank), "world_size": str(world_size), "hostname": socket.gethostname()})
        if self.export_global:
            self._init_global(r)

    def _init_global(self, r: CollectorRegistry) -> None:
        self.steps = Counter(PREFIX + "steps", "Optimizer steps attempted (taken + skipped)", registry=r)
        self.skipped = Counter(PREFIX + "skipped_steps", "Steps whose update was not applied", ["reason"],
                               registry=r)
        for reason in SKIP_REASONS:  # pre-initialised so rate()/increase() see the first skip
            self.skipped.labels(reason)
        self.clipped = Counter(PREFIX + "grad_clipped_steps", "Steps on which gradient clipping scaled "
                               "the gradients", registry=r)
        self.nonfinite = Counter(PREFIX + "grad_nonfinite_elements", "Non-finite gradient elements seen on "
                                 "statistics steps", ["param_group"], registry=r)
        self.grad_norm = Gauge(PREFIX + "grad_norm", "Global pre-clip gradient norm on the last step",
                               ["param_group"], registry=r)
        self.grad_norm_hist = Histogram(PREFIX + "step_grad_norm", "Global pre-clip gradient norm, one "
                                        "observation per step", ["param_group"], buckets=GRAD_NORM_BUCKETS,
                                        registry=r)
        self.lr = Gauge(PREFIX + "learning_rate", "Learning rate used on the last step", ["param_group"],
                        registry=r)
        self.radam = Gauge(PREFIX + "radam_rectification", "RAdam rectification r_t (0 in the SGD phase)",
                           ["param_group"], registry=r)
        self.loss_scale: Gauge | None = None  # created on the first report that has one: 0 would be a lie
        self.group_gauges = {key: Gauge(PREFIX + key, doc, ["param_group"], registry=r)
                             for key, doc in GROUP_GAUGES.items()}
        self.effective_lr = _EffectiveLRCollector()
        r.register(self.effective_lr)
        self.friction_gauges: dict[str, Gauge] | None = None  # see FRICTION_GAUGES
        self.quant_gauge: Gauge | None = None  # see QUANT_GAUGE

    def observe(self, report: StepReport) -> None:
        """Update every metric from one step's report; register it with ``optimizer.add_report_hook``."""
        _check(report)
        self.last_step.set(time.time())
        self.step_seconds.observe(report.step_seconds)
        self.shard_grad_norm.set(report.shard_grad_norm)
        self.shard_nonfinite.set(report.shard_nonfinite)
        self.state_bytes.set(report.state_bytes)
        if self.export_global:
            self._observe_global(report)

    def _bind_groups(self, names: tuple[str, ...]) -> None:
        """Resolve every per-group child once (``labels()`` takes a lock and hashes: too slow per step)."""
        self._children = {name: (self.grad_norm.labels(name), self.grad_norm_hist.labels(name),
                                 self.lr.labels(name), self.radam.labels(name), self.nonfinite.labels(name),
                                 {key: g.labels(name) for key, g in self.group_gauges.items()})
                          for name in names}  # nonfinite.labels() also makes the counter exist at 0
        self._groups = names

    def _observe_global(self, report: StepReport) -> None:
        names = tuple(report.group_names)
        if names != self._groups:
            self._bind_groups(names)
        self.steps.inc()
        if report.skipped_reason is not None:
            self.skipped.labels(report.skipped_reason).inc()
        if report.clipped:
            self.clipped.inc()
        if report.loss_scale is not None:
            if self.loss_scale is None:
                self.loss_scale = Gauge(PREFIX + "loss_scale", "Mixed-precision loss scale",
                                        registry=self._metrics)
            self.loss_scale.set(report.loss_scale)
        if report.algorithm in FRICTION_ALGORITHMS and self.friction_gauges is None:
            self.friction_gauges = {key: Gauge(PREFIX + key, doc + f" ({', '.join(FRICTION_ALGORITHMS)} only)",
                                               ["param_group"], registry=self._metrics)
                                    for key, doc in FRICTION_GAUGES.items()}
        radam = report.algorithm == "radam"
        for i, name in enumerate(names):
            grad_norm, grad_norm_hist, lr, rect, _, _ = self._children[name]
            norm = report.group_grad_norms[i]
            grad_norm.set(norm)
            if math.isfinite(norm):  # one NaN would poison the histogram's _sum for the rest of the run
                grad_norm_hist.observe(norm)
            lr.set(report.lrs[i])
            if radam and i < len(report.radam_rectification):
                r_t = report.radam_rectification[i]
                rect.set(0.0 if r_t is None else r_t)
        if report.stats is not None:
            self._publish_stats(report.stats)

    def observe_stats(self, stats: torch.Tensor) -> None:
        """Publish a ``(G, NUM_FIELDS)`` statistics tensor outside a step report (``Telemetry.flush``), for the
        param groups of the last report."""
        if self.export_global and self._groups:
            self._publish_stats(stats)

    def _publish_stats(self, sums: torch.Tensor) -> None:
        stats = finalize(sums, self._groups)
        for name, st in stats.items():
            *_, nonfinite, gauges = self._children[name]
            if st.nonfinite_count > 0:
                nonfinite.inc(st.nonfinite_count)
            for key, gauge in gauges.items():
                gauge.set(getattr(st, key))
            for key, family in (self.friction_gauges or {}).items():  # labels() here: statistics steps only
                family.labels(name).set(getattr(st, key))
            if st.state_quantized:
                if self.quant_gauge is None:
                    self.quant_gauge = Gauge(PREFIX + QUANT_GAUGE, QUANT_HELP, ["param_group", "moment"],
                                             registry=self._metrics)
                self.quant_gauge.labels(name, "first").set(st.quant_error_m)
                self.quant_gauge.labels(name, "second").set(st.quant_error_v)
        self.effective_lr.update(stats)


def _check(report: StepReport) -> None:
    """Reject reports that would create unbounded or mismatched label values, naming the field."""
    g = len(report.group_names)
    for field in ("lrs", "group_grad_norms"):
        if len(getattr(report, field)) != g:
            raise ValueError(f"StepReport.{field} has {len(getattr(report, field))} entries, "
                             f"group_names has {g}")
    if len(set(report.group_names)) != g:
        raise ValueError(f"StepReport.group_names must be unique, got {report.group_names}")
    if report.skipped_reason is not None and report.skipped_reason not in SKIP_REASONS:
        raise ValueError(f"StepReport.skipped_reason must be None or one of {SKIP_REASONS}, "
                         f"got {report.skipped_reason!r}")
