"""What every experiment shares: the run context, the optimizer zoo, and writing JSON + markdown + PNG.

Distributed runs: under a launcher (torchrun, ...) every rank runs the same experiment; each training step's
*global* batch is drawn identically on all ranks and each rank takes its contiguous slice, so the ZeRO
optimizer's gradient averaging reproduces the single-process gradient up to float summation order.  Evaluation
uses the full (replicated) parameters on every rank; only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...optimizer import ShardedOptimizer

# Relative to the current directory, like training.run_dir: an installed package has no checkout to write into,
# and in a checkout runs/ is ignored by git, so a --ci run leaves no untracked files among the committed results.
# The committed results in bench/results/experiments/ are regenerated with --out bench/results/experiments.
DEFAULT_OUT = Path("runs") / "experiments"

# label -> (algorithm, options): the optimizers the experiments compare, each at its own defaults otherwise.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),            # decoupled weight decay, default wd = 1e-2 (torch.optim.AdamW)
    "amsgrad": ("adam", {"amsgrad": True}),
    "radam": ("radam", {}),
    "adamod": ("adamod", {}),
    "adabound": ("adabound", {}),
    "diffgrad": ("diffgrad", {}),      # diffGrad v2 code: L2 decay (default 0), friction on m
    "diffmod": ("diffmod", {}),        # AdaMod x friction, len_memory 1000 (beta3 = 0.999)
}


@dataclass
class Context:
    """Where and how an experiment runs."""

    name: str
    rank: int = 0
    world_size: int = 1
    ci: bool = False                  # the tiny CI variant: small grid, few steps
    kernel: str = "eager"
    out_dir: Path | None = DEFAULT_OUT  # None: write nothing
    steps: int | None = None          # override of the experiment's step count
    reuse: Path | None = None         # earlier results of the same experiment: grid points it has are not re-run
    extra: dict[str, Any] = field(default_factory=dict)
    command_line: str | None = None   # the command as the user typed it (recorded in the results); None: derived

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print ``message``, prefixed with the experiment's name, on rank 0 only."""
        if self.is_main:
            print(f"[{self.name}] {message}", flush=True)

    def command(self) -> str:
        """The command line that reproduces this run: as typed when known, else rebuilt from the flags."""
        if self.command_line is not None:
            return self.command_line
        flags = (" --ci" if self.ci else "") + (f" --steps {self.steps}" if self.steps else "")
        flags += f" --kernel {self.kernel}" if self.kernel != "eager" else ""
        flags += f" --reuse {Path(self.reuse).name}" if self.reuse is not None else ""
        base = f"python -m sharded_optim.app.experiments {self.name}{flags}"
        if self.world_size > 1:
            return (f"torchrun --standalone --nproc_per_node {self.world_size} -m sharded_optim.app.experiments "
                    f"{self.name}{flags}")
        return base


def make_optimizer(ctx: Context, params: Any, label: str, lr: float, **overrides: Any) -> ShardedOptimizer:
    """``ShardedOptimizer`` for one of :data:`OPTIMIZERS` (``overrides`` beat the label's options)."""
    algorithm, options = OPTIMIZERS[label]
    return ShardedOptimizer(params, algorithm=algorithm, lr=lr, kernel=ctx.kernel, **{**options, **overrides})


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``lo`` to ``hi`` inclusive, rounded to 3 significant digits."""
    if n == 1:
        return [lo]
    return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std of the finite values (nan when none is finite)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def fmt(value: float | None, digits: int = 3) -> str:
    """A table cell: nan/None as 'diverged'."""
    if value is None or not math.isfinite(value):
        return "diverged"
    return f"{value:.{digits}f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: a header row from ``headers``, then one row per item of ``rows`` (cells through ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return obj.name
    return obj


def environment(ctx: Context) -> dict[str, Any]:
    """What a result was measured on: torch and Python versions, world size, threads per rank, kernel mode and CPU
    count."""
    return {"torch": torch.__version__, "python": platform.python_version(), "world_size": ctx.world_size,
            "threads_per_rank": torch.get_num_threads(), "kernel": ctx.kernel, "cpu_count": os.cpu_count()}


def write_outputs(ctx: Context, results: dict[str, Any], markdown: str, figure: Any | None) -> dict[str, Path]:
    """Rank 0 writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``ctx.out_dir``."""
    if not ctx.is_main or ctx.out_dir is None:
        return {}
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = ctx.name + ("-ci" if ctx.ci else "")
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    payload = {"experiment": ctx.name, "command": ctx.command(), "ci": ctx.ci, "environment": environment(ctx),
               "results": results}
    paths["json"].write_text(json.dumps(_clean(payload), indent=1) + "\n")
    header = (f"# Experiment `{ctx.name}`{' (CI variant)' if ctx.ci else ''}\n\n"
              f"Command: `{ctx.command()}`  \nEnvironment: torch {torch.__version__}, world size "
              f"{ctx.world_size}, {torch.get_num_threads()} thread(s) per rank, kernel `{ctx.kernel}`.\n\n")
    if figure is not None:
        paths["png"] = out / f"{stem}.png"
        figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
        header += f"![{ctx.name}]({paths['png'].name})\n\n"
        import matplotlib.pyplot as plt
        plt.close(figure)
    paths["md"].write_text(header + markdown.rstrip() + "\n")
    ctx.log(f"results written to {out}/: " + ", ".join(p.name for p in paths.values()))
    return paths


def new_figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend) and its axes as a 2-D array."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes
