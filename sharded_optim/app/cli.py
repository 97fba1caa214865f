"""The ``sharded-optim`` command: one argparse subcommand per :class:`Command` in a registry.

``sharded-optim train --config configs/quickstart.yaml [--set k=v] [--resume]`` is built in.  To add a
subcommand from your own module, register it at import time and list the module in
:data:`COMMAND_MODULES` (modules named there that do not exist yet are skipped)::

    # sharded_optim/inspect_cmd.py
    from sharded_optim.app.cli import Command, register

    def _add_arguments(parser): parser.add_argument("path")
    def _run(args) -> int: ...; return 0

    register(Command("inspect", "show a checkpoint or a run directory", _add_arguments, _run))

Installed third-party packages can register through the ``sharded_optim.commands`` entry-point group (the
entry point names a module to import).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..dist import strip_launcher_args
from .registry import Registry


@dataclass(frozen=True)
class Command:
    """One ``sharded-optim`` subcommand: its name and help line, a function that adds its arguments to its subparser,
    and the function run with the parsed arguments (its return value is the exit status; None means 0)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_REGISTRY = Registry("subcommand")  # name -> Command

# Modules that register subcommands when imported.  Missing ones are skipped, so a module can be listed
# before it is written.
COMMAND_MODULES: tuple[str, ...] = (
    "sharded_optim.app.inspect",
    "sharded_optim.app.experiments.cli",
)


def register(command: Command) -> Command:
    """Add a subcommand; a second registration of the same name is a bug and raises."""
    return _REGISTRY.add(command)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_arguments
    add_arguments(parser)


def _train_run(args: argparse.Namespace) -> int:
    from .train import run_from_args  # imported on use: `sharded-optim --help` stays fast
    return run_from_args(args)


register(Command("train", "train the small transformer with ShardedOptimizer (any launcher)", _train_arguments,
                 _train_run))


def _import_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its imports is missing: a real error
                raise
    for ep in importlib.metadata.entry_points(group="sharded_optim.commands"):
        importlib.import_module(ep.value)


def build_parser() -> argparse.ArgumentParser:
    """The ``sharded-optim`` parser, one subparser per registered command (the modules of :data:`COMMAND_MODULES` and of
    the ``sharded_optim.commands`` entry points are imported first)."""
    _import_command_modules()
    parser = argparse.ArgumentParser(prog="sharded-optim", allow_abbrev=False,
                                     description="ZeRO-style sharded Adam-family optimizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _REGISTRY.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help, allow_abbrev=False)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def program_name() -> str:
    """How the user started this command: ``python -m sharded_optim`` or the ``sharded-optim`` script."""
    return "python -m sharded_optim" if Path(sys.argv[0]).name == "__main__.py" else "sharded-optim"


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named in ``argv`` (default ``sys.argv[1:]``, launcher arguments stripped); return its exit
    status."""
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.invocation = (program_name(), argv)  # what a command that records its own command line reads
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
