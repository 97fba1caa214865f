"""State precision: the time of ``ShardedOptimizer.step()`` and the memory it holds, fp32 vs bf16 vs int8 state.

One process per configuration: a single fp32 parameter of ``--numel`` elements, compiled kernels, a fixed
gradient; the median of ``--repeats`` timed steps after warm-up.  Memory: ``memory_report()``'s state bytes per
parameter, and measured: the resident set sampled every 0.5 ms by a thread, from before the optimizer is built to
after its steps (peak and retained growth over the start).  The kernel is compiled first, on a tensor an eighth
the size, and ``malloc_trim`` then hands the compiler's freed heap back, so neither its memory nor its reuse
hides in the figures.  The optimizer's own buffers besides the state: the flat gradient shard (4 B/param).

    python bench/state_precision_bench.py [--numel 16777216] [--repeats 20]
    # writes bench/results/state_precision.{json,md,png}
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import grouped_bars

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


def one(name: str, precision: str, numel: int, repeats: int) -> dict:
    import torch

    from sharded_optim import ShardedOptimizer
    algorithm = "adam" if name == "amsgrad" else name
    warm = torch.nn.Parameter(torch.zeros(numel // 8))   # compile first: its memory is not the state's
    warm.grad = torch.zeros_like(warm)
    ShardedOptimizer([warm], algorithm=algorithm, state_precision=precision, kernel="compiled",
                     **dict(CONFIGS)[name]).step()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    grad = torch.randn(numel)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _resident()
    sampler = _Sampler()
    sampler.start()
    opt = ShardedOptimizer([p], algorithm=algorithm, lr=1e-3, state_precision=precision, kernel="compiled",
                           **dict(CONFIGS)[name])
    times = []
    for i in range(repeats + 5):
        p.grad = grad
        t = time.perf_counter()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t)
    sampler.done.set()
    sampler.join()
    retained = _resident() - start
    report = opt.memory_report()
    return {"algorithm": name, "precision": precision, "numel": numel, "step_ms": 1e3 * statistics.median(times),
            "state_bytes_per_param": report["state_bytes"] / numel,
            "peak_rss_growth_bytes_per_param": (max(sampler.peak, _resident()) - start) / numel,
            "retained_rss_growth_bytes_per_param": retained / numel,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)   # fixed temporaries (~20 MiB) stay small per element
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.numel, args.repeats)))
        return
    rows = []
    for name, _ in CONFIGS:
        for precision in PRECISIONS:
            out = subprocess.run([sys.executable, __file__, "--one", name, precision, "--numel", str(args.numel),
                                  "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state_precision.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# State precision on CPU ({rows[0]['threads']} threads): one {args.numel}-element fp32 parameter, "
             "`step()` median", "", "`python bench/state_precision_bench.py`", "",
             "| algorithm | state | step ms | speed vs fp32 state | state B/param | "
             "measured RSS growth B/param: peak, retained |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["algorithm"] == row["algorithm"] and r["precision"] == "fp32")
        lines.append(f"| {row['algorithm']} | {row['precision']} | {row['step_ms']:.2f} | "
                     f"{base['step_ms'] / row['step_ms']:.2f}x | {row['state_bytes_per_param']:.2f} | "
                     f"{row['peak_rss_growth_bytes_per_param']:.2f}, "
                     f"{row['retained_rss_growth_bytes_per_param']:.2f} |")
    (RESULTS / "state_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    names = [name for name, _ in CONFIGS]
    pick = {prec: [next(r for r in rows if r["algorithm"] == n and r["precision"] == prec) for n in names]
            for prec in PRECISIONS}
    fp32 = {r["algorithm"]: r["step_ms"] for r in pick["fp32"]}
    grouped_bars("state_precision", [
        ("step(): speed vs fp32 state", "fp32 step time / step time", names,
         {p: [fp32[r["algorithm"]] / r["step_ms"] for r in pick[p]] for p in PRECISIONS}, None),
        ("optimizer memory, measured resident growth", "bytes per parameter", names,
         {p: [r["peak_rss_growth_bytes_per_param"] for r in pick[p]] for p in PRECISIONS}, None)])


if __name__ == "__main__":
    main()
