"""``reddi``: the Reddi, Kale & Kumar (ICLR 2018) counterexample, online and stochastic (ALGORITHMS.md section 13).

On F = [-1, 1] the losses are linear, f_t(x) = g_t * x, with

* online:     g_t = 1010 if t mod 101 == 1 else -10       (one period sums to +10, so x* = -1)
* stochastic: g_t = 1010 with probability 0.01 else -10    (E[g] = 0.2, so x* = -1)

Harness of section 13: alpha_t = alpha / sqrt(t) (set before each step), betas (0.9, 0.99), eps 1e-8, projection
by clipping to [-1, 1] after each step, double precision.  Adam and AMSGrad (torch form) are two param groups of
ONE ``ShardedOptimizer``; every setting (online from x_1 = 1 and from x_1 = 0, stochastic from x_1 = 1 with four
seeds) is one element of a vector parameter, since the update is elementwise: one ``step()`` per t advances all
of them.  Regret R_T = sum_t g_t x_t - min_{x in F} sum_t g_t x = sum_t g_t x_t + |sum_t g_t|.

Under a launcher every rank runs the whole problem (``zero_stage=0``): a six-element problem has nothing to shard.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from ...optimizer import ShardedOptimizer
from .common import Context, fmt, md_table, new_figure, write_outputs
from .registry import Experiment, register

BETAS = (0.9, 0.99)
EPS = 1e-8
BIG, SMALL, PERIOD, PROB = 1010.0, -10.0, 101, 0.01
STOCH_SEEDS = (0, 1, 2, 3)
# (name, kind, x_1, seed)
SETTINGS: tuple[tuple[str, str, float, int | None], ...] = (
    ("online x1=1", "online", 1.0, None),
    ("online x1=0", "online", 0.0, None),
    *((f"stochastic x1=1 seed {s}", "stochastic", 1.0, s) for s in STOCH_SEEDS),
)
FULL_STEPS = 500_000
CI_STEPS = 8_000
CHUNK = 10_000


def _gradients(t0: int, n: int, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Gradients for steps t0 .. t0+n-1 (1-based), one column per setting."""
    t = torch.arange(t0, t0 + n, dtype=torch.int64)
    cols = []
    for (_, kind, _, _), gen in zip(SETTINGS, generators):
        if kind == "online":
            rare = (t % PERIOD) == 1
        else:
            rare = torch.rand(n, generator=gen, dtype=torch.float64) < PROB
        cols.append(torch.where(rare, BIG, SMALL).to(torch.float64))
    return torch.stack(cols, dim=1)


def _checkpoints(steps: int) -> set[int]:
    """About 60 log-spaced steps, plus the last."""
    return {max(1, int(round(10 ** (k / 10)))) for k in range(int(10 * math.log10(steps)) + 1)} | {steps}


def simulate(ctx: Context, steps: int, alpha: float = 1.0) -> dict[str, Any]:
    """Run Adam and AMSGrad on every setting for ``steps`` steps; return trajectories and summaries."""
    x0 = torch.tensor([s[2] for s in SETTINGS], dtype=torch.float64)
    xs = {"adam": torch.nn.Parameter(x0.clone()), "amsgrad": torch.nn.Parameter(x0.clone())}
    opt = ShardedOptimizer([{"params": [xs["adam"]], "amsgrad": False, "name": "adam"},
                            {"params": [xs["amsgrad"]], "amsgrad": True, "name": "amsgrad"}],
                           algorithm="adam", lr=alpha, betas=BETAS, eps=EPS, weight_decay=0.0,
                           kernel=ctx.kernel, zero_stage=0)
    gens = [None if seed is None else torch.Generator().manual_seed(seed) for _, _, _, seed in SETTINGS]
    gx = {k: torch.zeros(len(SETTINGS), dtype=torch.float64) for k in xs}  # sum_t g_t x_t
    gsum = torch.zeros(len(SETTINGS), dtype=torch.float64)
    # last step at which x was still outside its limit band (Adam: x <= 0.9; AMSGrad: x >= -0.9)
    last_out = {k: torch.zeros(len(SETTINGS), dtype=torch.int64) for k in xs}
    marks = _checkpoints(steps)
    tail = {k: torch.zeros(len(SETTINGS), dtype=torch.float64) for k in xs}  # sum of x over the last period
    trace: dict[str, list] = {"t": [], "adam_x": [], "amsgrad_x": [], "adam_regret": [], "amsgrad_regret": []}
    start = time.perf_counter()
    for c0 in range(1, steps + 1, CHUNK):
        if c0 > 1 and (c0 - 1) % (5 * CHUNK) == 0:
            ctx.log(f"t = {c0 - 1}: Adam x {[round(v, 3) for v in xs['adam'].tolist()]}, "
                    f"AMSGrad x {[round(v, 3) for v in xs['amsgrad'].tolist()]} ({time.perf_counter() - start:.0f} s)")
        grads = _gradients(c0, min(CHUNK, steps + 1 - c0), gens)
        for i in range(grads.shape[0]):
            t = c0 + i
            g = grads[i]
            gsum += g
            with torch.no_grad():
                for key, x in xs.items():
                    gx[key] += g * x
                    x.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = alpha / math.sqrt(t)
            opt.step()
            with torch.no_grad():
                for x in xs.values():
                    x.clamp_(-1.0, 1.0)
                last_out["adam"] = torch.where(xs["adam"] <= 0.9, t, last_out["adam"])
                last_out["amsgrad"] = torch.where(xs["amsgrad"] >= -0.9, t, last_out["amsgrad"])
                if t > steps - PERIOD:
                    for key, x in xs.items():
                        tail[key] += x
            if t in marks:
                trace["t"].append(t)
                for key, x in xs.items():
                    trace[f"{key}_x"].append(x.detach().tolist())
                    trace[f"{key}_regret"].append(((gx[key] + gsum.abs()) / t).tolist())
    seconds = time.perf_counter() - start
    summary = []
    for j, (name, kind, x1, seed) in enumerate(SETTINGS):
        row = {"setting": name, "kind": kind, "x1": x1, "seed": seed}
        for key in xs:
            row[f"{key}_x_T"] = trace[f"{key}_x"][-1][j]
            row[f"{key}_x_last_period_mean"] = float(tail[key][j]) / min(PERIOD, steps)
            row[f"{key}_regret_per_step"] = trace[f"{key}_regret"][-1][j]
            row[f"{key}_last_t_outside_band"] = int(last_out[key][j])
        summary.append(row)
    return {"steps": steps, "alpha": alpha, "betas": BETAS, "eps": EPS, "dtype": "float64",
            "seconds": seconds, "us_per_step": 1e6 * seconds / steps, "settings": [s[0] for s in SETTINGS],
            "summary": summary, "trace": trace}


def _plot(res: dict[str, Any]) -> Any:
    fig, axes = new_figure(2, 2)
    t = res["trace"]["t"]
    colours = {"adam": "tab:blue", "amsgrad": "tab:red"}
    for j, (name, kind, x1, seed) in enumerate(SETTINGS):
        col = 0 if kind == "online" else 1
        style = "-" if (kind == "online" and x1 == 1.0) or seed == 0 else ("--" if kind == "online" else ":")
        for key, colour in colours.items():
            label = f"{'Adam' if key == 'adam' else 'AMSGrad'} {name.split(' ', 1)[1]}"
            axes[0, col].plot(t, [row[j] for row in res["trace"][f"{key}_x"]], style, color=colour, label=label,
                              lw=1.2)
            axes[1, col].plot(t, [row[j] for row in res["trace"][f"{key}_regret"]], style, color=colour, lw=1.2)
    for col, title in enumerate(("online", "stochastic")):
        axes[0, col].set_title(f"{title}: x_t (x* = -1)")
        axes[1, col].set_title(f"{title}: average regret R_t / t")
        for row in range(2):
            axes[row, col].set_xscale("log")
            axes[row, col].set_xlabel("t")
        axes[1, col].set_yscale("log")
        axes[0, col].legend(fontsize=6)
    fig.suptitle(f"Reddi et al. counterexample, alpha_t = {res['alpha']}/sqrt(t), betas {BETAS}, "
                 f"T = {res['steps']:,}")
    return fig


def run(ctx: Context) -> dict[str, Any]:
    """Simulate Adam and AMSGrad on every setting for ``T`` steps, write the table and figure, and return the
    per-setting final iterates, regret per step and last step outside the band."""
    steps = ctx.steps or (CI_STEPS if ctx.ci else FULL_STEPS)
    ctx.log(f"{steps} steps, Adam and AMSGrad, {len(SETTINGS)} settings")
    res = simulate(ctx, steps)
    ctx.log(f"{res['us_per_step']:.0f} us per step (both optimizers, all settings)")
    rows = [[r["setting"], fmt(r["adam_x_T"]), fmt(r["amsgrad_x_T"]), fmt(r["adam_x_last_period_mean"]),
             fmt(r["amsgrad_x_last_period_mean"]), fmt(r["adam_regret_per_step"], 4),
             fmt(r["amsgrad_regret_per_step"], 4), r["adam_last_t_outside_band"], r["amsgrad_last_t_outside_band"]]
            for r in res["summary"]]
    md = (f"T = {steps:,} steps, alpha_t = 1/sqrt(t), betas {BETAS}, eps {EPS}, float64, clip to [-1, 1]; "
          f"{res['us_per_step']:.0f} us per step for both optimizers together ({res['seconds']:.0f} s).\n\n"
          + md_table(["setting", "Adam x_T", "AMSGrad x_T", "Adam mean x, last 101 steps",
                      "AMSGrad mean x, last 101 steps", "Adam R_T/T", "AMSGrad R_T/T",
                      "Adam: last t with x <= 0.9", "AMSGrad: last t with x >= -0.9"], rows)
          + "\n\nThe optimum is x* = -1. Online, x = +1 costs 20/101 = 0.198 regret per step; stochastic, 0.4.\n")
    write_outputs(ctx, res, md, _plot(res))
    return res


register(Experiment("reddi", "Adam vs AMSGrad on the Reddi et al. counterexample (online and stochastic)", run))
