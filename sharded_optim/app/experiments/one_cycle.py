"""``one-cycle``: AdamW under ``torch.optim.lr_scheduler.OneCycleLR(cycle_momentum=True)`` (the learning rate AND
beta1 cycle: lr max_lr/25 -> max_lr -> max_lr/2.5e5, beta1 0.95 -> 0.85 -> 0.95) against AdamW at a constant
learning rate, for the same step budgets, on the digits MLP (two budgets, 3 seeds) and the small transformer
(one budget, 3 seeds).

Claim tested (docs/EXPERIMENTS.md, seed 002): AdamW + 1cycle trains to a given quality in fewer steps
("super-convergence").
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ...optimizer import ShardedOptimizer
from .common import Context, fmt, md_table, new_figure, write_outputs
from .grid import aggregate, run_grid
from .registry import Experiment, register

FULL = {"digits_lrs": [1e-3, 3e-3, 1e-2, 3e-2], "digits_budgets": [100, 400], "seeds": (0, 1, 2),
        "lm_lrs": [3e-3, 1e-2], "lm_budget": 300, "lm_seeds": (0, 1, 2)}
CI = {"digits_lrs": [1e-2], "digits_budgets": [20], "seeds": (0,), "lm_lrs": [], "lm_budget": 0, "lm_seeds": ()}


def one_cycle(max_lr: float, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """Scheduler factory for OneCycleLR with torch's defaults and beta1 cycling."""
    def factory(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps,
                                                   cycle_momentum=True)
    return factory


def schedule_trace(total_steps: int = 100, max_lr: float = 1e-2) -> dict[str, list[float]]:
    """The lr and beta1 a ``ShardedOptimizer`` actually holds at each step under OneCycleLR (no training)."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ShardedOptimizer([p], algorithm="adamw", lr=max_lr, kernel="eager", zero_stage=0)
    sched = one_cycle(max_lr, total_steps)(opt)
    lrs, beta1s = [], []
    for _ in range(total_steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        beta1s.append(float(opt.param_groups[0]["betas"][0]))
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return {"lr": lrs, "beta1": beta1s}


def _plot(summary: list[dict[str, Any]], trace: dict[str, list[float]]) -> Any:
    fig, axes = new_figure(1, 3)
    ax = axes[0, 0]
    ax.plot(trace["lr"], color="tab:blue")
    ax.set_ylabel("lr / max_lr", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(trace["beta1"], color="tab:red")
    ax2.set_ylabel("beta1", color="tab:red")
    ax.set_title("OneCycleLR as seen by ShardedOptimizer")
    ax.set_xlabel("step")
    for col, task in ((1, "mlp"), (2, "transformer")):
        for sched in ("constant", "one-cycle"):
            for budget in sorted({r["budget"] for r in summary if r["task"] == task}):
                rows = [r for r in summary if r["task"] == task and r["schedule"] == sched and r["budget"] == budget]
                axes[0, col].plot([r["lr"] for r in rows], [r["val_loss"] for r in rows], marker="o",
                                  ls="-" if sched == "one-cycle" else "--", label=f"{sched}, {budget} steps")
        axes[0, col].set_xscale("log")
        axes[0, col].set_xlabel("max lr (constant: the lr)")
        axes[0, col].set_title(f"{task}: final validation loss")
        if axes[0, col].get_legend_handles_labels()[0]:
            axes[0, col].legend(fontsize=7)
    return fig


def run(ctx: Context) -> dict[str, Any]:
    """Train AdamW with a constant lr and with one-cycle at every budget and peak lr, trace the schedule, write the
    tables and figure, and return the summary and each schedule's best lr per budget."""
    cfg = CI if ctx.ci else FULL
    points = [{"task": "mlp", "label": "adamw", "lr": lr, "schedule": s, "budget": b, "steps": b}
              for b in cfg["digits_budgets"] for lr in cfg["digits_lrs"] for s in ("constant", "one-cycle")]
    points += [{"task": "transformer", "label": "adamw", "lr": lr, "schedule": s, "budget": cfg["lm_budget"],
                "steps": cfg["lm_budget"]} for lr in cfg["lm_lrs"] for s in ("constant", "one-cycle")]

    def options(p: dict[str, Any]) -> dict[str, Any]:
        return {"scheduler": one_cycle(p["lr"], p["steps"]) if p["schedule"] == "one-cycle" else None}

    records = run_grid(ctx, [p for p in points if p["task"] == "mlp"], cfg["seeds"], 0, options)
    if cfg["lm_lrs"]:
        records += run_grid(ctx, [p for p in points if p["task"] == "transformer"], cfg["lm_seeds"], 0, options)
    summary = aggregate(records, ("task", "budget", "lr", "schedule"))
    trace = schedule_trace()
    rows = [[r["task"], r["budget"], f"{r['lr']:g}", r["schedule"], f"{fmt(r['val_loss'])} ± {fmt(r['val_loss_std'])}",
             f"{fmt(r['val_acc'])} ± {fmt(r['val_acc_std'])}", fmt(r["train_loss"], 4)] for r in summary]
    best = []
    for task in sorted({r["task"] for r in summary}):
        for budget in sorted({r["budget"] for r in summary if r["task"] == task}):
            for sched in ("constant", "one-cycle"):
                cands = [r for r in summary if r["task"] == task and r["budget"] == budget and r["schedule"] == sched]
                b = min(cands, key=lambda r: r["val_loss"])
                best.append([task, budget, sched, f"{b['lr']:g}", fmt(b["val_loss"]), fmt(b["val_acc"])])
    md = ("AdamW (wd 1e-2), batch 64 (digits) / 16 sequences (transformer); one-cycle = torch OneCycleLR defaults "
          "(pct_start 0.3, div 25, final div 1e4, beta1 0.95 -> 0.85 -> 0.95); constant = the same lr all along. "
          "Mean ± std over seeds (digits 3, transformer 3).\n\n"
          + md_table(["task", "steps", "lr", "schedule", "val loss", "val acc", "train loss"], rows)
          + "\n\n## Best of each schedule per budget\n\n"
          + md_table(["task", "steps", "schedule", "best lr", "val loss", "val acc"], best))
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "summary": summary,
               "schedule_trace": trace, "best": best}
    write_outputs(ctx, results, md, _plot(summary, trace))
    return results


register(Experiment("one-cycle", "AdamW + OneCycleLR (lr and beta1 cycled) vs a constant learning rate", run))
