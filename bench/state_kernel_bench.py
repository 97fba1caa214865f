"""The update kernel alone with its state in fp32, bf16 and int8 (issue 19's speed targets), CPU or one CUDA GPU.

The update over one flat shard of ``--numel`` elements, called as ``ShardedOptimizer`` calls it (``dispatch.run`` on
the state buffers of a :class:`~sharded_optim.state_storage.StateStorage`, host scalars of step 1), timed
interleaved against a device copy of one fp32 shard (``dst.copy_(src)``: 8 bytes per element, the practical memory
ceiling): CUDA events on a GPU, wall time on CPU.  What runs: Inductor's kernels, except bf16 and int8 on CPU, which
``dispatch`` hands to C kernels (:mod:`sharded_optim.kernels.native_bf16`, ``native_int8``).  On CPU three references
more: ``fp32 C``, the fp32 kernel a one-rank CPU optimizer runs (:mod:`sharded_optim.kernels.native_cpu`, one
segment), and ``bf16 Inductor`` and ``int8 Inductor``, the compiled kernels the C ones replaced.  Reported per
algorithm and state: the median time, the speed against each fp32 kernel as a paired ratio (median over rounds of
fp32 time / time in the same round), and the achieved bandwidth counted on the bytes the kernel must move in that
precision (parameter read and written 8, gradient 4, each state read and written: 8 in fp32, 4 in bf16, 2 + 8/256 in
int8) as a fraction of the copy's.  Targets (issue 19): int8 >= 0.8x the fp32 kernel's speed on CPU; >= 0.8 of the
copy bandwidth on the compressed bytes on a GPU.

    python bench/state_kernel_bench.py                                   # CPU, 16M elements
    python bench/state_kernel_bench.py --device cuda --numel 268435456   # one GPU, 256M elements
    # writes bench/results/state_kernel_<device>.{json,md,png}
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from common import (environment, grouped_bars, interleaved, md_table, median, paired_ratio, write_json,
                    write_markdown)
from gpu_bench import Clock
from kernel_bench import hyper
from sharded_optim import rules
from sharded_optim.kernels import dispatch, int8_state, native_cpu
from sharded_optim.state_storage import StateStorage

CASES = [("adamw", "adamw", {}), ("amsgrad", "adam", {"amsgrad": True})]
PRECISIONS = ("fp32", "bf16", "int8")
CPU_REFERENCES = ("fp32 C", "bf16 Inductor", "int8 Inductor")   # CPU only: which kernel runs a precision
STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / 256}   # per element and state, read + written


def _kernel(algorithm: str, options: dict, name: str, numel: int, device: torch.device):
    """A callable running one update of a fresh shard with kernel ``name`` (a precision or a CPU reference), and
    the bytes it must move."""
    precision = name.split()[0]
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
    args = (p, g, *storage.args(keys, slice(0, numel)), sc, *seed)
    if name == "fp32 C":
        table = native_cpu.segment_table([(0, g, None)], p)

        def step() -> None:
            native_cpu.update(variant, table, args[2:-1], sc)
    elif name.endswith("Inductor"):   # the compiled kernel called directly (int8: in its blocked chunks)
        compiled = dispatch._compiled(kernel)
        calls = int8_state.blocked_calls(args, 0, len(keys)) if precision == "int8" else [args]

        def step() -> None:
            for part in calls:
                compiled(*part)
    else:
        def step() -> None:
            dispatch.run(kernel, "compiled", *args)
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
    names = PRECISIONS + (CPU_REFERENCES if device.type == "cpu" else ())
    bases = [n for n in ("fp32", "fp32 C") if n in names]   # the speeds are against these
    rows, table = [], []
    for algorithm_name, algorithm, options in CASES:
        fns = {"copy": lambda: dst.copy_(src)}
        moved = {"copy": 8.0 * numel}
        for name in names:
            fns[name], moved[name] = _kernel(algorithm, options, name, numel, device)
            for _ in range(3):   # compile and warm up
                fns[name]()
        laps = interleaved(fns, args.reps, timer=timer)
        times = {k: median(v) for k, v in laps.items()}
        copy_bw = moved["copy"] / times["copy"]
        for name in names:
            bw = moved[name] / times[name]
            speeds = {f"speed_vs_{base.replace(' ', '_')}": paired_ratio(laps[base], laps[name]) for base in bases}
            rows.append({"algorithm": algorithm_name, "kernel": name, "seconds": times[name], **speeds,
                         "bytes": moved[name], "bandwidth_GBps": bw / 1e9, "fraction_of_copy": bw / copy_bw,
                         "copy_GBps": copy_bw / 1e9})
            table.append([algorithm_name, name, times[name] * 1e3, *speeds.values(), bw / 1e9, bw / copy_bw])
    env = environment()
    tag = device.type
    write_json(f"state_kernel_{tag}", {"numel": numel, "reps": args.reps, "environment": env, "rows": rows})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = "\n".join([
        f"# The update kernel with fp32 / bf16 / int8 state: {device_name}, {numel:,} elements", "",
        f"`python bench/state_kernel_bench.py --device {args.device} --numel {numel}`; {args.reps} interleaved "
        f"rounds: median times, speeds as paired ratios (median over rounds of the fp32 kernel's time / this "
        f"kernel's); bandwidth on the bytes each precision must move, against a copy of one shard "
        f"({rows[0]['copy_GBps']:.1f} GB/s).  `fp32` is the compiled kernel over a flat shard (ZeRO ranks), "
        f"`fp32 C` the one a one-rank CPU optimizer runs; `bf16` and `int8` on CPU are the C kernels, "
        f"`... Inductor` the compiled ones they replaced.", "",
        md_table(["algorithm", "kernel", "ms", *[f"speed vs {b}" for b in bases], "GB/s moved",
                  "of copy bandwidth"], table)])
    write_markdown(f"state_kernel_{tag}", text)
    cases = [case for case, _, _ in CASES]
    pick = {n: [next(r for r in rows if r["algorithm"] == c and r["kernel"] == n) for c in cases] for n in names}
    grouped_bars(f"state_kernel_{tag}", [   # against the compiled fp32 kernel, as docs/BENCHMARKS.md quotes
        ("update kernel: speed vs fp32 (target int8 >= 0.8)", "fp32 time / time", cases,
         {n: [r["speed_vs_fp32"] for r in pick[n]] for n in names}, 0.8),
        (f"bandwidth on the bytes moved, {device_name}", "fraction of a device copy", cases,
         {n: [r["fraction_of_copy"] for r in pick[n]] for n in names}, 0.8)])
    print(text)


if __name__ == "__main__":
    main()
