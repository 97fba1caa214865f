"""Running a grid of training runs and averaging over seeds."""
from __future__ import annotations

import time
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
