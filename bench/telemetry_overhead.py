"""Telemetry overhead: training-step time with telemetry off, on without statistics, statistics every step,
and statistics at the default interval.

One run of ``--world`` gloo ranks trains one MLP with one ShardedOptimizer; the modes alternate in
``--rounds`` rounds of ``--steps`` steps (off, interval 1, default interval, off, ...), so drift of the
machine hits every mode alike.  Telemetry on means the real thing: ``telemetry.start()`` (HTTP server,
report hook, statistics every N steps) and a scraper thread fetching ``/metrics`` once a second, as
Prometheus would.  Reported: median time of a whole training step (forward, backward, ``optimizer.step()``)
and of ``optimizer.step()`` alone, per mode, and their ratios to "off".

    python bench/telemetry_overhead.py            # writes bench/results/telemetry_overhead.{json,md,png}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sharded_optim import ShardedOptimizer, telemetry  # noqa: E402

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


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=1e-4, kernel=args.kernel)
    gen = torch.Generator().manual_seed(rank)
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
        for _ in range(steps):
            x = torch.randn(args.batch, args.hidden, generator=gen)
            t0 = time.perf_counter()
            model(x).pow(2).mean().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad()
            if record:
                step_t[mode].append(t2 - t0)
                opt_t[mode].append(t2 - t1)
        dist.barrier()
        if tel is not None and scraper is not None:
            scraper.stop()
            tel.stop()

    for mode in modes:  # warm-up: compile every kernel variant (with and without statistics)
        run(mode, args.warmup, record=False)
    for _ in range(args.rounds):
        for mode in modes:
            run(mode, args.steps, record=True)
    if rank == 0:
        Path(out).write_text(json.dumps({"step": step_t, "optimizer_step": opt_t}))
    dist.destroy_process_group()


def _summarise(raw: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict[str, object]:
    params = args.layers * (args.hidden * args.hidden + args.hidden)
    out: dict[str, object] = {
        "config": {**vars(args), "parameters": params, "torch": torch.__version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": "gloo (CPU)"},
        "modes": {},
    }
    for mode in raw["step"]:
        med = statistics.median(raw["step"][mode])
        opt_med = statistics.median(raw["optimizer_step"][mode])
        out["modes"][mode] = {"step_ms_median": med * 1e3, "optimizer_step_ms_median": opt_med * 1e3,
                              "samples": len(raw["step"][mode])}
    base = out["modes"]["off"]
    for stats in out["modes"].values():
        stats["step_ratio"] = stats["step_ms_median"] / base["step_ms_median"]
        stats["optimizer_step_ratio"] = stats["optimizer_step_ms_median"] / base["optimizer_step_ms_median"]
    return out


def _write(summary: dict[str, object], raw: dict[str, dict[str, list[float]]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "telemetry_overhead.json").write_text(json.dumps(summary, indent=2) + "\n")
    cfg = summary["config"]
    lines = ["# Telemetry overhead", "",
             f"`python bench/telemetry_overhead.py` — {cfg['world']} gloo ranks, MLP {cfg['layers']}x"
             f"{cfg['hidden']} ({cfg['parameters'] / 1e6:.1f}M parameters), batch {cfg['batch']}, adamw, "
             f"kernel {cfg['kernel']}, {cfg['rounds']} interleaved rounds x {cfg['steps']} steps per mode, "
             f"{cfg['machine']}, torch {cfg['torch']}, 1-min load average before/after "
             f"{cfg['loadavg_1min_before_after']}. Medians over steps of rank 0.", "",
             "| mode | training step (ms) | ratio | optimizer.step (ms) | ratio |", "|---|---|---|---|---|"]
    for mode, s in summary["modes"].items():
        lines.append(f"| {mode} | {s['step_ms_median']:.2f} | {s['step_ratio']:.3f} | "
                     f"{s['optimizer_step_ms_median']:.2f} | {s['optimizer_step_ratio']:.3f} |")
    (RESULTS / "telemetry_overhead.md").write_text("\n".join(lines) + "\n")

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
    fig.suptitle("Telemetry overhead (rank 0)")
    fig.tight_layout()
    fig.savefig(RESULTS / "telemetry_overhead.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--kernel", default="auto", choices=["auto", "compiled", "eager"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--default-interval", type=int, default=telemetry.DEFAULT_STATS_INTERVAL)
    args = ap.parse_args()
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
    _write(summary, raw)
    print((RESULTS / "telemetry_overhead.md").read_text())


if __name__ == "__main__":
    main()
