"""Data-parallel step benchmark on CPU (issues 3, 21): ours (ZeRO-1, ZeRO-2) vs torch ZeroRedundancyOptimizer over
DDP vs DeepSpeed ZeRO-1/2, and under FSDP2 ours vs torch's fused AdamW on the same DTensor parameters; same model,
data, world size and backend (gloo).

One command, several launches (each ``world`` processes on this machine, spawned here):

* ``time`` (2 ranks, 1 torch thread each): every configuration is built side by side in the same processes and
  the training steps are interleaved (config A, B, C, ..., rotated each round).  Each timed step starts after a
  barrier; a step's time is the slowest rank's.  Reported: the whole step (forward + backward + optimizer) and
  its optimizer part (``step()``: for ours the wait for the reductions started by backward hooks, the fused
  update and the all-gather; for ZeroRedundancyOptimizer the local update and the parameter broadcast, DDP's
  all-reduce being inside backward; for DeepSpeed ``engine.step()``).
* ``memory`` at N = 1, 2, 4 ranks (4 oversubscribes the 2 cores; fine for memory): configurations one after
  the other, each built, stepped twice and torn down.  Exact optimizer-state bytes per rank (the Adam moments
  and step counters the optimizer holds), the extra fp32 master copy each keeps, and the RSS growth (current and
  peak, from /proc) from building the optimizer to after two steps, per rank.  glibc is told to mmap every
  allocation over 128 KiB in these launches so freed tensors leave the RSS.

Each library is warmed up on a tiny model first (our kernel compile, DeepSpeed's extension load), so one-off
process costs are not charged to whichever configuration happens to come first.

Run from the repository root:  ``python bench/zero_bench.py``  (``--smoke`` for a tiny, fast run).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import environment, md_table, plot_path, spread, write_json, write_markdown

CONFIGS = ("ours-zero1", "ours-zero2", "torch-zero+ddp", "deepspeed-zero1", "deepspeed-zero2", "fsdp2-ours",
           "fsdp2-torch-fused")
PEERS = ("torch-zero+ddp", "deepspeed-zero1", "deepspeed-zero2")
# FSDP2 rows are compared with each other only (same DTensor parameters, FSDP2's own communication): issue 21
FSDP2_PAIR = ("fsdp2-ours", "fsdp2-torch-fused")
# step time targets against the best ZeRO peer: issue 3's (<= 0.8x) and issue 21's (<= 1.0x); FSDP2 (issue 21)
ZERO_TARGETS = (0.8, 1.0)
FSDP2_TARGET = 0.95
BUCKET_MB = 25.0  # gradient-reduction / all-gather bucket of every system (DDP's default)
LR, WD = 1e-3, 1e-2


# ------------------------------------------------------------------------------------------- model and data
def make_model(hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
    return torch.nn.Sequential(*mods)


def batch(rank: int, size: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)  # data parallel: every rank its own batch
    return torch.randn(size, hidden, generator=gen), torch.randn(size, hidden, generator=gen)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _our_memory(opt) -> dict:
    """State, master and gradient-shard bytes a ShardedOptimizer holds on this rank (its memory_report)."""
    r = opt.memory_report()
    return {"state_bytes": r["state_bytes"], "master_bytes": r["by_key"].get("master", 0),
            "grad_shard_bytes": r["by_key"].get("grad_shard", 0)}


# ------------------------------------------------------------------------------------------- configurations
class _ModelAndOptimizer:
    """A plain training step: ``self.model`` forward/backward, then ``self.opt`` step and zero_grad."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer

    def forward_backward(self, x, y) -> None:
        torch.nn.functional.mse_loss(self.model(x), y).backward()

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Ours(_ModelAndOptimizer):
    def __init__(self, stage: int, hidden: int, layers: int):
        from sharded_optim.optimizer import ShardedOptimizer
        self.model = make_model(hidden, layers)
        self.opt = ShardedOptimizer(self.model.parameters(), algorithm="adamw", lr=LR, weight_decay=WD,
                                    zero_stage=stage, bucket_mb=BUCKET_MB, kernel="compiled")

    def memory(self) -> dict:
        return _our_memory(self.opt)


class TorchZero(_ModelAndOptimizer):
    """torch.distributed.optim.ZeroRedundancyOptimizer(torch.optim.AdamW, fused=True) over DDP."""

    def __init__(self, hidden: int, layers: int):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.model = DDP(make_model(hidden, layers), bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=True)
        self.opt = ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR,
                                           weight_decay=WD, fused=True)

    def memory(self) -> dict:
        return {"state_bytes": _tensor_bytes(list(self.opt.optim.state.values())), "master_bytes": 0,
                "grad_shard_bytes": 0}


class FSDP2(_ModelAndOptimizer):
    """``fully_shard`` on every Linear and on the root (FSDP2 owns the communication), then ours (``zero_stage=0``
    on the DTensor shards) or torch ``AdamW(fused=True)`` on the same DTensor parameters."""

    def __init__(self, ours: bool, hidden: int, layers: int):
        from torch.distributed.fsdp import fully_shard
        model = make_model(hidden, layers)
        for module in model:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module)
        self.model = fully_shard(model)
        if ours:
            from sharded_optim.optimizer import ShardedOptimizer
            self.opt = ShardedOptimizer(self.model.parameters(), algorithm="adamw", lr=LR, weight_decay=WD,
                                        zero_stage=0, kernel="compiled")
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WD, fused=True)

    def memory(self) -> dict:
        if hasattr(self.opt, "memory_report"):
            return _our_memory(self.opt)
        local = [t.to_local() if hasattr(t, "to_local") else t for st in self.opt.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor)]
        return {"state_bytes": _tensor_bytes(local), "master_bytes": 0, "grad_shard_bytes": 0}


class DeepSpeedZero:
    """deepspeed.initialize(model, optimizer=torch.optim.AdamW(fused=True)) with ZeRO stage 1 or 2, fp32."""

    def __init__(self, stage: int, hidden: int, layers: int, micro_batch: int):
        import deepspeed
        model = make_model(hidden, layers)
        client = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
        bucket = int(BUCKET_MB * 2**20 / 4)  # DeepSpeed counts bucket sizes in elements
        config = {
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # 0.19.8 clips to 1.0 unless told otherwise; nobody else clips
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_scatter": True, "reduce_bucket_size": bucket,
                                  "allgather_bucket_size": bucket},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }
        self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)

    def forward_backward(self, x, y) -> None:
        loss = torch.nn.functional.mse_loss(self.engine(x), y)
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        self.engine.step()

    def memory(self) -> dict:
        zero = self.engine.optimizer
        return {"state_bytes": _tensor_bytes(list(zero.optimizer.state.values())),
                "master_bytes": _tensor_bytes(list(zero.single_partition_of_fp32_groups)),
                "grad_shard_bytes": 0}


def build(name: str, hidden: int, layers: int, micro_batch: int):
    if name == "ours-zero1":
        return Ours(1, hidden, layers)
    if name == "ours-zero2":
        return Ours(2, hidden, layers)
    if name == "torch-zero+ddp":
        return TorchZero(hidden, layers)
    if name == "deepspeed-zero1":
        return DeepSpeedZero(1, hidden, layers, micro_batch)
    if name == "deepspeed-zero2":
        return DeepSpeedZero(2, hidden, layers, micro_batch)
    if name in FSDP2_PAIR:
        return FSDP2(name == "fsdp2-ours", hidden, layers)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------- per-rank work
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def timed_step(cfg, x, y) -> tuple[float, float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    cfg.forward_backward(x, y)
    t1 = time.perf_counter()
    cfg.optimizer_step()
    t2 = time.perf_counter()
    total, fb, opt = _max_over_ranks([t2 - t0, t1 - t0, t2 - t1])
    return total, fb, opt


def worker(rank: int, world: int, mode: str, port: int, out: str, a: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, a["cores"] // world))
    dist.init_process_group("gloo")
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    configs = a["configs"]
    x, y = batch(rank, a["batch"], a["hidden"])
    # warm every library up on a tiny model: compile our kernel, load DeepSpeed's extension, fused AdamW
    tx, ty = batch(rank, a["batch"], 64)
    for name in configs:
        cfg = build(name, 64, 2, a["batch"])
        for _ in range(2):
            cfg.forward_backward(tx, ty)
            cfg.optimizer_step()
        del cfg
        gc.collect()
    result: dict = {"world": world, "mode": mode, "threads_per_rank": torch.get_num_threads()}
    if mode == "time":
        cfgs = {name: build(name, a["hidden"], a["layers"], a["batch"]) for name in configs}
        for _ in range(a["warmup"]):
            for cfg in cfgs.values():
                timed_step(cfg, x, y)
        times: dict[str, dict[str, list[float]]] = {n: {"step": [], "fwd_bwd": [], "optimizer": []} for n in cfgs}
        names = list(cfgs)
        for r in range(a["steps"]):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                total, fb, opt = timed_step(cfgs[name], x, y)
                times[name]["step"].append(total)
                times[name]["fwd_bwd"].append(fb)
                times[name]["optimizer"].append(opt)
        result["times"] = times
        # the model must have trained the same way everywhere: compare the first layer's weights
        ref = None
        checks = {}
        for name, cfg in cfgs.items():
            model = cfg.engine.module if hasattr(cfg, "engine") else getattr(cfg.model, "module", cfg.model)
            w = model[0].weight.detach()
            w = w.full_tensor() if hasattr(w, "full_tensor") else w.clone()   # FSDP2: a collective, every rank
            ref = w if ref is None else ref
            checks[name] = float((w - ref).abs().max())
        result["weight_max_abs_diff_vs_first"] = checks
        result["memory"] = {n: _gather(c.memory()) for n, c in cfgs.items()}
    else:
        mem: dict[str, list] = {}
        for name in configs:
            gc.collect()
            dist.barrier()
            rss0 = _proc_kib("VmRSS")
            _reset_peak_rss()
            cfg = build(name, a["hidden"], a["layers"], a["batch"])
            for _ in range(2):
                cfg.forward_backward(x, y)
                cfg.optimizer_step()
            rss1 = _proc_kib("VmRSS")
            peak = _proc_kib("VmHWM")
            entry = dict(cfg.memory(), rss_growth_bytes=(rss1 - rss0) * 1024, peak_rss_growth_bytes=(peak - rss0) * 1024)
            mem[name] = _gather(entry)
            del cfg
            gc.collect()
        result["memory"] = mem
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, a: dict, env: dict | None = None) -> dict:
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            t0 = time.perf_counter()
            mp.start_processes(worker, args=(world, mode, _free_port(), out, a), nprocs=world, start_method="spawn")
            result = json.loads(Path(out).read_text())
            result["launch_seconds"] = time.perf_counter() - t0
            return result
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------------------------- report
def summarize(timing: dict, memory: dict[int, dict], a: dict) -> dict:
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in timing["times"].items()}
    peers = [p for p in PEERS if p in med]
    best_peer = min(peers, key=lambda p: med[p]["step"]) if peers else None
    rows = []
    for n in timing["times"]:
        mem2 = timing["memory"][n]
        row = {"config": n, "step_s": spread(timing["times"][n]["step"]),
               "fwd_bwd_s": spread(timing["times"][n]["fwd_bwd"]),
               "optimizer_s": spread(timing["times"][n]["optimizer"]),
               "state_bytes_per_rank": [m["state_bytes"] for m in mem2],
               "master_bytes_per_rank": [m["master_bytes"] for m in mem2]}
        if best_peer:
            row["step_vs_best_peer"] = med[n]["step"] / med[best_peer]["step"]
            row["optimizer_vs_best_peer"] = med[n]["optimizer"] / med[best_peer]["optimizer"]
        rows.append(row)
    best_state_peer = min((max(timing["memory"][p][r]["state_bytes"] for r in range(len(timing["memory"][p])))
                           for p in peers), default=None)
    targets = {}
    for n in ("ours-zero1", "ours-zero2"):
        if n in med and best_peer:
            mine = max(m["state_bytes"] for m in timing["memory"][n])
            ratio = med[n]["step"] / med[best_peer]["step"]
            targets[n] = {"peer": best_peer, "step_vs_peer": ratio,
                          "step_met": {f"<= {t:g}x": ratio <= t for t in ZERO_TARGETS},
                          "state_bytes_max_rank": mine, "peer_state_bytes_max_rank": best_state_peer,
                          "state_met": mine <= best_state_peer}
    ours, peer = FSDP2_PAIR
    if ours in med and peer in med:
        ratio = med[ours]["step"] / med[peer]["step"]
        mine = max(m["state_bytes"] for m in timing["memory"][ours])
        theirs = max(m["state_bytes"] for m in timing["memory"][peer])
        targets[ours] = {"peer": peer, "step_vs_peer": ratio,
                         "step_met": {f"<= {FSDP2_TARGET:g}x": ratio <= FSDP2_TARGET},
                         "state_bytes_max_rank": mine, "peer_state_bytes_max_rank": theirs,
                         "state_met": mine <= theirs}
    by_world = {}
    for w, res in sorted(memory.items()):
        by_world[w] = {n: {"state_bytes_per_rank": [m["state_bytes"] for m in lst],
                           "master_bytes_per_rank": [m["master_bytes"] for m in lst],
                           "grad_shard_bytes_per_rank": [m["grad_shard_bytes"] for m in lst],
                           "rss_growth_bytes_per_rank": [m["rss_growth_bytes"] for m in lst],
                           "peak_rss_growth_bytes_per_rank": [m["peak_rss_growth_bytes"] for m in lst]}
                       for n, lst in res["memory"].items()}
    return {"best_peer_by_step_time": best_peer, "rows": rows, "targets": targets, "memory_by_world": by_world,
            "weight_max_abs_diff_vs_first": timing.get("weight_max_abs_diff_vs_first")}


def markdown(payload: dict) -> str:
    s = payload["summary"]
    a = payload["args"]
    env = payload["environment"]
    mib = 2**20
    out = ["# Data-parallel step benchmark (CPU, gloo)\n",
           f"`{payload['command']}`: MLP {a['layers']} x Linear({a['hidden']}, {a['hidden']}) + GELU "
           f"({payload['params']:,} parameters, fp32), micro-batch {a['batch']} per rank, 2 ranks x "
           f"{payload['timing_threads_per_rank']} torch thread on {env['logical_cpus']} logical CPUs "
           f"({env['cpu']}), torch {env['torch']}, deepspeed {payload['deepspeed']}. AdamW lr={LR} wd={WD} "
           f"everywhere, {BUCKET_MB:g} MiB buckets everywhere. {a['steps']} interleaved steps per configuration "
           f"after {a['warmup']} warm-up steps; medians; a step's time is the slowest rank's.\n",
           "## Step time (2 ranks)\n"]
    rows = []
    for r in s["rows"]:
        rows.append([r["config"], r["step_s"]["median"] * 1e3, r["fwd_bwd_s"]["median"] * 1e3,
                     r["optimizer_s"]["median"] * 1e3, f"{r.get('step_vs_best_peer', float('nan')):.2f}x",
                     f"{r.get('optimizer_vs_best_peer', float('nan')):.2f}x",
                     f"{max(r['state_bytes_per_rank']) / mib:.1f}", f"{max(r['master_bytes_per_rank']) / mib:.1f}"])
    out.append(md_table(["config", "step ms", "fwd+bwd ms", "optimizer ms", "step / best peer",
                         "optimizer / best peer", "state MiB (max rank)", "fp32 master MiB (max rank)"], rows))
    out.append(f"\nBest peer by step time: **{s['best_peer_by_step_time']}**.  'optimizer' is the `step()` call "
               "(see the script docstring for what each system does there: where the gradient reduction happens "
               "differs).  State = optimizer moments + step counters held per rank, exact tensor bytes.\n")
    out.append("## Targets\n")
    trows = []
    for n, t in s["targets"].items():
        met = ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in t["step_met"].items())
        trows.append([n, t["peer"], f"{t['step_vs_peer']:.2f}x", met,
                      f"{t['state_bytes_max_rank'] / mib:.1f} vs {t['peer_state_bytes_max_rank'] / mib:.1f}",
                      "met" if t["state_met"] else "MISSED"])
    out.append(md_table(["config", "peer", "step time vs peer", "targets", "state MiB vs peer (max rank)", ""],
                        trows))
    out.append("\nZeRO targets: <= 0.8x the best ZeRO peer (issue 3), <= 1.0x (issue 21); FSDP2: ours <= 0.95x torch "
               "fused AdamW on the same DTensor parameters (issue 21).  'step / best peer' in the table above compares "
               "every row with the best ZeRO peer; FSDP2 rows are for each other.\n")
    out.append("\n## Per-rank optimizer memory vs world size N\n")
    mrows = []
    for w, cfgs in s["memory_by_world"].items():
        for n, m in cfgs.items():
            mrows.append([w, n, f"{max(m['state_bytes_per_rank']) / mib:.1f}",
                          f"{min(m['state_bytes_per_rank']) / mib:.1f}",
                          f"{max(m['master_bytes_per_rank']) / mib:.1f}",
                          f"{max(m['grad_shard_bytes_per_rank']) / mib:.1f}",
                          f"{max(m['rss_growth_bytes_per_rank']) / mib:.0f}",
                          f"{max(m['peak_rss_growth_bytes_per_rank']) / mib:.0f}"])
    out.append(md_table(["N", "config", "state MiB (max rank)", "state MiB (min rank)", "fp32 master MiB",
                         "grad shard MiB", "RSS growth MiB", "peak RSS growth MiB"], mrows))
    out.append("\nRSS growth: from before building the optimizer (and the model) to after two steps, max over "
               "ranks; peak: VmHWM reset before building.  Model parameters (fp32) are "
               f"{payload['params'] * 4 / mib:.0f} MiB of every configuration's RSS growth.\n")
    d = s.get("weight_max_abs_diff_vs_first")
    if d:
        out.append("Same training everywhere: max |w - w(first config)| of layer 0 after all steps: " +
                   ", ".join(f"{k} {v:.2g}" for k, v in d.items()) + ".\n")
    return "\n".join(out)


def plot(payload: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = payload["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["config"] for r in s["rows"]]
    fb = [r["fwd_bwd_s"]["median"] * 1e3 for r in s["rows"]]
    op = [r["optimizer_s"]["median"] * 1e3 for r in s["rows"]]
    ax1.bar(names, fb, label="forward + backward")
    ax1.bar(names, op, bottom=fb, label="optimizer step()")
    ax1.set_ylabel("ms per training step (median, slowest rank)")
    ax1.set_title("2 gloo ranks, step time")
    ax1.tick_params(axis="x", rotation=20)
    ax1.legend()
    worlds = sorted(s["memory_by_world"], key=int)
    for n in names:
        ys = [max(s["memory_by_world"][w][n]["state_bytes_per_rank"]) / 2**20 for w in worlds
              if n in s["memory_by_world"][w]]
        ax2.plot([int(w) for w in worlds][:len(ys)], ys, marker="o", label=n)
    ax2.set_xlabel("ranks N")
    ax2.set_xticks([int(w) for w in worlds])
    ax2.set_ylabel("optimizer state MiB per rank (max rank)")
    ax2.set_title("per-rank optimizer state vs N")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,4", help="world sizes of the memory launches")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="torch threads split over the ranks")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the plumbing only")
    ap.add_argument("--out", default="zero_bench")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.steps, args.warmup = 256, 2, 2, 1
        if args.out == "zero_bench":
            args.out = "smoke_zero_bench"
    a = {k: getattr(args, k) for k in ("hidden", "layers", "batch", "steps", "warmup", "cores")}
    a["configs"] = args.configs.split(",")
    import deepspeed
    t0 = time.perf_counter()
    timing = launch(2, "time", a)
    print(f"timing launch: {timing['launch_seconds']:.0f} s", flush=True)
    memory = {}
    for w in (int(x) for x in args.worlds.split(",")):
        memory[w] = launch(w, "memory", a, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        print(f"memory launch N={w}: {memory[w]['launch_seconds']:.0f} s", flush=True)
    params = sum(p.numel() for p in make_model(args.hidden, args.layers).parameters())
    command = "python bench/zero_bench.py" + ("" if not args.smoke else " --smoke") + "".join(
        f" --{k} {getattr(args, k)}" for k in ("hidden", "layers", "batch", "steps", "warmup", "worlds", "configs")
        if str(getattr(args, k)) != str(ap.get_default(k)) and not args.smoke)
    payload = {"benchmark": "zero_bench", "command": command, "args": a, "params": params,
               "deepspeed": deepspeed.__version__, "environment": environment(),
               "timing_threads_per_rank": timing["threads_per_rank"], "total_seconds": time.perf_counter() - t0,
               "summary": summarize(timing, memory, a), "raw": {"timing": timing, "memory": memory}}
    write_json(args.out, payload)
    write_markdown(args.out, markdown(payload))
    plot(payload, plot_path(args.out))
    print(markdown(payload))


if __name__ == "__main__":
    sys.exit(main())
