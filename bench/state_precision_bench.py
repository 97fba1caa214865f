"""State precision: the time of ``ShardedOptimizer.step()`` and the memory it holds, fp32 vs bf16 vs int8 state.

One process per configuration (so peak RSS is its own): a single fp32 parameter of ``--numel`` elements, compiled
kernels, a fixed gradient; the median of ``--repeats`` timed steps after warm-up.  Memory: ``memory_report()``'s
state bytes per parameter and the growth of peak RSS from before the optimizer is built to after its steps (the
kernel is compiled first, on a tensor an eighth the size, so the compiler's memory is not counted).

    python bench/state_precision_bench.py [--numel 4194304] [--repeats 30]
    # writes bench/results/state_precision.{json,md}
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("adamw", {}), ("amsgrad", {"amsgrad": True})]
PRECISIONS = ("fp32", "bf16", "int8")


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
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt = ShardedOptimizer([p], algorithm=algorithm, lr=1e-3, state_precision=precision, kernel="compiled",
                           **dict(CONFIGS)[name])
    times = []
    for i in range(repeats + 5):
        p.grad = grad
        t = time.perf_counter()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = opt.memory_report()
    return {"algorithm": name, "precision": precision, "numel": numel, "step_ms": 1e3 * statistics.median(times),
            "state_bytes_per_param": report["state_bytes"] / numel,
            "peak_rss_growth_bytes_per_param": (rss_after - rss_before) * 1024 / numel,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=30)
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
             "| algorithm | state | step ms | speed vs fp32 state | state B/param | peak RSS growth B/param |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["algorithm"] == row["algorithm"] and r["precision"] == "fp32")
        lines.append(f"| {row['algorithm']} | {row['precision']} | {row['step_ms']:.2f} | "
                     f"{base['step_ms'] / row['step_ms']:.2f}x | {row['state_bytes_per_param']:.2f} | "
                     f"{row['peak_rss_growth_bytes_per_param']:.2f} |")
    (RESULTS / "state_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
