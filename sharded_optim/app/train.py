"""The main training job: a small byte-level GPT trained with :class:`sharded_optim.ShardedOptimizer`.

Run it under any launcher (each rank runs this same file)::

    torchrun --nproc_per_node 2 -m sharded_optim.app.train --config configs/quickstart.yaml
    mpirun -np 2 python -m sharded_optim.app.train --config configs/quickstart.yaml
    deepspeed --num_gpus 2 --master_port 29600 --module sharded_optim.app.train --config configs/quickstart.yaml
    python -m sharded_optim.app.train --config configs/quickstart.yaml --set training.steps=50   # one process

The model is replicated; the optimizer shards its state and reduces the gradients itself (ZeRO-1/2), so
there is no DDP wrapper.  Everything random is a function of ``training.seed``: the initial weights, and the
batch of every step (see :mod:`sharded_optim.app.data`), so a run is reproducible, independent of the launcher,
and resumable without saved data-loader state.

Outputs in ``training.run_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log
interval and eval), ``summary.json`` (also printed), ``final_weights.pt``, and checkpoints.  In the summary,
``initial_train_loss`` is the loss of step 1, ``final_train_loss`` the mean over the last log window (all
ranks), ``final_val_loss`` the loss on the fixed validation windows after the last step, and
``tokens_per_s`` the training throughput over the steps of this invocation (evaluation and checkpoint
time excluded, the first step's kernel compilation included); ``wall_time_s`` covers the whole invocation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from ..dist import DistInfo, cleanup, describe_timeout, init_distributed, strip_launcher_args
from . import data as data_lib
from . import run_dir as run_dir_lib
from .config import ConfigError, RunConfig, dump_config, load_config
from .job_exit import (CONFIG_EXIT, INTERRUPTED_EXIT, StopRequest, TrainingInterrupted, env_rank, expected_errors,
                       interrupted_message, print_unreported, report_once)
from .model import build_model, num_parameters, param_groups
from .train_log import emit, log, progress_bar, strict_json

# --- pieces -------------------------------------------------------------------------------------------

def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``ShardedOptimizer`` over the model's parameter groups, configured from ``cfg.optimizer``."""
    from .. import ShardedOptimizer  # imported here so `--help` and config errors need no optimizer build

    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay, o.no_decay_norm_and_bias)
    return ShardedOptimizer.from_config(groups, o, exclude=o.LOOP_FIELDS,
                                        stats_interval=cfg.telemetry.stats_interval if cfg.telemetry.enabled else 0)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """``constant``: None.  ``warmup``: linear warmup then none/linear/cosine decay to ``min_lr_ratio``.
    ``1cycle``: torch's OneCycleLR over ``training.steps`` (cycles ``betas[0]`` when ``cycle_momentum``)."""
    s, steps = cfg.schedule, cfg.training.steps
    if s.kind == "constant":
        return None
    if s.kind == "1cycle":
        return OneCycleLR(optimizer, max_lr=optimizer.defaults["lr"], total_steps=steps, pct_start=s.pct_start,
                          div_factor=s.div_factor, final_div_factor=s.final_div_factor,
                          cycle_momentum=s.cycle_momentum, base_momentum=s.base_momentum,
                          max_momentum=s.max_momentum)

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "none":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, steps - s.warmup_steps))
        shape = 1.0 - progress if s.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * shape

    return LambdaLR(optimizer, factor)


def fast_forward(scheduler: LRScheduler | None, steps: int) -> None:
    """Replay ``steps`` scheduler steps after a resume; the schedules are closed-form in the step count, so
    the learning rates (and 1cycle's betas) come out exactly as in an uninterrupted run."""
    if scheduler is None:
        return
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean over ranks of a few floats (one all_reduce)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if info.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: data_lib.ByteDataset, cfg: RunConfig, info: DistInfo,
             device: torch.device, autocast: Any) -> float:
    """Mean loss over the fixed validation windows (every rank evaluates its share)."""
    model.eval()
    batch = cfg.training.batch_size // cfg.training.grad_accum
    losses = []
    for x, y in data_lib.eval_batches(val, cfg.training.eval_batches, batch, info.rank, info.world_size):
        with autocast():
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return all_mean([sum(losses) / len(losses)], info)[0]


# --- checkpoints (format, atomic writes, `latest` pointer and pruning live in sharded_optim.checkpoint) ------

def save_checkpoint(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict) -> Path:
    """Collective: every rank writes its shard to ``<checkpoint dir>/step_<step>``; older ones are pruned."""
    from .. import checkpoint

    return checkpoint.save(cfg.checkpoint_dir / f"step_{step:08d}", model, optimizer, step=step, extra=extra,
                           keep_last=cfg.checkpoint.keep_last or None)


def latest_checkpoint(cfg: RunConfig) -> Path | None:
    """The newest complete checkpoint in ``cfg.checkpoint_dir``; None if there is none."""
    from .. import checkpoint

    return checkpoint.latest(cfg.checkpoint_dir) if cfg.checkpoint_dir.is_dir() else None


def load_checkpoint(cfg: RunConfig, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[int, dict, Path]:
    """Load the newest checkpoint that verifies (any world size), skipping damaged ones with a warning that
    names each and why (``checkpoint.fallback: false``: refuse instead); return (step, extra, its path)."""
    from .. import checkpoint

    meta = checkpoint.load(cfg.checkpoint_dir, model, optimizer, latest=True, fallback=cfg.checkpoint.fallback)
    return int(meta["step"]), meta.get("extra") or {}, Path(meta["path"])


# --- the job --------------------------------------------------------------------------------------------

def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the configured job on this rank; return the summary (identical on every rank).

    ``resume``: continue from the latest checkpoint (a finished run is left as it is and its summary returned).
    ``overwrite``: delete the previous run in ``training.run_dir`` first; without either, a run directory that
    holds a run is refused (:class:`~sharded_optim.app.run_dir.RunDirError`).  Expected errors are printed once, on
    rank 0 (see :mod:`sharded_optim.app.job_exit`); SIGINT stops at the end of a step (:class:`TrainingInterrupted`).
    """
    t_start = time.perf_counter()
    t = cfg.training
    want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["training.device: got 'cuda' but no CUDA device is available; allowed here: "
                           "'cpu' or 'auto'"])
    with StopRequest() as stop:
        info = init_distributed(backend="nccl" if want_cuda else "gloo", timeout_s=t.timeout_s,
                                num_threads=t.threads or None)
        try:
            return _train(cfg, info, resume, overwrite, want_cuda, t_start, stop)
        except (KeyboardInterrupt, TrainingInterrupted, RuntimeError) as exc:
            cleanup(barrier=False)
            if stop.requested or not isinstance(exc, RuntimeError):
                # a peer that stopped first closes its connections: on an interrupted rank that is not a fault
                step = exc.step if isinstance(exc, TrainingInterrupted) else None
                raise TrainingInterrupted(step, latest_checkpoint(cfg)) from None
            why = describe_timeout(exc, info, t.timeout_s)
            if why:
                raise RuntimeError(why) from exc
            raise
        except expected_errors() as exc:
            report_once(exc, info)
            # Every rank raised it and report_once was a collective, so every peer is alive: end as a finished
            # run does (barrier, then destroy).  Without the barrier a rank that leaves first can tear down its
            # connections while a peer is still in its last collective, and that peer aborts (SIGABRT).
            cleanup(barrier=True)
            raise
        except BaseException:
            cleanup(barrier=False)
            raise
        finally:
            cleanup()


def _train(cfg: RunConfig, info: DistInfo, resume: bool, overwrite: bool, want_cuda: bool, t_start: float,
           stop: StopRequest) -> dict[str, Any]:
    t = cfg.training
    device = torch.device("cuda", info.local_rank) if want_cuda else torch.device("cpu")
    micro_batch = t.batch_size // t.grad_accum  # sequences per micro-batch, over all ranks
    if micro_batch % info.world_size:
        raise ConfigError([f"training.batch_size: got {t.batch_size}; allowed: a multiple of grad_accum x "
                           f"world size ({t.grad_accum} x {info.world_size})"])
    finished = run_dir_lib.prepare(cfg, info, resume=resume, overwrite=overwrite)
    if finished is not None:
        return finished
    run_dir = Path(t.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    # Data: the whole corpus on every rank (it is small); batches are a function of (seed, step).
    train_ds, val_ds = data_lib.split_corpus(data_lib.read_corpus(cfg.data.path), cfg.model.seq_len,
                                             cfg.data.val_fraction)

    # Model: the same seed on every rank gives the same weights; the broadcast makes that a guarantee.
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if info.distributed:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)  # before any resume: it records the configured lr
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.precision == "bf16" \
        else contextlib.nullcontext

    # Resume from the latest checkpoint, if asked and one exists.
    start_step, history = 0, {"loss_curve": [], "val_curve": [], "tokens_seen": 0}
    if resume:
        path = latest_checkpoint(cfg)
        if path is None:
            log(info, f"--resume: no checkpoint under {cfg.checkpoint_dir}; starting from step 0")
        else:
            start_step, extra, path = load_checkpoint(cfg, model, optimizer)
            history.update({k: extra[k] for k in history if k in extra})
            fast_forward(scheduler, start_step)
            log(info, f"resumed from {path} at step {start_step}")
    if resume and info.is_main and start_step:
        dropped = run_dir_lib.truncate_metrics(run_dir / "metrics.jsonl", start_step)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} record(s) past step {start_step} (logged by the attempt "
                  "that did not reach its next checkpoint)", flush=True)

    telemetry = None
    if cfg.telemetry.enabled:
        from .. import telemetry as telemetry_lib
        telemetry = telemetry_lib.start(optimizer, base_port=cfg.telemetry.base_port, addr=cfg.telemetry.addr,
                                        stats_interval=cfg.telemetry.stats_interval,
                                        # dashboards/prometheus.yml discovers runs/targets/*.json (a file_sd
                                        # wildcard may only stand in the last path segment)
                                        targets_file=run_dir.parent / "targets" / f"{run_dir.name}.json",
                                        run_id=run_dir.name)

    n_params = num_parameters(model)
    tokens_per_step = t.batch_size * cfg.model.seq_len
    log(info, f"{info.launcher}: {info.world_size} rank(s), backend {info.backend or 'none'}, device {device}, "
              f"{torch.get_num_threads()} thread(s)/rank | model {n_params:,} params | "
              f"{cfg.optimizer.algorithm} zero_stage={cfg.optimizer.zero_stage} | "
              f"{t.steps} steps x {tokens_per_step:,} tokens")
    metrics_file = open(run_dir / "metrics.jsonl", "a" if start_step else "w") if info.is_main else None
    progress = progress_bar(info, t.steps, start_step)

    # The loop.  One optimizer step = grad_accum micro-batches; losses are averaged over ranks only when
    # logged, so steps between logs need no extra collective.
    model.train()
    window_losses: list[float] = []
    window_start = time.perf_counter()
    train_start = time.perf_counter()
    step_time = 0.0  # seconds spent in training steps (log windows): throughput excludes eval and checkpoints
    val_loss = float("nan")
    step = start_step
    last_step = t.stop_at or t.steps  # stop_at ends this invocation early; the schedule still spans t.steps
    try:
        while step < last_step:
            step_loss = 0.0
            for micro in range(t.grad_accum):
                x, y = data_lib.train_batch(train_ds, t.seed, step, micro, micro_batch, info.rank,
                                            info.world_size)
                last = micro == t.grad_accum - 1
                # Only the last micro-batch reduces gradients; the others accumulate locally.
                sync = contextlib.nullcontext() if last else optimizer.no_sync()
                with sync, autocast():
                    _, loss = model(x.to(device), y.to(device))
                    (loss / t.grad_accum).backward()
                step_loss += loss.item() / t.grad_accum
            if cfg.optimizer.grad_clip > 0:
                optimizer.clip_grad_norm_(cfg.optimizer.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            step += 1
            history["tokens_seen"] += tokens_per_step
            window_losses.append(step_loss)

            if step % t.log_interval == 0 or step == last_step or step == start_step + 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                step_time += elapsed
                loss_mean = all_mean([sum(window_losses) / len(window_losses)], info)[0]
                record = {"step": step, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"],
                          "step_s": elapsed / len(window_losses),
                          "tokens_per_s": tokens_per_step * len(window_losses) / elapsed}
                history["loss_curve"].append([step, loss_mean])
                emit(info, progress, metrics_file, record)
                window_losses, window_start = [], time.perf_counter()
            progress.update(1)

            if (t.eval_interval and step % t.eval_interval == 0) or step == last_step:
                val_loss = evaluate(model, val_ds, cfg, info, device, autocast)
                history["val_curve"].append([step, val_loss])
                emit(info, progress, metrics_file, {"step": step, "val_loss": val_loss})
                window_start = time.perf_counter()  # keep eval time out of the throughput numbers

            ck = cfg.checkpoint
            if (ck.interval and step % ck.interval == 0) or (ck.at_end and step == last_step):
                save_checkpoint(cfg, model, optimizer, step, extra=dict(history))
                window_start = time.perf_counter()
            if stop.requested:  # SIGINT: every rank got it; stop between steps, never inside a collective
                raise TrainingInterrupted(step)
        if step == start_step:  # resumed at the last step (its summary was lost): evaluate what was trained
            val_loss = evaluate(model, val_ds, cfg, info, device, autocast)
        if telemetry is not None:
            telemetry.flush()  # the last statistics step (sharded, statistics travel with the next step)
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()
        if telemetry is not None:
            telemetry.stop()
    train_time = time.perf_counter() - train_start

    steps_run = step - start_step
    curve = history["loss_curve"]
    summary = {
        "steps": step, "steps_this_run": steps_run, "resumed_from": start_step if resume else None,
        "initial_train_loss": curve[0][1] if curve else None,
        "final_train_loss": curve[-1][1] if curve else None,
        "final_val_loss": val_loss,
        "tokens_per_s": steps_run * tokens_per_step / step_time if step_time > 0 else None,
        "train_time_s": train_time, "wall_time_s": time.perf_counter() - t_start,
        "tokens_seen": history["tokens_seen"], "params": n_params, "algorithm": cfg.optimizer.algorithm,
        "zero_stage": cfg.optimizer.zero_stage, "world_size": info.world_size, "launcher": info.launcher,
        "backend": info.backend, "device": str(device), "seed": t.seed,
        "loss_curve": curve, "val_curve": history["val_curve"],
    }
    if info.is_main:
        if t.save_final_weights:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / "final_weights.pt")
        summary = strict_json(summary)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        short = {k: v for k, v in summary.items() if k not in ("loss_curve", "val_curve")}
        print("summary: " + json.dumps(short), flush=True)
    return summary


# --- command line ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's flags (shared by ``python -m sharded_optim.app.train`` and ``sharded-optim train``).

    No flag is a prefix of a torchrun option (torchrun would take it): keep it that way.
    """
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set optimizer.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the previous run in training.run_dir (its files and checkpoints) first")


def run_from_args(args: argparse.Namespace) -> int:
    """Load and validate the config, train.  Expected errors (bad config, unloadable checkpoint, a run directory
    holding another run) print one message on rank 0 and return 2; SIGINT returns 130 after saying where the
    last checkpoint is."""
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        if env_rank() == 0:
            print(interrupted_message(exc, cfg.training.run_dir), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    except expected_errors() as exc:  # raised on every rank
        print_unreported(exc)
        return CONFIG_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``python -m sharded_optim.app.train`` entry point: parse ``argv``, run the job, return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m sharded_optim.app.train", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
