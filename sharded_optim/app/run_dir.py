"""One run per directory: what a run leaves in ``training.run_dir``, and the rules for starting in one.

A run writes ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``final_weights.pt`` into its run directory and
its checkpoints under ``checkpoint.dir`` (default ``<run_dir>/checkpoints``).  Starting a run where another one left
any of these would mix two runs (old checkpoints outliving ``keep_last``, a stale summary, a resume picking up the
other run's state), so:

* a new run in a directory that holds a run is refused (:class:`RunDirError`, naming ``--resume``, ``--overwrite``
  and ``training.run_dir``);
* ``--overwrite`` deletes exactly those files and checkpoints (nothing else in the directory) and starts again;
* ``--resume`` continues from the latest checkpoint; a run whose latest checkpoint is already at its last step
  (``training.stop_at`` or ``training.steps``) is *finished* and is left untouched (:func:`finished_run`);
* after a resume from step ``s``, ``metrics.jsonl`` keeps only records with ``step <= s``: an attempt killed after
  its last checkpoint logged steps the resumed run will log again (:func:`truncate_metrics`).

Everything here runs on one process (the launch scripts' preflight, or rank 0 of the job).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "final_weights.pt")
# What sharded_optim.checkpoint writes in a checkpoint directory: step folders (the job names them
# step_<8 digits>), their in-flight .partial/.old siblings, and the `latest` pointer with its temporary file.
_CHECKPOINT_ENTRY = re.compile(r"^(step_\d+|\.step_\d+\.(partial|old)|latest|\.latest\.tmp)$")


class RunDirError(ValueError):
    """The run directory holds another run (or the flags contradict each other); nothing was changed."""


@dataclass(frozen=True)
class FinishedRun:
    """A run whose latest checkpoint is at (or past) the step this invocation would stop at."""

    step: int
    checkpoint: Path
    summary: Path | None  # summary.json when the finished run wrote one


def existing_run(cfg: RunConfig) -> list[str]:
    """What a previous run left behind (file names under the run directory, checkpoint entries); [] if nothing."""
    run_dir = Path(cfg.training.run_dir)
    found = []
    ckpt = cfg.checkpoint_dir
    if ckpt.is_dir():  # newest checkpoint first: the most telling item of a shortened list
        entries = sorted((e.name for e in ckpt.iterdir() if _CHECKPOINT_ENTRY.match(e.name)), reverse=True)
        found += [f"{_shown(ckpt, run_dir)}/{name}" for name in entries if name != "latest"]
    return found + [name for name in RUN_FILES if (run_dir / name).exists()]


def check_start(cfg: RunConfig, *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunDirError` when this invocation would overwrite another run without being told to."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"training.run_dir ({cfg.training.run_dir}), --overwrite deletes it and starts again")
    if resume or overwrite:
        return
    found = existing_run(cfg)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise RunDirError(
            f"training.run_dir {cfg.training.run_dir} already holds a run ({shown}). Pass --resume to continue "
            "it, --overwrite to delete it and start again, or choose another directory with "
            "--set training.run_dir=<dir>")


def clear_run(cfg: RunConfig) -> list[Path]:
    """Delete what a previous run left (:func:`existing_run`; other files stay); return the deleted paths."""
    run_dir = Path(cfg.training.run_dir)
    removed = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file():
            path.unlink()
            removed.append(path)
    ckpt = cfg.checkpoint_dir
    if ckpt.is_dir():
        for entry in sorted(ckpt.iterdir()):
            if _CHECKPOINT_ENTRY.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
        if not any(ckpt.iterdir()):
            ckpt.rmdir()
    return removed


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at (``step`` in its ``meta.json``)."""
    return int(json.loads((path / "meta.json").read_text())["step"])


def finished_run(cfg: RunConfig) -> FinishedRun | None:
    """The finished run in ``cfg``'s directory, when its latest checkpoint already reached the last step."""
    from ..checkpoint import latest

    path = latest(cfg.checkpoint_dir) if cfg.checkpoint_dir.is_dir() else None
    if path is None:
        return None
    step = checkpoint_step(path)
    if step < (cfg.training.stop_at or cfg.training.steps):
        return None
    summary = Path(cfg.training.run_dir) / "summary.json"
    return FinishedRun(step, path, summary if _summary_step(summary) == step else None)


def finished_message(cfg: RunConfig, done: FinishedRun) -> str:
    """What ``--resume`` of the finished run ``done`` prints: its last checkpoint and step, its summary, and how to
    train further or start again."""
    last = "training.stop_at" if cfg.training.stop_at else "training.steps"
    text = (f"--resume: {cfg.training.run_dir} already finished: its latest checkpoint {done.checkpoint} is at "
            f"step {done.step} ({last} = {cfg.training.stop_at or cfg.training.steps}); nothing to train.")
    if done.summary is not None:
        text += f" Its summary is {done.summary}."
    further = "raise training.stop_at or unset it" if cfg.training.stop_at else \
        "raise training.steps (the schedule then spans the new length)"
    return text + f" To train further, {further}; to start again, use --overwrite."


def prepare(cfg: RunConfig, info: Any, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Before the job writes anything: rank 0 refuses to mix runs (:func:`check_start`), clears the old run for
    ``overwrite`` and looks for a finished run when resuming; every rank gets the outcome (collective).

    Returns the finished run's summary when ``resume`` finds one (the job then has nothing to do), else None.
    A finished run whose ``summary.json`` is missing (killed while writing it) returns None: the job resumes at
    its last step and writes the summary.
    """
    outcome: list[Any] = [None]
    if info.is_main:
        try:
            outcome[0] = ("ok", _prepare_here(cfg, resume, overwrite))
        except RunDirError as exc:
            outcome[0] = ("error", str(exc))
    if info.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise RunDirError(value)
    return value


def _prepare_here(cfg: RunConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    check_start(cfg, resume=resume, overwrite=overwrite)
    if overwrite:
        removed = clear_run(cfg)
        if removed:
            print(f"--overwrite: deleted the previous run in {cfg.training.run_dir} ({len(removed)} files and "
                  "checkpoints)", flush=True)
    done = finished_run(cfg) if resume else None
    if done is None or done.summary is None:
        return None
    print(finished_message(cfg, done), flush=True)
    return json.loads(done.summary.read_text())


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the records of ``metrics.jsonl`` with ``step <= step`` (a line cut short by a kill is dropped
    too); return how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by a kill: not a record
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def _summary_step(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shown(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run directory when inside it (``checkpoints``), else as given."""
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)
