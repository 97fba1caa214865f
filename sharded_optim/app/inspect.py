"""``sharded-optim inspect CKPT``: what a checkpoint holds, read on one process without a process group.

Prints the algorithm, step, format version, world size of the save, hyperparameters per param group, and for
every stored tensor its shape, dtype and L2 norm (``--json`` for machine-readable output).  ``CKPT`` may be a
checkpoint directory, a directory of checkpoints (its ``latest`` is shown) or a run directory holding
``checkpoints/``.  Every byte read is checked against the checksums recorded at save time; ``--verify`` checks
the whole checkpoint (every file, every chunk, finite state) and lists every problem found.  A damaged
checkpoint gives a one-line message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli import Command, register


def resolve(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself, the latest one under it, or under its ``checkpoints/``."""
    from ..checkpoint import latest

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "meta.json").is_file() or (path / ".metadata").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: neither a checkpoint, nor a directory of checkpoints, nor a run directory "
                            "holding checkpoints/")


def summarize(path: str | Path) -> dict[str, Any]:
    """The facts ``inspect`` shows, as plain data."""
    import torch

    from ..checkpoint import read_checkpoint

    path = resolve(path)
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


def _fmt(value: Any) -> str:
    """Numbers as a person reads them: 0.0003, not 0.00030000000000000003 (--json keeps every digit)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _print_text(s: dict[str, Any]) -> None:
    print(f"checkpoint {s['path']}")
    print(f"  algorithm {s['algorithm']}  step {s['step']}  format v{s['format_version']}  saved by "
          f"{s['world_size']} rank(s), zero_stage {s['zero_stage']}")
    if s["lookahead"]:
        print(f"  lookahead {s['lookahead']}")
    for gi, g in enumerate(s["param_groups"]):
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in g.items())
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
    parser.add_argument("--verify", action="store_true",
                        help="check the whole checkpoint (checksums of every file and tensor chunk, finite state) "
                             "and list every problem; exit status 2 if there is any")


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError

    try:
        if args.verify:
            return _verify(resolve(args.path), args.json)
        summary = summarize(args.path)
    except (CheckpointError, OSError) as exc:
        hint = "" if args.verify or not isinstance(exc, CheckpointError) else \
            " (--verify lists every problem)"
        print(f"sharded-optim inspect: {exc}{hint}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # a version-1 meta.json damaged inside
        print(f"sharded-optim inspect: {args.path}: damaged checkpoint ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_text(summary)
    return 0


def _verify(path: Path, as_json: bool) -> int:
    from ..checkpoint.verify import verify

    report = verify(path)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        what = "checksums and values" if report["checksums"] else "values (format v1: no checksums recorded)"
        print(f"checkpoint {path}: {report['chunks']} tensor chunk(s), {report['bytes']} bytes, "
              f"{report['files']} other file(s); checked {what}")
        for problem in report["problems"]:
            print(f"  PROBLEM: {problem}")
        print("  OK" if not report["problems"] else f"  {len(report['problems'])} problem(s)")
    return 2 if report["problems"] else 0


register(Command("inspect", "show a checkpoint: algorithm, step, hyperparameters, per-tensor shapes and norms",
                 _add_arguments, _run))
