"""Telemetry overhead: training-step time with telemetry on (statistics every step, at the default interval, or
exporter only) against the same training step with telemetry off, in the same run.

Design: paired, step by step.  Every rank holds two identical models, each with its own ShardedOptimizer: a
reference that never has telemetry, and a test one whose telemetry mode changes block by block.  Steps
alternate reference, test, reference, test (the order inside a pair flips every pair), so each test step is
compared with a reference step taken a fraction of a second away.  This machine's speed drifts by +-10% over
seconds (consecutive 1.5 s blocks of identical steps correlate 0.64), which is what made block-against-block
comparisons of one model wander by +-2% between runs; a pair cancels that drift.

Modes of the test optimizer, one block of ``--pairs`` pairs each per round, in an order rotated each round:

- ``off``: no telemetry.  Test against reference with nothing different: the design's null check; its ratio
  must include 1.000, and its interval is the resolution of the benchmark.
- ``exporter_only``: ``telemetry.start`` with statistics off: report hook, HTTP server, scrapes.
- ``interval_1``: statistics every step.
- ``interval_<N>``: statistics every ``--default-interval`` steps (the library's default).

Telemetry on means the real thing: ``telemetry.start()`` (HTTP server, report hook, statistics every N steps)
and a scraper thread fetching ``/metrics`` once a second, as Prometheus would (5 s in ``dashboards/``).  Work
that a pair cannot see: serving a scrape happens on a server thread, at whatever step is running, so it lands on
reference and test steps alike.  It is measured on its own (an idle scrape's round trip, an upper bound on the
server's work) and added: ``total = paired step ratio + scrape ms per second / 1000``.

Steady state: sharded statistics finish one step late (the read-back pass and all-reduce of step t run in step
t + 1), so a block's first pair is an untimed lead-in, and the default-interval statistics steps sit at fixed
timed positions: 20/N of them among 19 timed steps (N = 20: 1 in 19), 5% more than the steady 1 in N, an
overestimate.

The default interval's overhead is small against the per-step noise, so it is also composed from parts measured
more precisely: the test optimizer's per-step report time (``_report``: building the StepReport and running the
exporter hook, timed around the call) on exporter-only steps, plus the paired extra cost of a statistics step
(interval 1) divided by N, plus the scrape share.

    python bench/telemetry_overhead.py            # writes bench/results/telemetry_overhead.{json,md,png}
    python bench/telemetry_overhead.py --workload gpt --layers 4 --hidden 256 --batch 8 --seq-len 128 --rounds 16
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
from sharded_optim.app.config import ModelConfig  # noqa: E402
from sharded_optim.app.model import build_model, num_parameters  # noqa: E402

RESULTS = REPO / "bench" / "results"
SCRAPE_PERIOD_S = 1.0


def _scrape(url: str) -> float:
    """Fetch ``url`` once; the round trip in seconds."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=5) as resp:
        resp.read()
    return time.perf_counter() - t0


class _Scraper:
    """Fetch /metrics once a second on a thread, like a Prometheus scrape of this rank."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_PERIOD_S):
            _scrape(self._url)

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


class _Trainer:
    """One model and its optimizer; ``step()`` times a whole training step and its ``optimizer.step()``."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        torch.manual_seed(0)  # both trainers start from the same weights
        self.model, self.loss_of_batch = _workload(args, torch.Generator().manual_seed(seed))
        self.opt = ShardedOptimizer(self.model.parameters(), algorithm="adamw", lr=1e-4, kernel=args.kernel)

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.loss_of_batch().backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.opt.zero_grad()
        return t2 - t0, t2 - t1


def _time_reports(opt: ShardedOptimizer, sink: list[float]) -> None:
    """Append the time of every ``opt._report`` call (StepReport plus exporter hook) to ``sink``.

    An instance attribute shadows the method for this optimizer only; the wrapper adds about a microsecond."""
    inner = opt._report

    def timed(*a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        inner(*a, **k)
        sink.append(time.perf_counter() - t0)
    opt._report = timed  # type: ignore[method-assign]


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    ref, test = _Trainer(args, seed=2 * rank), _Trainer(args, seed=2 * rank + 1)
    # mode -> statistics interval with telemetry on (None: off)
    modes: dict[str, int | None] = {"off": None, "exporter_only": 0, "interval_1": 1,
                                    f"interval_{args.default_interval}": args.default_interval}
    # per mode: one entry per timed pair, (ref step, test step, ref opt.step, test opt.step) in seconds
    pairs: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
    report_t: dict[str, list[float]] = {m: [] for m in modes}
    sink: list[float] = []  # the report times of the current pair
    _time_reports(test.opt, sink)

    def run(mode: str, n_pairs: int, record: bool) -> None:
        interval = modes[mode]
        tel = scraper = None
        if interval is not None:
            tel = telemetry.start(test.opt, base_port=0, run_id="bench", stats_interval=interval)
            scraper = _Scraper(tel.port)
        else:
            test.opt.stats_interval = 0
        dist.barrier()
        for i in range(n_pairs):
            sink.clear()
            if i % 2 == 0:  # flip the order inside a pair: neither model always runs first
                (rs, ro), (ts, to) = ref.step(), test.step()
            else:
                (ts, to), (rs, ro) = test.step(), ref.step()
            if record and i > 0:  # pair 0: the lead-in (see the module docstring)
                pairs[mode].append((rs, ts, ro, to))
                report_t[mode].extend(sink)
        dist.barrier()
        if tel is not None and scraper is not None:
            scraper.stop()
            tel.stop()

    for mode in modes:  # warm-up: compile every kernel variant (with and without statistics)
        run(mode, args.warmup, record=False)
    # align the test optimizer's step counter: a block's first timed test step is a default-interval stats step
    for _ in range((-(test.opt.steps_attempted + 2)) % args.default_interval):
        test.step()
    order = list(modes)
    t_start = time.perf_counter()
    for r in range(args.rounds):  # rotate the order so that no mode always follows the same one
        for mode in order[r % len(order):] + order[:r % len(order)]:
            run(mode, args.pairs, record=True)
        if rank == 0 and (r + 1) % max(1, args.rounds // 10) == 0:
            print(f"round {r + 1}/{args.rounds}, {time.perf_counter() - t_start:.0f} s", flush=True)
    scrape_ms = _idle_scrape_ms(test, rank)
    if rank == 0:
        Path(out).write_text(json.dumps({"pairs": pairs, "report_s": report_t, "idle_scrape_ms": scrape_ms,
                                         "parameters": num_parameters(test.model)}))
    dist.destroy_process_group()


def _idle_scrape_ms(test: _Trainer, rank: int, n: int = 50) -> list[float]:
    """Round trips of scrapes of rank 0's page (the largest: it exports the global series) with no training running,
    after two statistics steps have filled every series.  Server plus client plus loopback: an upper bound on the
    server's work per scrape.  Every rank calls this (the steps are collectives); only rank 0 scrapes."""
    tel = telemetry.start(test.opt, base_port=0, run_id="bench", stats_interval=1)
    try:
        for _ in range(2):
            test.step()
        tel.flush()
        dist.barrier()
        times: list[float] = []
        if rank == 0:
            url = f"http://127.0.0.1:{tel.port}/metrics"
            _scrape(url)
            times = [_scrape(url) * 1e3 for _ in range(n)]
        dist.barrier()
        return times
    finally:
        tel.stop()


def _bootstrap_ci(num: list[float], den: list[float], resamples: int = 4000) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) over rounds drawn with replacement (seeded: reproducible)."""
    rng = random.Random(0)
    n = len(num)
    ratios = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(num[i] for i in pick) / sum(den[i] for i in pick))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def _summarise(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    timed = args.pairs - 1
    scrape_ms = statistics.median(raw["idle_scrape_ms"])
    out: dict[str, Any] = {
        "config": {**vars(args), "parameters": raw["parameters"], "torch": torch.__version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": "gloo (CPU)"},
        "idle_scrape_ms_median": scrape_ms,
        # a scrape every SCRAPE_PERIOD_S takes this share of the rank's time
        "scrape_share": scrape_ms / 1e3 / SCRAPE_PERIOD_S,
        "modes": {},
    }
    for mode, rows in raw["pairs"].items():
        stats: dict[str, Any] = {"pairs": len(rows), "report_us_mean": statistics.fmean(raw["report_s"][mode]) * 1e6
                                 if raw["report_s"][mode] else 0.0}
        for key, (ri, ti) in (("step", (0, 1)), ("optimizer_step", (2, 3))):
            ref = [r[ri] for r in rows]
            test = [r[ti] for r in rows]
            stats[f"{key}_ref_ms_mean"] = statistics.fmean(ref) * 1e3
            stats[f"{key}_test_ms_mean"] = statistics.fmean(test) * 1e3
            stats[f"{key}_extra_ms_mean"] = (statistics.fmean(test) - statistics.fmean(ref)) * 1e3
            per_round = [[sum(x[r * timed:(r + 1) * timed]) for r in range(args.rounds)] for x in (test, ref)]
            stats[f"{key}_ratio"] = sum(test) / sum(ref)
            stats[f"{key}_ratio_ci95"] = _bootstrap_ci(*per_round)
        share = out["scrape_share"] if mode != "off" else 0.0
        stats["total"] = stats["step_ratio"] + share
        stats["total_ci95"] = [x + share for x in stats["step_ratio_ci95"]]
        out["modes"][mode] = stats
    out["default_composed"] = _compose(out, args)
    return out


def _compose(out: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """The default interval's overhead from parts: per-step report time on exporter-only steps, plus the paired
    extra of a statistics step (interval 1, less its report time) over N, plus the scrape share."""
    m = out["modes"]
    n = args.default_interval
    base_ms = m["interval_1"]["step_ref_ms_mean"]
    report_ms = m["exporter_only"]["report_us_mean"] / 1e3
    stats_extra = [(x - 1.0) * base_ms - report_ms for x in
                   (m["interval_1"]["step_ratio"], *m["interval_1"]["step_ratio_ci95"])]
    composed = [1.0 + (report_ms + e / n) / base_ms + out["scrape_share"] for e in stats_extra]
    return {"report_ms": report_ms, "stats_step_extra_ms": stats_extra[0], "ratio": composed[0],
            "ratio_ci95": composed[1:]}


def _stem(args: argparse.Namespace) -> str:
    return "telemetry_overhead" if args.workload == "mlp" else f"telemetry_overhead_{args.workload}"


def _write(summary: dict[str, Any], raw: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Every timed pair's times (ms: reference step, test step, reference and test optimizer.step), per mode in run
    # order, and the per-step report times, for re-analysis; compact, one mode per line.
    samples = {"pairs_ms": {m: [[round(x * 1e3, 3) for x in row] for row in rows] for m, rows in raw["pairs"].items()},
               "report_us": {m: [round(x * 1e6, 1) for x in xs] for m, xs in raw["report_s"].items()},
               "idle_scrape_ms": [round(x, 3) for x in raw["idle_scrape_ms"]]}
    body = json.dumps(summary, indent=2)[:-2]
    body += ',\n  "samples": {\n' + ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in samples.items())
    (RESULTS / f"{stem}.json").write_text(body + "\n  }\n}\n")
    cfg = summary["config"]
    model = (f"MLP {cfg['layers']}x{cfg['hidden']}, batch {cfg['batch']}" if cfg["workload"] == "mlp" else
             f"GPT {cfg['layers']} layers x d_model {cfg['hidden']}, batch {cfg['batch']} x {cfg['seq_len']} tokens")
    c = summary["default_composed"]
    lines = ["# Telemetry overhead", "",
             f"`python bench/telemetry_overhead.py {_flags(cfg)}` — {cfg['world']} gloo ranks, {model} "
             f"({cfg['parameters'] / 1e6:.1f}M parameters), adamw, kernel {cfg['kernel']}; {cfg['rounds']} rounds, "
             f"each one block of {cfg['pairs']} step pairs (reference, test) per mode, the first an untimed lead-in; "
             f"{cfg['machine']}, torch {cfg['torch']}, 1-min load average before/after "
             f"{cfg['loadavg_1min_before_after']}. Rank 0. Paired ratio: test steps / reference steps over all "
             f"timed pairs, 95% bootstrap interval over rounds. Scrape: a scrape of this rank every "
             f"{SCRAPE_PERIOD_S:g} s, {summary['idle_scrape_ms_median']:.2f} ms round trip when idle, adds "
             f"{summary['scrape_share'] * 100:.2f}% (not visible to a pair: it hits both steps).", "",
             "| mode | reference step (ms) | test step (ms) | paired ratio | 95% CI | + scrape = total | "
             "total 95% CI | optimizer.step ratio | report (us/step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summary["modes"].items():
        sq, tq, oq = s["step_ratio_ci95"], s["total_ci95"], s["optimizer_step_ratio_ci95"]
        lines.append(f"| {mode} | {s['step_ref_ms_mean']:.2f} | {s['step_test_ms_mean']:.2f} | "
                     f"{s['step_ratio']:.4f} | {sq[0]:.4f}-{sq[1]:.4f} | **{s['total']:.4f}** | "
                     f"{tq[0]:.4f}-{tq[1]:.4f} | {s['optimizer_step_ratio']:.3f} ({oq[0]:.3f}-{oq[1]:.3f}) | "
                     f"{s['report_us_mean']:.0f} |")
    lines += ["", f"Default interval composed from parts: report {c['report_ms'] * 1e3:.0f} us every step + a "
              f"statistics step's extra {c['stats_step_extra_ms']:.2f} ms / {cfg['default_interval']} + scrape "
              f"share = **{c['ratio']:.4f}** ({c['ratio_ci95'][0]:.4f}-{c['ratio_ci95'][1]:.4f}, the interval "
              f"carried over from interval 1's)."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(summary, raw, stem)


def _plot(summary: dict[str, Any], raw: dict[str, Any], stem: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes = list(summary["modes"])
    bars = {m: (summary["modes"][m]["total"], summary["modes"][m]["total_ci95"]) for m in modes}
    composed = summary["default_composed"]
    bars[f"interval_{summary['config']['default_interval']}\ncomposed"] = (composed["ratio"], composed["ratio_ci95"])
    pct = [(r - 1) * 100 for r, _ in bars.values()]
    err = [[p - (ci[0] - 1) * 100 for p, (_, ci) in zip(pct, bars.values())],
           [(ci[1] - 1) * 100 - p for p, (_, ci) in zip(pct, bars.values())]]
    axes[0].bar(list(bars), pct, yerr=err, capsize=4, color=["tab:blue"] * len(modes) + ["tab:orange"])
    axes[0].tick_params(axis="x", labelsize=8)
    for y, label in ((5, "interval-1 target"), (1, "default target")):
        axes[0].axhline(y, ls="--", color="grey", lw=1)
        axes[0].text(len(bars) - 0.5, y, label, ha="right", va="bottom", fontsize=8)
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel("step time overhead, % (95% CI)")
    axes[0].set_title("paired ratio + scrape share")
    axes[1].boxplot([[(r[1] - r[0]) * 1e3 for r in raw["pairs"][m]] for m in modes], showfliers=False)
    axes[1].set_xticks(range(1, len(modes) + 1), modes)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("test step - reference step (ms)")
    axes[1].set_title("per pair")
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
    ap.add_argument("--pairs", type=int, default=20,
                    help="step pairs per mode and round, the first an untimed lead-in; a multiple of "
                         "--default-interval")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--default-interval", type=int, default=telemetry.DEFAULT_STATS_INTERVAL)
    args = ap.parse_args()
    if args.pairs < 2 or args.pairs % args.default_interval:
        ap.error(f"--pairs must be a multiple of --default-interval ({args.default_interval}) and >= 2, "
                 f"got {args.pairs}")
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
    # Other work on the machine widens the noise: record it.
    summary["config"]["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    _write(summary, raw, _stem(args))
    print((RESULTS / f"{_stem(args)}.md").read_text())


if __name__ == "__main__":
    main()
