"""``sharded-optim inspect CKPT``: what a checkpoint holds, read on one process without a process group.

Prints the algorithm, step, format version, world size of the save, hyperparameters per param group, and for
every stored tensor its shape, dtype and L2 norm (``--json`` for machine-readable output).  ``CKPT`` may be a
checkpoint directory or a directory of checkpoints (its ``latest`` is shown).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli import Command, register


def summarize(path: str | Path) -> dict[str, Any]:
    """The facts ``inspect`` shows, as plain data."""
    import torch

    from .checkpoint import latest, read_checkpoint

    path = Path(path)
    if path.is_dir() and not (path / "meta.json").is_file():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"{path}: neither a checkpoint nor a directory holding one")
        path = found
    meta, tensors = read_checkpoint(path)
    return {
        "path": str(path), "algorithm": meta["algorithm"], "step": meta["step"],
        "format_version": meta["format_version"], "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage"), "lookahead": meta.get("lookahead"), "extra": meta.get("extra"),
        "counters": meta.get("counters"),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])}
                         for g in meta["param_groups"]],
        "param_steps": {name: info["step"] for name, info in meta["params"].items()},
        "tensors": {fqn: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                          "norm": float(torch.linalg.vector_norm(t.double()))}
                    for fqn, t in sorted(tensors.items())},
    }


def _print_text(s: dict[str, Any]) -> None:
    print(f"checkpoint {s['path']}")
    print(f"  algorithm {s['algorithm']}  step {s['step']}  format v{s['format_version']}  saved by "
          f"{s['world_size']} rank(s), zero_stage {s['zero_stage']}")
    if s["lookahead"]:
        print(f"  lookahead {s['lookahead']}")
    for gi, g in enumerate(s["param_groups"]):
        hp = ", ".join(f"{k}={v}" for k, v in g.items())
        print(f"  param group {gi}: {hp}")
    steps = sorted(set(s["param_steps"].values()))
    print(f"  per-parameter steps: {steps if len(steps) > 1 else steps[0] if steps else '-'}")
    width = max((len(k) for k in s["tensors"]), default=10)
    print(f"  {'tensor':<{width}}  {'shape':<16} {'dtype':<9} norm")
    for fqn, t in s["tensors"].items():
        print(f"  {fqn:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']:<9} {t['norm']:.6g}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the ``sharded-optim inspect`` subcommand runs the same code)."""
    parser = argparse.ArgumentParser(prog="sharded-optim inspect", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint directory, or a directory of checkpoints (shows the latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError

    try:
        summary = summarize(args.path)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"sharded-optim inspect: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_text(summary)
    return 0


register(Command("inspect", "show a checkpoint: algorithm, step, hyperparameters, per-tensor shapes and norms",
                 _add_arguments, _run))
