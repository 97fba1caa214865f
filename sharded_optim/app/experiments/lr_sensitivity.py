"""``lr-sensitivity``: final validation loss and accuracy over a log-spaced learning-rate grid for adam, adamw,
amsgrad, radam, adamod, adabound, diffgrad and diffmod (each at its own defaults otherwise), on logistic
regression and an MLP on digits (3 seeds), and on the small transformer (fewer points and shorter runs: 5
learning rates, 250 steps, 3 seeds).

Claims tested (docs/EXPERIMENTS.md): RAdam is robust to the learning rate (seed 003); AdaMod is less sensitive to
the learning rate than Adam (seed 004), and DiffMod keeps that robustness (seed 004's closing paragraph); AMSGrad
is more robust to hyperparameters than Adam (Reddi et al., refuted by seed 000 on MNIST logistic regression).
"""
from __future__ import annotations

import math
from typing import Any

from .common import OPTIMIZERS, Context, fmt, log_grid, md_table, new_figure, write_outputs
from .grid import run_or_reuse
from .registry import Experiment, register

LABELS = tuple(OPTIMIZERS)
FULL = {"digits_lrs": log_grid(1e-4, 1e-1, 6), "digits_steps": 400, "seeds": (0, 1, 2),
        "lm_lrs": log_grid(3e-4, 3e-2, 5), "lm_steps": 250, "lm_seeds": (0, 1, 2)}
CI = {"digits_lrs": [1e-2], "digits_steps": 20, "seeds": (0,), "lm_lrs": [], "lm_steps": 0, "lm_seeds": ()}


def robust_width(rows: list[dict[str, Any]], tolerance: float = 0.02) -> int:
    """How many grid learning rates reach a mean validation accuracy within ``tolerance`` of the best."""
    best = max((r["val_acc"] for r in rows if math.isfinite(r["val_acc"])), default=float("nan"))
    return sum(1 for r in rows if math.isfinite(r["val_acc"]) and r["val_acc"] >= best - tolerance)


def _plot(summary: list[dict[str, Any]], tasks: list[str]) -> Any:
    fig, axes = new_figure(2, len(tasks))
    for col, task in enumerate(tasks):
        for label in LABELS:
            rows = [r for r in summary if r["task"] == task and r["label"] == label]
            lrs = [r["lr"] for r in rows]
            for row, metric in enumerate(("val_loss", "val_acc")):
                axes[row, col].errorbar(lrs, [r[metric] for r in rows], yerr=[r[metric + "_std"] for r in rows],
                                        marker="o", ms=3, capsize=2, label=label)
        for row, metric in enumerate(("validation loss", "validation accuracy")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_title(f"{task}: final {metric}")
        axes[0, col].set_yscale("log")
        axes[0, col].legend(fontsize=7)
    return fig


def _config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def run(ctx: Context) -> dict[str, Any]:
    """Train (or reuse from ``ctx.reuse``) every optimizer at every grid learning rate on digits and the transformer,
    write the tables and figure, and return the summary and each optimizer's robustness (best lr, and how many lrs come
    within 0.02 of its best accuracy)."""
    cfg = CI if ctx.ci else FULL
    points = [{"task": task, "label": label, "lr": lr}
              for task in ("logreg", "mlp") for label in LABELS for lr in cfg["digits_lrs"]]
    keys = ("task", "label", "lr")
    summary = run_or_reuse(ctx, _config(cfg), points, keys, cfg["seeds"], ctx.steps or cfg["digits_steps"])
    lm_points = [{"task": "transformer", "label": label, "lr": lr} for label in LABELS for lr in cfg["lm_lrs"]]
    if lm_points:
        summary += run_or_reuse(ctx, _config(cfg), lm_points, keys, cfg["lm_seeds"], ctx.steps or cfg["lm_steps"])
    tasks = [t for t in ("logreg", "mlp", "transformer") if any(r["task"] == t for r in summary)]
    md = []
    robustness = []
    for task in tasks:
        lrs = sorted({r["lr"] for r in summary if r["task"] == task})
        rows = []
        for label in LABELS:
            by_lr = {r["lr"]: r for r in summary if r["task"] == task and r["label"] == label}
            rows.append([label] + [f"{fmt(by_lr[lr]['val_acc'])} / {fmt(by_lr[lr]['val_loss'])}" for lr in lrs])
            ordered = [by_lr[lr] for lr in lrs]
            best = max(ordered, key=lambda r: r["val_acc"] if math.isfinite(r["val_acc"]) else -1)
            robustness.append({"task": task, "label": label, "best_lr": best["lr"], "best_val_acc": best["val_acc"],
                               "best_val_loss": min(r["val_loss"] for r in ordered),
                               "lrs_within_0.02_of_best_acc": robust_width(ordered)})
        seeds = len(summary[0]["seeds"]) if task != "transformer" else len(cfg["lm_seeds"])
        steps = ctx.steps or (cfg["lm_steps"] if task == "transformer" else cfg["digits_steps"])
        md.append(f"## {task}: validation accuracy / loss at the end ({steps} steps, mean of {seeds} seed(s))\n\n"
                  + md_table(["optimizer"] + [f"lr {lr:g}" for lr in lrs], rows))
    md.append("## Robustness: best LR and how many grid LRs get within 0.02 of each optimizer's best accuracy\n\n"
              + md_table(["task", "optimizer", "best lr", "best val acc", "best val loss", "LRs within 0.02"],
                         [[r["task"], r["label"], f"{r['best_lr']:g}", fmt(r["best_val_acc"]),
                           fmt(r["best_val_loss"]), r["lrs_within_0.02_of_best_acc"]] for r in robustness]))
    results = {"config": _config(cfg),
               "summary": summary, "robustness": robustness}
    write_outputs(ctx, results, "\n\n".join(md), _plot(summary, tasks))
    return results


register(Experiment("lr-sensitivity", "final validation loss/accuracy over a learning-rate grid, eight optimizers",
                    run))
