"""Optimizer-health telemetry: finalise the optimizer's statistics and export them to Prometheus.

Typical use, in a user's own loop or in the training job (call on every rank, with the same arguments)::

    tel = sharded_optim.telemetry.start(optimizer, base_port=9400, targets_file="runs/targets/run.json")
    ...  # train; every optimizer.step() updates the metrics
    tel.flush()  # collective: the last statistics step's numbers (sharded, they arrive one step late)
    tel.stop()

The pieces are importable on their own: :func:`finalize` (pure statistics), :class:`OptimizerMetrics`
(a registry plus the report hook), :class:`MetricsServer` and :func:`write_targets_file`.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .exporter import OptimizerMetrics
from .fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS, SUM_FIELDS
from .finalize import GroupStats, finalize, finalize_group
from .report import StepReport
from .server import DEFAULT_JOB, MetricsServer, advertised_host, gather_targets, write_targets_file

# Statistics every 20 steps.  A statistics step costs about 2x a plain optimizer step on CPU: every step, that is
# 6.3-7.7% of a training step on an optimizer-bound model and under 3% on the project's GPT; one step in ten still
# measured 1.010-1.012x on the optimizer-bound model (bench/telemetry_overhead.py), at the 1% budget.  One in twenty
# halves the statistics' share while sampling faster than a 15 s scrape for any step below 0.75 s; distribution
# statistics elsewhere are sampled far less often (wandb.watch: every 1000 steps).  Per-step series (norms,
# learning rate, counters, step time) are exported on every step regardless.
DEFAULT_STATS_INTERVAL = 20

__all__ = [
    "DEFAULT_STATS_INTERVAL", "EFF_LR_EDGES", "FIELD_INDEX", "NUM_FIELDS", "SUM_FIELDS", "GroupStats",
    "MetricsServer", "OptimizerMetrics", "StepReport", "Telemetry", "finalize", "finalize_group", "start",
    "write_targets_file",
]


@dataclass
class Telemetry:
    """Handle returned by :func:`start`: the bound port, the metrics, and :meth:`stop`."""

    metrics: OptimizerMetrics
    server: MetricsServer
    run_id: str
    targets: list[str] = field(default_factory=list)
    targets_file: Path | None = None  # written by this rank (rank 0 only), removed again by stop()
    _hook_handle: Any = None
    optimizer: Any = None

    def flush(self) -> None:
        """Publish the statistics of the last statistics step now.

        Sharded, statistics become global with the next step's gradient-norm all-reduce, one step late; call
        this when training ends so the last ones are exported too.  A collective: every rank calls it, as
        ``optimizer.step()``.  A no-op for an optimizer without ``flush_stats``.
        """
        flush_stats = getattr(self.optimizer, "flush_stats", None)
        got = flush_stats() if callable(flush_stats) else None
        if got is not None:
            self.metrics.observe_stats(got[1])

    @property
    def port(self) -> int:
        """The port this rank's metrics server is bound to."""
        return self.server.port

    def stop(self) -> None:
        """Detach from the optimizer and shut the HTTP server down (idempotent)."""
        handle, self._hook_handle = self._hook_handle, None
        if hasattr(handle, "remove"):  # a torch RemovableHandle
            handle.remove()
        elif callable(handle):  # ShardedOptimizer.add_report_hook returns the remover itself
            handle()
        self.server.stop()
        if self.targets_file is not None:  # a finished run must not stay listed, or it reads as a dead rank
            self.targets_file.unlink(missing_ok=True)
            self.targets_file = None


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start(optimizer: Any, *, base_port: int = 9400, addr: str = "127.0.0.1", run_id: str | None = None,
          targets_file: str | os.PathLike[str] | None = None, stats_interval: int | None = None,
          job: str = DEFAULT_JOB) -> Telemetry:
    """Register the exporter as ``optimizer``'s report hook and serve ``/metrics`` on this rank.

    The port is ``base_port + LOCAL_RANK`` (``LOCAL_RANK`` defaults to the global rank, i.e. one node);
    ``base_port=0`` binds an ephemeral port on every rank (read ``.port``).  ``stats_interval=None`` keeps the
    optimizer's interval, or sets :data:`DEFAULT_STATS_INTERVAL` if statistics were off.  With
    ``targets_file`` this is a collective: rank 0 writes every rank's ``host:port`` there for Prometheus'
    ``file_sd_configs``, labelled with ``job`` and ``run_id``.
    """
    if not callable(getattr(optimizer, "add_report_hook", None)):
        raise TypeError(f"optimizer: {type(optimizer).__name__} has no add_report_hook(fn)")
    if base_port < 0:
        raise ValueError(f"base_port must be >= 0, got {base_port}")
    if stats_interval is not None and stats_interval < 0:
        raise ValueError(f"stats_interval must be >= 0, got {stats_interval}")
    rank, world = _rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if stats_interval is not None:
        optimizer.stats_interval = stats_interval
    elif not getattr(optimizer, "stats_interval", 0):
        optimizer.stats_interval = DEFAULT_STATS_INTERVAL
    run_id = run_id or os.environ.get("SHARDED_OPTIM_RUN_ID") or (
        time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3))
    metrics = OptimizerMetrics(rank=rank, world_size=world)
    server = MetricsServer(metrics.registry, port=base_port + local_rank if base_port else 0, addr=addr,
                           setting=f"telemetry.base_port {base_port} + LOCAL_RANK {local_rank}")
    targets: list[str] = []
    written: Path | None = None
    try:
        if targets_file is not None:
            targets = gather_targets(advertised_host(addr), server.port)
            if rank == 0:
                written = write_targets_file(targets_file, targets, run_id=run_id, job=job)
        handle = optimizer.add_report_hook(metrics.observe)
    except BaseException:
        server.stop()
        if written is not None:
            written.unlink(missing_ok=True)
        raise
    return Telemetry(metrics=metrics, server=server, run_id=run_id, targets=targets, targets_file=written,
                     _hook_handle=handle, optimizer=optimizer)
