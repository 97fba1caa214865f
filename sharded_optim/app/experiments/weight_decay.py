"""``weight-decay``: L2-regularised Adam (``adam``: ``g += wd*p`` before the moments) against AdamW (``adamw``:
``p -= lr*wd*p``, torch's convention) across weight-decay values, on the digits MLP trained on 256 images for 1000 steps (250 epochs), long enough to
overfit, so that regularisation has something to do.

Claims tested (docs/EXPERIMENTS.md, seed 002): decoupled weight decay is not equivalent to L2 under Adam; AdamW
is at least as good as Adam+L2 at its best setting; the best L2 coefficient is orders of magnitude smaller
than the best decoupled one.
"""
from __future__ import annotations

from typing import Any

from .common import Context, fmt, md_table, new_figure, write_outputs
from .grid import aggregate, run_grid
from .registry import Experiment, register

MODES = {"L2-Adam": "adam", "AdamW": "adamw"}
FULL = {"wds": [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], "lr": 1e-3, "steps": 1000, "seeds": (0, 1, 2),
        "n_train": 256}
CI = {"wds": [0.0, 0.1], "lr": 1e-3, "steps": 20, "seeds": (0,), "n_train": 256}


def _plot(summary: list[dict[str, Any]], wds: list[float]) -> Any:
    fig, axes = new_figure(1, 3)
    floor = min(w for w in wds if w > 0) / 10  # wd = 0 is drawn one decade left of the grid
    for mode in MODES:
        rows = [r for r in summary if r["mode"] == mode]
        x = [r["wd"] if r["wd"] > 0 else floor for r in rows]
        for ax, metric in zip(axes[0], ("val_loss", "val_acc", "param_norm")):
            ax.errorbar(x, [r[metric] for r in rows], yerr=[r.get(metric + "_std", 0.0) for r in rows], marker="o",
                        ms=3, capsize=2, label=mode)
    for ax, title in zip(axes[0], ("final validation loss", "final validation accuracy", "final parameter norm")):
        ax.set_xscale("log")
        ax.set_xlabel(f"weight decay (leftmost point: 0, drawn at {floor:g})")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0, 2].set_yscale("log")
    return fig


def run(ctx: Context) -> dict[str, Any]:
    """Train L2-Adam and AdamW at every weight decay on the small digits training set, write the table and figure, and
    return the summary (with parameter norms) and each mode's best decay."""
    from .common import mean_std
    cfg = CI if ctx.ci else FULL
    steps = ctx.steps or cfg["steps"]
    points = [{"task": "mlp", "mode": mode, "label": label, "lr": cfg["lr"], "wd": wd}
              for mode, label in MODES.items() for wd in cfg["wds"]]
    records = run_grid(ctx, points, cfg["seeds"], steps,
                       lambda p: {"weight_decay": p["wd"], "n_train": cfg["n_train"]})
    summary = aggregate(records, ("mode", "wd"))
    for row in summary:
        row["param_norm"], row["param_norm_std"] = mean_std(
            [r["param_norm"] for r in records if r["mode"] == row["mode"] and r["wd"] == row["wd"]])
    rows = [[r["mode"], f"{r['wd']:g}", f"{fmt(r['val_loss'])} ± {fmt(r['val_loss_std'])}",
             f"{fmt(r['val_acc'])} ± {fmt(r['val_acc_std'])}", fmt(r["train_loss"], 4), fmt(r["param_norm"], 1)]
            for r in summary]
    best = {mode: min((r for r in summary if r["mode"] == mode), key=lambda r: r["val_loss"]) for mode in MODES}
    md = (f"Digits MLP (64-128-10) trained on {cfg['n_train']} images (validation: the usual 360), lr "
          f"{cfg['lr']:g} constant, batch 64, {steps} steps (~{steps * 64 // cfg['n_train']} epochs), "
          f"mean ± std over {len(cfg['seeds'])} seed(s).\n\n"
          + md_table(["mode", "weight decay", "val loss", "val acc", "train loss", "param norm"], rows)
          + "\n\nBest validation loss: " + "; ".join(
              f"{m} at wd {b['wd']:g}: {fmt(b['val_loss'])} (acc {fmt(b['val_acc'])})" for m, b in best.items()))
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "steps": steps,
               "summary": summary, "best": {m: {"wd": b["wd"], "val_loss": b["val_loss"], "val_acc": b["val_acc"]}
                                            for m, b in best.items()}}
    write_outputs(ctx, results, md, _plot(summary, cfg["wds"]))
    return results


register(Experiment("weight-decay", "L2-regularised Adam vs AdamW (decoupled) across weight-decay values", run))
