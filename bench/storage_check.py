"""Per-step cost of the replaced-storage check (``FlatParamGroup.rebind_replaced_storage``, common path).

    python bench/storage_check.py [--params 300] [--reps 2000]

A GPT-2-like parameter list (per block: 2 LayerNorms, qkv, attention out, MLP in/out, weights and biases = 12
tensors; 25 blocks + embeddings ~ 300 tensors, small sizes: the check is per parameter, not per element) in one
single-process runtime.  Timed, interleaved: the check alone; and for scale, one whole ``step()`` of a
ShardedOptimizer over the same parameters with zero gradients (eager kernel).  Prints medians in microseconds.
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, median  # noqa: E402  (bench/ is on sys.path when run as a script)
from sharded_optim import ShardedOptimizer


def gpt2_like(n: int) -> list[torch.nn.Parameter]:
    d = 16
    shapes = [(64, d), (32, d)]  # embeddings
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    while len(shapes) < n:
        shapes.extend(block)
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = gpt2_like(args.params)
    opt = ShardedOptimizer(params, "adamw", kernel="eager")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # builds the runtime
    (rt,) = [rt for _, rt in opt._all_runtimes()]
    times = interleaved({"check": rt.rebind_replaced_storage, "step": opt.step}, args.reps)
    check, step = median(times["check"]) * 1e6, median(times["step"]) * 1e6
    print(f"{len(params)} parameters: storage check {check:.1f} us per step ({check / len(params) * 1e3:.0f} ns per "
          f"parameter); whole step {step:.0f} us; check/step {check / step:.1%}")


if __name__ == "__main__":
    main()
