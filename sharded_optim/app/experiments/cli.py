"""Registers the ``sharded-optim experiment NAME`` subcommand (this module is listed in
:data:`sharded_optim.app.cli.COMMAND_MODULES`)."""
from __future__ import annotations

import argparse

from ..cli import Command, register


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import add_arguments
    add_arguments(parser)


def _run(args: argparse.Namespace) -> int:
    from . import run_from_args
    return run_from_args(args)


register(Command("experiment", "run an optimizer comparison experiment (reddi, lr-sensitivity, warmup, "
                 "weight-decay, one-cycle, bias-correction)", _add_arguments, _run))
