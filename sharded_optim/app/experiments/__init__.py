"""Optimizer comparison experiments (issue 8): one module per experiment, a registry, one command.

``sharded-optim experiment NAME [--ci] [--steps N] [--kernel eager|compiled] [--out DIR]`` or ``python -m
sharded_optim.app.experiments NAME ...``; under ``torchrun --nproc_per_node 2 -m sharded_optim.app.experiments
NAME`` every rank trains on its slice of each global batch and the ZeRO optimizer averages the gradients (same
numerics as one process up to float summation order).  Results: ``NAME.{json,md,png}`` (``NAME-ci.*`` for ``--ci``)
in ``--out``, by default ``runs/experiments/`` under the current directory; the committed results are in
``bench/results/experiments/`` (``--out bench/results/experiments`` regenerates them).
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUT, Context
from .registry import EXPERIMENT_MODULES, Experiment, experiments, get, register

__all__ = ["Context", "Experiment", "EXPERIMENT_MODULES", "add_arguments", "experiments", "get", "register",
           "run_experiment", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment command's arguments (shared by ``sharded-optim experiment`` and ``python -m``)."""
    parser.add_argument("name", choices=sorted(experiments()), help="which experiment to run")
    parser.add_argument("--ci", action="store_true", help="tiny grid and few steps (the CI variant)")
    parser.add_argument("--steps", type=int, default=None, help="override the experiment's step count")
    parser.add_argument("--kernel", choices=("eager", "compiled", "auto"), default="eager",
                        help="ShardedOptimizer kernel (eager is faster for these tiny models)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory for JSON, markdown, PNG (default: {DEFAULT_OUT}/ in the current "
                             "directory; the committed results: bench/results/experiments)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier results JSON of the same experiment and configuration: its summary rows "
                             "are kept and only grid points it lacks are run (every run is a pure function of "
                             "its seed); for adding an optimizer to a grid without re-running the others")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (default 1: tiny models gain nothing from more, and a "
                             "busy machine makes multi-threaded OpenMP much slower)")


def run_experiment(name: str, *, ci: bool = False, steps: int | None = None, kernel: str = "eager",
                   out_dir: Path | None = DEFAULT_OUT, rank: int = 0, world_size: int = 1,
                   command_line: str | None = None, reuse: Path | None = None) -> dict[str, Any]:
    """Run one experiment in this process (the caller owns any process group)."""
    ctx = Context(name=name, rank=rank, world_size=world_size, ci=ci, kernel=kernel, out_dir=out_dir, steps=steps,
                  command_line=command_line, reuse=reuse)
    return get(name).run(ctx)


def command_line(program: str, argv: list[str], launcher: str, world_size: int) -> str:
    """The command as run: ``program`` (how the user called us, e.g. ``sharded-optim experiment``) and its
    arguments; under torchrun with the launcher in front, as ``torchrun`` would be typed to repeat it."""
    text = shlex.join(argv)
    if launcher == "torchrun" and world_size > 1:
        runner = f"-m {program[len('python -m '):]}" if program.startswith("python -m ") else f"--no-python {program}"
        return f"torchrun --standalone --nproc_per_node {world_size} {runner} {text}"
    return f"{program} {text}"


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point: initialise torch.distributed if a launcher started us, run, clean up."""
    from ...dist import cleanup, init_distributed
    info = init_distributed(num_threads=args.threads)
    program, argv = getattr(args, "invocation", ("python -m sharded_optim.app.experiments", None))
    typed = None if argv is None else command_line(program, argv, info.launcher, info.world_size)
    try:
        run_experiment(args.name, ci=args.ci, steps=args.steps, kernel=args.kernel, out_dir=args.out,
                       rank=info.rank, world_size=info.world_size, command_line=typed, reuse=args.reuse)
    except BaseException:
        cleanup(barrier=False)
        raise
    cleanup()
    return 0
