"""A small sharded training job for the fault tests, run under ``torchrun --max-restarts 1``.

It checkpoints every ``--every`` steps (keeping the last two) and resumes from the latest checkpoint when there
is one.  With ``--kill-at K`` rank 1 SIGKILLs itself right after step K, in the first attempt only
(``TORCHELASTIC_RESTART_COUNT == 0``), so the elastic agent restarts both ranks and they resume.  Data comes from
the global torch RNG, so an identical result also needs the RNG state restored.  Rank 0 writes ``final.pt``
(model and full optimizer state, tensors only); every attempt leaves ``attempt_<restart>_rank<r>`` behind.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sharded_optim import checkpoint  # noqa: E402
from tests.support import ckpt_scenarios as S  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--config", default="nadam_z2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = Path(args.out)
    (out / f"attempt_{attempt}_rank{rank}").touch()
    model, opt = S.build(args.config, seed=0)
    torch.manual_seed(100 + rank)
    start = 0
    found = checkpoint.latest(out / "ckpt")
    if found is not None:
        start = checkpoint.load(found, model, opt)["step"]
        print(f"rank {rank} attempt {attempt}: resumed from {found.name} at step {start}", flush=True)
    for step in range(start + 1, args.steps + 1):
        S.train(model, opt, range(step, step + 1), rank, use_global_rng=True)
        if step % args.every == 0:
            checkpoint.save(out / "ckpt" / f"step_{step:04d}", model, opt, step=step, keep_last=2)
        if step == args.kill_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    sd = S.inner(opt).state_dict()
    if rank == 0:
        torch.save({"model": model.state_dict(), "state": sd["state"], "attempt": attempt}, out / "final.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
