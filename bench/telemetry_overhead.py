"""Telemetry overhead: training-step time with telemetry off, on without statistics, statistics every step,
and statistics at the default interval.

One run of ``--world`` gloo ranks trains one MLP with one ShardedOptimizer; the modes alternate in ``--rounds``
rounds, one block of ``--steps`` steps per mode and round, in an order rotated each round, so drift of the machine
hits every mode alike.  Telemetry on means the real thing: ``telemetry.start()`` (HTTP server, report hook,
statistics every N steps) and a scraper thread fetching ``/metrics`` once a second, as Prometheus would.

Steady state inside every block: sharded statistics finish one step late (the read-only pass and the all-reduce
of step t run in step t + 1), so the first step of a block is an untimed lead-in that absorbs what the previous
block left over, and, the block length being a multiple of the default interval, the default-interval mode's
statistics steps sit at timed positions 1, 11, ... with their second half inside the block too.  (That puts 2
statistics steps among 19 timed ones, 5% more than the steady 1 in 10: a slight overestimate, never an
underestimate.)

Reported per mode: mean and median of a whole training step (forward, backward, ``optimizer.step()``) and of
``optimizer.step()`` alone, and the ratio of the mode's mean to "off"'s over all timed steps, with a 95% bootstrap
interval that resamples whole rounds (each round holds one block of every mode, so the pairing is kept).

    python bench/telemetry_overhead.py            # writes bench/results/telemetry_overhead.{json,md,png}
    python bench/telemetry_overhead.py --workload gpt --layers 4 --hidden 256 --batch 8 --seq-len 128 --rounds 12
                                                  # writes bench/results/telemetry_overhead_gpt.*
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sharded_optim import ShardedOptimizer, telemetry  # noqa: E402
from sharded_optim.config import ModelConfig  # noqa: E402
from sharded_optim.model import build_model, num_parameters  # noqa: E402

RESULTS = REPO / "bench" / "results"


class _Scraper:
    """Fetch /metrics once a second on a thread, like a Prometheus scrape of this rank."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(self._url, timeout=5) as resp:
                resp.read()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _workload(args: argparse.Namespace, gen: torch.Generator) -> tuple[torch.nn.Module, Callable[[], Tensor]]:
    """The model and a closure computing the loss of a fresh random batch.

    ``mlp`` (the default) is deliberately optimizer-heavy: optimizer.step() is about half of a training step, so
    the statistics' cost shows at its largest.  ``gpt`` is the project's transformer with ``--batch`` sequences
    of ``--seq-len`` tokens, where forward and backward dominate as they do in real training."""
    if args.workload == "gpt":
        cfg = ModelConfig(seq_len=args.seq_len, d_model=args.hidden, n_layers=args.layers, n_heads=4)
        model = build_model(cfg)

        def gpt_loss() -> Tensor:
            idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
            return model(idx[:, :-1], idx[:, 1:])[1]
        return model, gpt_loss
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU()]
    mlp = torch.nn.Sequential(*layers)

    def mlp_loss() -> Tensor:
        return mlp(torch.randn(args.batch, args.hidden, generator=gen)).pow(2).mean()
    return mlp, mlp_loss


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    model, loss_of_batch = _workload(args, torch.Generator().manual_seed(rank))
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=1e-4, kernel=args.kernel)
    # mode -> statistics interval with telemetry on (None: off).  "exporter_only" isolates the report hook,
    # HTTP server and scrapes from the statistics pass.
    modes: dict[str, int | None] = {"off": None, "exporter_only": 0, "interval_1": 1,
                                    f"interval_{args.default_interval}": args.default_interval}
    step_t: dict[str, list[float]] = {m: [] for m in modes}
    opt_t: dict[str, list[float]] = {m: [] for m in modes}

    def run(mode: str, steps: int, record: bool) -> None:
        interval = modes[mode]
        tel = scraper = None
        if interval is not None:
            tel = telemetry.start(opt, base_port=0, run_id="bench", stats_interval=interval)
            scraper = _Scraper(tel.port)
        else:
            opt.stats_interval = 0
        dist.barrier()
        for i in range(steps):
            t0 = time.perf_counter()
            loss_of_batch().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad()
            if record and i > 0:  # step 0: the lead-in (see the module docstring)
                step_t[mode].append(t2 - t0)
                opt_t[mode].append(t2 - t1)
        dist.barrier()
        if tel is not None and scraper is not None:
            scraper.stop()
            tel.stop()

    for mode in modes:  # warm-up: compile every kernel variant (with and without statistics)
        run(mode, args.warmup, record=False)
    # align the step counter: a block's first timed step (its second step) is a default-interval statistics step
    run("off", (-(opt.steps_attempted + 2)) % args.default_interval, record=False)
    order = list(modes)
    for r in range(args.rounds):  # rotate the order so that no mode always follows the same one
        for mode in order[r % len(order):] + order[:r % len(order)]:
            run(mode, args.steps, record=True)
    if rank == 0:
        Path(out).write_text(json.dumps({"step": step_t, "optimizer_step": opt_t,
                                         "parameters": num_parameters(model)}))
    dist.destroy_process_group()


def _summarise(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, object]:
    params = raw["parameters"]
    out: dict[str, object] = {
        "config": {**vars(args), "parameters": params, "torch": torch.__version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": "gloo (CPU)"},
        "modes": {},
    }
    timed = args.steps - 1
    for mode in raw["step"]:
        stats: dict[str, Any] = {"samples": len(raw["step"][mode])}
        for key in ("step", "optimizer_step"):
            xs = raw[key][mode]
            stats[f"{key}_ms_mean"] = statistics.fmean(xs) * 1e3
            stats[f"{key}_ms_median"] = statistics.median(xs) * 1e3
            # Ratio of means over every timed step (what a whole training run would take longer), with a paired
            # bootstrap over rounds: a per-round ratio of 10-step means has a spread of about +-13% on this
            # machine, so a median of those ratios moved by +-3% between runs.
            per_round = [[sum(raw[key][m][r * timed:(r + 1) * timed]) for r in range(args.rounds)]
                         for m in (mode, "off")]
            stats[f"{key}_ratio"] = sum(per_round[0]) / sum(per_round[1])
            stats[f"{key}_ratio_ci95"] = _bootstrap_ci(per_round[0], per_round[1])
        out["modes"][mode] = stats
    # Every timed step's time, for re-analysis (per mode, in run order: round after round).
    out["samples_ms"] = {key: {mode: [round(x * 1e3, 3) for x in xs] for mode, xs in raw[key].items()}
                         for key in ("step", "optimizer_step")}
    return out


def _bootstrap_ci(mode_sums: list[float], off_sums: list[float], resamples: int = 4000) -> list[float]:
    """95% percentile interval of sum(mode)/sum(off) over rounds drawn with replacement (seeded: reproducible)."""
    rng = random.Random(0)
    n = len(mode_sums)
    ratios = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(mode_sums[i] for i in pick) / sum(off_sums[i] for i in pick))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def _stem(args: argparse.Namespace) -> str:
    return "telemetry_overhead" if args.workload == "mlp" else f"telemetry_overhead_{args.workload}"


def _write(summary: dict[str, object], raw: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    cfg = summary["config"]
    model = (f"MLP {cfg['layers']}x{cfg['hidden']}, batch {cfg['batch']}" if cfg["workload"] == "mlp" else
             f"GPT {cfg['layers']} layers x d_model {cfg['hidden']}, batch {cfg['batch']} x {cfg['seq_len']} tokens")
    lines = ["# Telemetry overhead", "",
             f"`python bench/telemetry_overhead.py {_flags(cfg)}` — "
             f"{cfg['world']} gloo ranks, {model} ({cfg['parameters'] / 1e6:.1f}M parameters), adamw, "
             f"kernel {cfg['kernel']}, {cfg['rounds']} rounds x {cfg['steps']} steps per mode (modes back to back in "
             f"each round, order rotated), "
             f"{cfg['machine']}, torch {cfg['torch']}, 1-min load average before/after "
             f"{cfg['loadavg_1min_before_after']}. Rank 0; the first step of every block is an untimed lead-in "
             f"({cfg['steps'] - 1} timed steps per block). Ratio: mean over all timed steps / mean of \"off\", with "
             f"a 95% bootstrap interval over rounds.", "",
             "| mode | step mean (ms) | step median (ms) | step ratio | 95% CI | optimizer.step mean (ms) | ratio | "
             "95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, s in summary["modes"].items():
        sq, oq = s["step_ratio_ci95"], s["optimizer_step_ratio_ci95"]
        lines.append(f"| {mode} | {s['step_ms_mean']:.2f} | {s['step_ms_median']:.2f} | {s['step_ratio']:.3f} | "
                     f"{sq[0]:.3f}-{sq[1]:.3f} | {s['optimizer_step_ms_mean']:.2f} | "
                     f"{s['optimizer_step_ratio']:.3f} | {oq[0]:.3f}-{oq[1]:.3f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "step", "training step"), (axes[1], "optimizer_step", "optimizer.step()")):
        modes = list(raw[key])
        ax.boxplot([[v * 1e3 for v in raw[key][m]] for m in modes], showfliers=False)
        ax.set_xticks(range(1, len(modes) + 1), modes)
        ax.set_ylabel("ms")
        ax.set_title(title)
    fig.suptitle(f"Telemetry overhead, {summary['config']['workload']} workload (rank 0)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=100)


def _flags(cfg: dict[str, Any]) -> str:
    """The command-line flags that reproduce a run (defaults left out)."""
    flags = f"--rounds {cfg['rounds']}"
    if cfg["workload"] != "mlp":
        flags = (f"--workload {cfg['workload']} --layers {cfg['layers']} --hidden {cfg['hidden']} "
                 f"--batch {cfg['batch']} --seq-len {cfg['seq_len']} {flags}")
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64, help="rows (mlp) or sequences (gpt) per rank")
    ap.add_argument("--workload", default="mlp", choices=["mlp", "gpt"])
    ap.add_argument("--seq-len", type=int, default=128, help="gpt: tokens per sequence")
    ap.add_argument("--kernel", default="auto", choices=["auto", "compiled", "eager"])
    ap.add_argument("--steps", type=int, default=20,
                    help="steps per mode and round, the first an untimed lead-in; a multiple of --default-interval")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--default-interval", type=int, default=telemetry.DEFAULT_STATS_INTERVAL)
    args = ap.parse_args()
    if args.steps < 2 or args.steps % args.default_interval:
        ap.error(f"--steps must be a multiple of --default-interval ({args.default_interval}) and >= 2, "
                 f"got {args.steps}")
    with socket.socket() as s:  # a free loopback port for the process-group rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw_path = RESULTS / ".telemetry_overhead_raw.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    mp.start_processes(_worker, args=(args, port, str(raw_path)), nprocs=args.world, start_method="spawn")
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()
    summary = _summarise(raw, args)
    # Other work on the machine shifts every mode alike (interleaving) but widens the noise: record it.
    summary["config"]["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    _write(summary, raw, _stem(args))
    print((RESULTS / f"{_stem(args)}.md").read_text())


if __name__ == "__main__":
    main()
