"""``bias-correction``: Adam and AMSGrad with bias correction on and off, beta2 in {0.99, 0.999}, lr in
{1e-4, 1e-3, 1e-2} with a linear decay to 0 (Korzeniowski's grid, seed 000), on logistic regression and the MLP
on digits, 3 seeds.

Claims tested (docs/EXPERIMENTS.md): bias correction mostly helps convergence (seed 000); without it the first
steps are too large when beta2 is close to 1 (Kingma & Ba, seed 001 summary); AMSGrad has no clear practical
advantage over Adam (seeds 000, 002).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .common import Context, fmt, md_table, new_figure, write_outputs
from .grid import aggregate, run_grid
from .registry import Experiment, register

FULL = {"tasks": ["logreg", "mlp"], "lrs": [1e-4, 1e-3, 1e-2], "beta2s": [0.99, 0.999], "steps": 400,
        "seeds": (0, 1, 2), "eval_every": 20}
CI = {"tasks": ["mlp"], "lrs": [1e-2], "beta2s": [0.999], "steps": 20, "seeds": (0,), "eval_every": 10}


def linear_decay(total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """Scheduler factory: lr decays linearly from its initial value to 0 at ``total_steps``."""
    def factory(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    return factory


def _plot(summary: list[dict[str, Any]], cfg: dict[str, Any]) -> Any:
    fig, axes = new_figure(len(cfg["tasks"]), len(cfg["lrs"]))
    for row, task in enumerate(cfg["tasks"]):
        for col, lr in enumerate(cfg["lrs"]):
            ax = axes[row, col]
            for r in summary:
                if r["task"] != task or r["lr"] != lr:
                    continue
                colour = "tab:blue" if r["label"] == "adam" else "tab:red"
                ls = "-" if r["bias_correction"] else ":"
                ax.plot(r["curve_steps"], r["curve_train_loss"], ls=ls, color=colour,
                        alpha=1.0 if r["beta2"] == 0.999 else 0.5,
                        label=f"{r['label']} b2={r['beta2']} bc={'on' if r['bias_correction'] else 'off'}")
            ax.set_yscale("log")
            ax.set_title(f"{task}, lr {lr:g}: training loss")
            ax.set_xlabel("step")
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    return fig


def run(ctx: Context) -> dict[str, Any]:
    """Train every grid point (task x lr x beta2 x Adam/AMSGrad x bias correction on/off) over the seeds, write the
    table and figure, and return the config and the per-point summary."""
    cfg = CI if ctx.ci else FULL
    steps = ctx.steps or cfg["steps"]
    points = [{"task": task, "label": label, "lr": lr, "beta2": b2, "bias_correction": bc}
              for task in cfg["tasks"] for lr in cfg["lrs"] for b2 in cfg["beta2s"]
              for label in ("adam", "amsgrad") for bc in (True, False)]

    def options(p: dict[str, Any]) -> dict[str, Any]:
        return {"betas": (0.9, p["beta2"]), "bias_correction": p["bias_correction"],
                "scheduler": linear_decay(steps), "eval_every": cfg["eval_every"]}

    records = run_grid(ctx, points, cfg["seeds"], steps, options)
    summary = aggregate(records, ("task", "lr", "beta2", "label", "bias_correction"))
    early = cfg["eval_every"]
    rows = []
    for r in summary:
        r["train_loss_early"] = r["curve_train_loss"][r["curve_steps"].index(early)]
        rows.append([r["task"], f"{r['lr']:g}", r["beta2"], r["label"], "on" if r["bias_correction"] else "off",
                     fmt(r["train_loss_early"]), fmt(r["train_loss"], 4),
                     f"{fmt(r['val_loss'])} ± {fmt(r['val_loss_std'])}", f"{fmt(r['val_acc'])} ± {fmt(r['val_acc_std'])}"])
    md = (f"Digits, batch 64, {steps} steps with the lr decayed linearly to 0, betas (0.9, beta2), eps 1e-8, "
          f"mean ± std over {len(cfg['seeds'])} seed(s).\n\n"
          + md_table(["task", "lr", "beta2", "optimizer", "bias corr.", f"train loss at step {early}",
                      "final train loss", "final val loss", "final val acc"], rows))
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "steps": steps,
               "summary": summary}
    write_outputs(ctx, results, md, _plot(summary, cfg))
    return results


register(Experiment("bias-correction", "Adam and AMSGrad with bias correction on and off", run))
