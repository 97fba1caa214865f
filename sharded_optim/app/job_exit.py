"""How the training job ends when it does not finish: one message per mistake, and Ctrl-C as a clean stop.

*Expected* errors are the user's to fix, not bugs: a bad configuration (:class:`~sharded_optim.app.config.ConfigError`),
a checkpoint that cannot be loaded (:class:`~sharded_optim.checkpoint.CheckpointError`), a run directory that
holds another run (:class:`~sharded_optim.app.run_dir.RunDirError`).  Every rank raises them (the job makes the ranks
agree first), so printing them on every rank repeats the message N times, and a traceback only hides it: rank 0
prints each distinct message once (:func:`report_once` gathers them, so a cause seen only on rank 3 is not lost),
the process exits 2 and nothing else is printed.  Anything else is a bug and keeps its traceback.

Ctrl-C: a terminal sends SIGINT to the launcher *and* to every rank, and torchrun forwards it to the ranks once
more.  :class:`StopRequest` turns the first SIGINT into a request that the loop honours at the end of the current
step (never inside a collective or a checkpoint write), so all ranks stop together and the last checkpoint is
intact; :class:`TrainingInterrupted` carries the step.  A second SIGINT more than a second after the first (a
user pressing Ctrl-C again, not the launcher's forwarded copy) interrupts at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from ..dist import DistInfo
from .config import ConfigError
from .run_dir import RunDirError

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
CONFIG_EXIT = 2


class TrainingInterrupted(Exception):
    """The run stopped at ``step`` because of SIGINT; ``checkpoint`` is the newest one on disk (or None)."""

    def __init__(self, step: int | None, checkpoint: Any = None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix (configuration, checkpoint, run directory): printed once without a
    traceback, exit status :data:`CONFIG_EXIT`."""
    from ..checkpoint import CheckpointError  # imported on use: the checkpoint module pulls in the optimizer

    return ConfigError, CheckpointError, RunDirError


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher); usable before the
    process group exists."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_RANKID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def report_once(exc: BaseException, info: DistInfo) -> None:
    """Print ``exc`` on rank 0 only, with any different message another rank raised; mark it reported.

    Collective when a process group exists: call it on every rank (expected errors are raised on all ranks).
    """
    messages = [str(exc)]
    if info.distributed:
        import torch.distributed as dist

        messages = [None] * info.world_size
        dist.all_gather_object(messages, str(exc))
    if info.is_main:
        distinct: dict[str, list[int]] = {}
        for rank, text in enumerate(messages):
            distinct.setdefault(text, []).append(rank)
        for text, ranks in distinct.items():
            who = "" if len(distinct) == 1 else f"rank {','.join(map(str, ranks))}: "
            print(f"error: {who}{text}", file=sys.stderr, flush=True)
    exc.reported = True  # type: ignore[attr-defined]


def print_unreported(exc: BaseException) -> None:
    """Print an expected error that :func:`report_once` did not (raised before the process group), on rank 0."""
    if not getattr(exc, "reported", False) and env_rank() == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)


def interrupted_message(exc: TrainingInterrupted, run_dir: str) -> str:
    """The line printed when SIGINT stopped the run: at which step, and the checkpoint ``--resume`` continues from (or
    that there is none yet)."""
    where = f"at step {exc.step}" if exc.step is not None else "before the first step"
    if exc.checkpoint is None:
        ckpt = "no checkpoint was written yet, so --resume would start again from step 0"
    else:
        ckpt = f"the last checkpoint is {exc.checkpoint}; continue with the same command plus --resume"
    return f"interrupted {where} (SIGINT): {ckpt} (run directory {run_dir})"


class StopRequest:
    """Context manager: while active, SIGINT requests a stop (:attr:`requested`) instead of raising at once.

    Only the main thread can own signal handlers; elsewhere (a test runner's worker thread) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested and now - self._first > 1.0:
            raise KeyboardInterrupt  # asked twice: stop now
        if not self.requested:
            self.requested, self._first = True, now

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
