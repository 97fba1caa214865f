"""``python -m sharded_optim.app.torchrun [torchrun args...]``: torchrun, with one line instead of a report on failure.

This is ``torch.distributed.run`` (what the ``torchrun`` command runs), called without the ``@record`` wrapper
that turns a failed rank into ~40 lines of ``ChildFailedError`` traceback and table, and a Ctrl-C into a
``SignalException`` traceback.  The ranks already said what went wrong (the training job prints expected errors
once, on rank 0, and its last checkpoint on SIGINT); this adds one line naming the rank and exit code and exits
with that code (128 + N for a signal), so scripts still see the failure.  Everything else is torchrun's.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any

REPORTED_EXIT = 2  # sharded_optim.app.job_exit.CONFIG_EXIT; not imported: that pulls in torch before torchrun parses


class _DropReportedLines(logging.Filter):
    """The agent's log lines that :func:`main`'s one line replaces: "failed (exitcode: N) local_rank: ...",
    "Received 2 death signal, shutting down workers" and one "Sending process N closing signal" per rank."""

    PREFIXES = ("failed (exitcode", "Received %s death signal", "Sending process %s closing signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _root_cause(exc: Any) -> tuple[int, Any]:
    """The failure to report: a rank that exited with :data:`REPORTED_EXIT` if any, else torchrun's first.

    Status 2 means the job itself printed an expected error (a bad configuration, an unloadable checkpoint);
    every rank raises those.  Once one rank exits, torchrun sends SIGTERM to the others, and a rank caught in its
    teardown then dies by a signal in the same second: torchrun's "first failure" (ordered by whole-second
    timestamps) may name that secondary death instead of the error the user has to fix.
    """
    reported = [rank for rank, failure in exc.failures.items() if failure.exitcode == REPORTED_EXIT]
    return (min(reported), exc.failures[min(reported)]) if reported else exc.get_first_failure()


def main(argv: list[str] | None = None) -> int:
    """Run ``torch.distributed.run`` with ``argv``; when a rank fails, print one line naming it and return its exit
    status (128 + N for signal N)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_DropReportedLines())
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = _root_cause(exc)
        code = failure.exitcode
        if code < 0:  # killed by a signal
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"torchrun: rank {rank} was killed by {name}", file=sys.stderr, flush=True)
            return 128 - code
        others = len(exc.failures) - 1
        print(f"torchrun: rank {rank} exited with status {code}"
              f"{f' ({others} other rank(s) failed too)' if others else ''}; its output is above",
              file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        print(f"torchrun: stopped by {exc.sigval.name}; the ranks were told to stop", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
