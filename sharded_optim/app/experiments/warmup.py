"""``warmup``: Adam with and without linear learning-rate warmup, against RAdam, AdaMod, diffGrad and DiffMod
without warmup, on the
project's small transformer (``sharded_optim.app.model`` on the shipped byte corpus) at several peak learning rates.

Claims tested (docs/EXPERIMENTS.md): without warmup Adam trains worse early on / can be unusable (seeds 003 and
004); RAdam's rectification (seed 003) and AdaMod's step-size memory (seed 004) remove the need for warmup, and
DiffMod (AdaMod with diffGrad's friction, seed 004) keeps that; diffGrad, with no step-size memory, is the control.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .common import Context, fmt, md_table, new_figure, write_outputs
from .grid import run_or_reuse
from .registry import Experiment, register

# variant -> (optimizer label, warmup fraction of the run)
VARIANTS: dict[str, tuple[str, float]] = {
    "adam": ("adam", 0.0),
    "adam+warmup": ("adam", 0.2),
    "radam": ("radam", 0.0),
    "adamod": ("adamod", 0.0),
    "diffgrad": ("diffgrad", 0.0),
    "diffmod": ("diffmod", 0.0),
}
FULL = {"lrs": [1e-3, 3e-3, 1e-2], "steps": 300, "seeds": (0, 1, 2), "eval_every": 25}
CI = {"lrs": [3e-3], "steps": 8, "seeds": (0,), "eval_every": 4}


def linear_warmup(warmup_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """A scheduler factory: lr ramps linearly from lr/W to lr over ``warmup_steps`` steps, then stays."""
    def factory(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))
    return factory


def _plot(summary: list[dict[str, Any]], lrs: list[float]) -> Any:
    fig, axes = new_figure(1, len(lrs))
    for col, lr in enumerate(lrs):
        ax = axes[0, col]
        for variant in VARIANTS:
            for r in summary:
                if r["variant"] == variant and r["lr"] == lr:
                    ax.plot(r["curve_steps"], r["curve_val_loss"], marker=".", label=variant)
        ax.set_title(f"peak lr {lr:g}: validation loss (mean of seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("val cross-entropy (nats/byte)")
        ax.legend(fontsize=7)
    return fig


def run(ctx: Context) -> dict[str, Any]:
    """Train (or reuse) every variant at every peak lr on the small transformer, write the table and figure, and return
    the summary with early and final validation losses."""
    cfg = CI if ctx.ci else FULL
    steps = ctx.steps or cfg["steps"]
    points = [{"task": "transformer", "variant": v, "label": label, "lr": lr, "warmup_steps": int(frac * steps)}
              for lr in cfg["lrs"] for v, (label, frac) in VARIANTS.items()]

    def options(point: dict[str, Any]) -> dict[str, Any]:
        w = point["warmup_steps"]
        return {"eval_every": cfg["eval_every"], "scheduler": linear_warmup(w) if w else None}

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    summary = run_or_reuse(ctx, config, points, ("variant", "lr"), cfg["seeds"], steps, options)
    early = min(2 * cfg["eval_every"], steps)
    rows = []
    for r in summary:
        i_early = r["curve_steps"].index(early) if early in r["curve_steps"] else -1
        r["val_loss_early"] = r["curve_val_loss"][i_early]
        rows.append([f"{r['lr']:g}", r["variant"], fmt(r["val_loss_early"]),
                     f"{fmt(r['val_loss'])} ± {fmt(r['val_loss_std'])}", fmt(r["val_acc"])])
    md = (f"Small transformer (2 layers, d=48, 32-byte context), batch 16, {steps} steps, "
          f"{len(cfg['seeds'])} seed(s); warmup = linear over the first {int(VARIANTS['adam+warmup'][1] * 100)}% "
          "of the steps.\n\n"
          + md_table(["peak lr", "variant", f"val loss at step {early}", "final val loss (± std over seeds)",
                      "final val next-byte acc"], rows))
    results = {"config": config, "steps": steps,
               "summary": summary}
    write_outputs(ctx, results, md, _plot(summary, cfg["lrs"]))
    return results


register(Experiment("warmup", "adam with/without linear warmup vs radam, adamod, diffgrad and diffmod without, "
                    "small transformer",
                    run))
