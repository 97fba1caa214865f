"""``python -m sharded_optim.app.preflight [train args...]``: what the launch scripts check before starting any rank.

A mistake caught inside a distributed run costs a launcher start, a process group and N copies of the message;
caught here it is one message and exit status 2 before ``torchrun`` (or mpirun, deepspeed, srun) starts.  Checked:
the arguments, the config file and every ``--set`` (:func:`sharded_optim.app.config.load_config`), a CUDA device
when the config asks for one, and the run directory (:func:`sharded_optim.app.run_dir.check_start`: no second run
in a directory that holds one).  Exit status :data:`NOTHING_TO_DO` (3) means ``--resume`` of a finished run: the
launch script says so and exits 0 without starting the job.  The job repeats the run-directory checks itself
(on rank 0), so launching it without these scripts is just as safe, only noisier.
"""
from __future__ import annotations

import argparse
import sys

from ..dist import strip_launcher_args
from .config import ConfigError, load_config
from .job_exit import CONFIG_EXIT
from .run_dir import RunDirError, check_start, finished_message, finished_run

NOTHING_TO_DO = 3


def main(argv: list[str] | None = None) -> int:
    """Check the training arguments, config, CUDA device and run directory; return 0 to launch, :data:`CONFIG_EXIT`
    after printing what is wrong, or :data:`NOTHING_TO_DO` when ``--resume`` finds the run finished."""
    from .train import add_arguments

    parser = argparse.ArgumentParser(prog="python -m sharded_optim.app.train", allow_abbrev=False,
                                     description="check a training job's arguments before launching it")
    add_arguments(parser)
    args = parser.parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.training.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(["training.device: got 'cuda' but no CUDA device is available here; "
                                   "allowed here: 'cpu' or 'auto'"], args.config)
        check_start(cfg, resume=args.resume, overwrite=args.overwrite)
        done = finished_run(cfg) if args.resume else None
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return CONFIG_EXIT
    if done is not None and done.summary is not None:
        print(finished_message(cfg, done), flush=True)
        return NOTHING_TO_DO
    return 0


if __name__ == "__main__":
    sys.exit(main())
