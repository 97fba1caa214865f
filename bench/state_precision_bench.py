"""State precision: the time of ``ShardedOptimizer.step()`` and the memory it holds, fp32 vs bf16 vs int8 state.

A single fp32 parameter of ``--numel`` elements per configuration, compiled kernels (on CPU ``dispatch`` runs the C
kernels for bf16 and int8), a fixed gradient set before each step.

* Speed: every configuration in one process, timed in ``--rounds`` interleaved rounds of ``--iters`` steps each;
  the speed against fp32 state is the paired ratio (median over rounds of the fp32 step's time / this one's in the
  same round).  One process per configuration, as memory needs, timed single medians that moved by up to 1.6x
  between runs of the same code on this 2-core machine (its memory phases).
* Memory: one process per configuration.  ``memory_report()``'s state bytes per parameter, and measured: the
  resident set sampled every 0.5 ms by a thread, from before the optimizer is built to after 10 steps (peak and
  retained growth over the start).  The kernel is compiled first, on a tensor an eighth the size, and
  ``malloc_trim`` then hands the compiler's freed heap back, so neither its memory nor its reuse hides in the
  figures.  The optimizer's own buffers besides the state: the flat gradient shard (4 B/param).

    python bench/state_precision_bench.py [--numel 16777216] [--rounds 15] [--iters 3]
    # writes bench/results/state_precision.{json,md,png}
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import grouped_bars, median, paired_ratio

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("adamw", {}), ("amsgrad", {"amsgrad": True})]
PRECISIONS = ("fp32", "bf16", "int8")


def _resident() -> int:
    """Bytes resident now (``/proc/self/statm``)."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler(threading.Thread):
    """The largest resident set seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = _resident(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _resident())
            time.sleep(0.0005)


def _options(name: str) -> tuple[str, dict]:
    return ("adam" if name == "amsgrad" else name), dict(CONFIGS)[name]


def memory(name: str, precision: str, numel: int) -> dict:
    """One configuration's state bytes and measured resident growth (run in a process of its own)."""
    import torch
    from sharded_optim import ShardedOptimizer
    algorithm, options = _options(name)
    warm = torch.nn.Parameter(torch.zeros(numel // 8))   # compile first: its memory is not the state's
    warm.grad = torch.zeros_like(warm)
    ShardedOptimizer([warm], algorithm=algorithm, state_precision=precision, kernel="compiled", **options).step()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    grad = torch.randn(numel)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _resident()
    sampler = _Sampler()
    sampler.start()
    opt = ShardedOptimizer([p], algorithm=algorithm, lr=1e-3, state_precision=precision, kernel="compiled",
                           **options)
    for _ in range(10):
        p.grad = grad
        opt.step()
    sampler.done.set()
    sampler.join()
    retained = _resident() - start
    report = opt.memory_report()
    return {"algorithm": name, "precision": precision, "numel": numel,
            "state_bytes_per_param": report["state_bytes"] / numel,
            "peak_rss_growth_bytes_per_param": (max(sampler.peak, _resident()) - start) / numel,
            "retained_rss_growth_bytes_per_param": retained / numel, "threads": torch.get_num_threads()}


def speed(numel: int, rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per step of every configuration, ``rounds`` interleaved rounds of ``iters`` steps (one process)."""
    import torch
    from sharded_optim import ShardedOptimizer
    steps = {}
    for name, _ in CONFIGS:
        for precision in PRECISIONS:
            algorithm, options = _options(name)
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(numel))
            grad = torch.randn(numel)
            opt = ShardedOptimizer([p], algorithm=algorithm, lr=1e-3, state_precision=precision, kernel="compiled",
                                   **options)

            def step(p: torch.Tensor = p, grad: torch.Tensor = grad, opt: ShardedOptimizer = opt) -> None:
                for _ in range(iters):
                    p.grad = grad
                    opt.step()
            step()   # warm-up: compiles, allocates the state
            steps[f"{name}/{precision}"] = step
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter()
            steps[n]()
            times[n].append((time.perf_counter() - t) / iters)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)   # fixed temporaries (~20 MiB) stay small per element
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(memory(args.one[0], args.one[1], args.numel)))
        return
    times = speed(args.numel, args.rounds, args.iters)
    rows = []
    for name, _ in CONFIGS:
        for precision in PRECISIONS:
            out = subprocess.run([sys.executable, __file__, "--one", name, precision, "--numel", str(args.numel)],
                                 check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            mine, fp32 = times[f"{name}/{precision}"], times[f"{name}/fp32"]
            row.update(step_ms=1e3 * median(mine), step_s=mine, speed_vs_fp32=paired_ratio(fp32, mine))
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state_precision.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# State precision on CPU ({rows[0]['threads']} threads): one {args.numel}-element fp32 parameter, "
             "`step()`", "", f"`python bench/state_precision_bench.py`; speed: {args.rounds} interleaved rounds of "
             f"{args.iters} steps in one process, median times, speed as the paired ratio (median over rounds of "
             "the fp32-state step's time / this one's); memory: one process per configuration.", "",
             "| algorithm | state | step ms | speed vs fp32 state | state B/param | "
             "measured RSS growth B/param: peak, retained |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['algorithm']} | {row['precision']} | {row['step_ms']:.2f} | "
                     f"{row['speed_vs_fp32']:.2f}x | {row['state_bytes_per_param']:.2f} | "
                     f"{row['peak_rss_growth_bytes_per_param']:.2f}, "
                     f"{row['retained_rss_growth_bytes_per_param']:.2f} |")
    (RESULTS / "state_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    names = [name for name, _ in CONFIGS]
    pick = {prec: [next(r for r in rows if r["algorithm"] == n and r["precision"] == prec) for n in names]
            for prec in PRECISIONS}
    grouped_bars("state_precision", [
        ("step(): speed vs fp32 state", "paired ratio: fp32 step time / step time", names,
         {p: [r["speed_vs_fp32"] for r in pick[p]] for p in PRECISIONS}, None),
        ("optimizer memory, measured resident growth", "bytes per parameter", names,
         {p: [r["peak_rss_growth_bytes_per_param"] for r in pick[p]] for p in PRECISIONS}, None)])


if __name__ == "__main__":
    main()
