"""Running a grid of training runs and averaging over seeds."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .common import Context, mean_std
from .tasks import run_task


def run_grid(ctx: Context, points: Iterable[dict[str, Any]], seeds: Iterable[int], steps: int,
             options: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One run per (point, seed).  A point holds ``task``, ``label``, ``lr`` and any other keys, which are
    recorded; ``options(point)`` gives extra keyword arguments for :func:`run_task` (optimizer options,
    ``scheduler``, ``eval_every``)."""
    records = []
    points = list(points)
    seeds = list(seeds)
    start = time.perf_counter()
    for i, point in enumerate(points):
        for seed in seeds:
            kwargs = options(point) if options is not None else {}
            out = run_task(ctx, point["task"], point["label"], point["lr"], point.get("steps", steps), seed,
                           **kwargs)
            records.append({**point, "seed": seed, **out})
        ctx.log(f"{i + 1}/{len(points)} {point} val_loss {records[-1]['val_loss']} "
                f"({time.perf_counter() - start:.0f} s)")
    return records


def reused_rows(ctx: Context, config: dict[str, Any], keys: tuple[str, ...]) -> dict[tuple, dict[str, Any]]:
    """Summary rows of ``ctx.reuse`` (an earlier JSON of this experiment), by ``keys``; empty without one.

    Refused unless it is the same experiment, CI flag and configuration (grid, steps, seeds), both at the
    experiment's own step counts (no ``--steps``): a run is a pure function of its point and seed, so those rows
    are what running them again gives, up to float32 rounding (two committed lr-sensitivity points re-run on
    another day: validation loss within 7e-8 relative, accuracy identical)."""
    if ctx.reuse is None:
        return {}
    payload = json.loads(Path(ctx.reuse).read_text())
    results = payload.get("results", {})
    same = (payload.get("experiment") == ctx.name and payload.get("ci") == ctx.ci and ctx.steps is None
            and "--steps" not in payload.get("command", "")
            and results.get("config") == json.loads(json.dumps(config)))
    if not same:
        raise ValueError(f"--reuse {Path(ctx.reuse).name}: not a result of {ctx.name!r} with this configuration "
                         f"(ci={ctx.ci}, config {config})")
    # JSON stored non-finite metrics (diverged runs) as null: back to nan for the tables
    rows = [{k: math.nan if v is None else v for k, v in row.items()} for row in results["summary"]]
    return {tuple(row[k] for k in keys): row for row in rows}


def run_or_reuse(ctx: Context, config: dict[str, Any], points: list[dict[str, Any]], keys: tuple[str, ...],
                 seeds: Iterable[int], steps: int,
                 options: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """:func:`run_grid` + :func:`aggregate` over the points that ``ctx.reuse`` lacks, its rows for the others;
    the summary in the order of ``points``."""
    old = reused_rows(ctx, config, keys)
    todo = [p for p in points if tuple(p[k] for k in keys) not in old]
    if old:
        ctx.log(f"reusing {len(points) - len(todo)} of {len(points)} grid points from {Path(ctx.reuse).name}")
    new = {tuple(r[k] for k in keys): r for r in aggregate(run_grid(ctx, todo, seeds, steps, options), keys)}
    ordered = dict.fromkeys(tuple(p[k] for k in keys) for p in points)
    return [new[key] if key in new else old[key] for key in ordered]


def aggregate(records: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean and std over seeds of the final metrics, grouped by ``keys`` (first-seen order); the mean curve."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, runs in groups.items():
        row = dict(zip(keys, key))
        row["seeds"] = [r["seed"] for r in runs]
        for metric in ("train_loss", "val_loss", "val_acc"):
            row[metric], row[metric + "_std"] = mean_std([r[metric] for r in runs])
            row[metric + "_runs"] = [r[metric] for r in runs]
        steps = [c[0] for c in runs[0]["curve"]]
        row["curve_steps"] = steps
        for j, metric in enumerate(("train_loss", "val_loss", "val_acc"), start=1):
            row["curve_" + metric] = [mean_std([r["curve"][i][j] for r in runs])[0] for i in range(len(steps))]
        out.append(row)
    return out
