"""The update kernel alone with its state in fp32, bf16 and int8 (issue 19's speed targets), CPU or one CUDA GPU.

The compiled update over one flat shard of ``--numel`` elements, called as ``ShardedOptimizer`` calls it
(``dispatch.run`` on the state buffers of a :class:`~sharded_optim.state_storage.StateStorage`, host scalars of
step 1), timed interleaved against a device copy of one fp32 shard (``dst.copy_(src)``: 8 bytes per element, the
practical memory ceiling): CUDA events on a GPU, wall time on CPU (medians).  Reported per algorithm and
precision: time, the speed against the fp32-state kernel, and the achieved bandwidth counted on the bytes the
kernel must move in that precision (parameter read and written 8, gradient 4, each state read and written: 8 in
fp32, 4 in bf16, 2 + 8/256 in int8) as a fraction of the copy's.  Targets (issue 19): int8 >= 0.8x the fp32
kernel's speed on CPU; >= 0.8 of the copy bandwidth on the compressed bytes on a GPU.

    python bench/state_kernel_bench.py                                   # CPU, 16M elements
    python bench/state_kernel_bench.py --device cuda --numel 268435456   # one GPU, 256M elements
    # writes bench/results/state_kernel_<device>.{json,md,png}
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from common import environment, grouped_bars, interleaved, md_table, median, write_json, write_markdown
from gpu_bench import Clock
from kernel_bench import hyper
from sharded_optim import rules
from sharded_optim.kernels import dispatch
from sharded_optim.state_storage import StateStorage

CASES = [("adamw", "adamw", {}), ("amsgrad", "adam", {"amsgrad": True})]
PRECISIONS = ("fp32", "bf16", "int8")
STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / 256}   # per element and state, read + written


def _kernel(algorithm: str, options: dict, precision: str, numel: int, device: torch.device):
    """A callable running one update of a fresh shard, and the bytes it must move."""
    group = hyper(algorithm, options)
    variant = rules.kernel_variant(algorithm, group)
    keys = rules.state_keys(algorithm, group)
    gen = torch.Generator(device=device).manual_seed(0)
    p = torch.randn(numel, device=device, generator=gen)
    g = torch.randn(numel, device=device, generator=gen)
    storage = StateStorage(numel, keys, precision, torch.float32, device)
    sc = torch.tensor(rules.host_scalars(algorithm, group, 1, initial_lr=group["lr"]).values, device=device)
    seed = () if precision == "fp32" else (torch.tensor(0, dtype=torch.int64, device=device),)
    kernel = dispatch.update(variant, precision)

    def step() -> None:
        dispatch.run(kernel, "compiled", p, g, *storage.args(keys, slice(0, numel)), sc, *seed)
    return step, numel * (12.0 + STATE_BYTES[precision] * len(keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numel", type=float, default=1 << 24)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    numel = -(-int(args.numel) // 256) * 256   # whole 8-bit blocks, as the optimizer's layout pads them
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timer = Clock(device)   # CUDA events on a GPU, wall time on CPU
    rows, table = [], []
    for name, algorithm, options in CASES:
        fns = {"copy": lambda: dst.copy_(src)}
        moved = {"copy": 8.0 * numel}
        for precision in PRECISIONS:
            fns[precision], moved[precision] = _kernel(algorithm, options, precision, numel, device)
            for _ in range(3):   # compile and warm up
                fns[precision]()
        times = {k: median(v) for k, v in interleaved(fns, args.reps, timer=timer).items()}
        copy_bw = moved["copy"] / times["copy"]
        for precision in PRECISIONS:
            bw = moved[precision] / times[precision]
            rows.append({"algorithm": name, "precision": precision, "seconds": times[precision],
                         "speed_vs_fp32": times["fp32"] / times[precision], "bytes": moved[precision],
                         "bandwidth_GBps": bw / 1e9, "fraction_of_copy": bw / copy_bw,
                         "copy_GBps": copy_bw / 1e9})
            table.append([name, precision, times[precision] * 1e3, times["fp32"] / times[precision],
                          bw / 1e9, bw / copy_bw])
    env = environment()
    tag = device.type
    write_json(f"state_kernel_{tag}", {"numel": numel, "reps": args.reps, "environment": env, "rows": rows})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = "\n".join([
        f"# The update kernel with fp32 / bf16 / int8 state: {device_name}, {numel:,} elements", "",
        f"`python bench/state_kernel_bench.py --device {args.device} --numel {numel}`; medians of {args.reps} "
        f"interleaved calls; bandwidth on the bytes each precision must move, against a copy of one shard "
        f"({rows[0]['copy_GBps']:.1f} GB/s).", "",
        md_table(["algorithm", "state", "ms", "speed vs fp32 state", "GB/s moved", "of copy bandwidth"], table)])
    write_markdown(f"state_kernel_{tag}", text)
    names = [name for name, _, _ in CASES]
    pick = {prec: [next(r for r in rows if r["algorithm"] == n and r["precision"] == prec) for n in names]
            for prec in PRECISIONS}
    grouped_bars(f"state_kernel_{tag}", [
        ("update kernel: speed vs fp32 state (target int8 >= 0.8)", "fp32 time / time", names,
         {p: [r["speed_vs_fp32"] for r in pick[p]] for p in PRECISIONS}, 0.8),
        (f"bandwidth on the bytes moved, {device_name}", "fraction of a device copy", names,
         {p: [r["fraction_of_copy"] for r in pick[p]] for p in PRECISIONS}, 0.8)])
    print(text)


if __name__ == "__main__":
    main()
