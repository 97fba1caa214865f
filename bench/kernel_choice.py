"""Which ShardedOptimizer kernel is faster for the experiments' tiny models: eager or compiled?

Times whole training steps (forward, backward, optimizer step) of the digits MLP, interleaving the two kernels
so machine load affects both alike, after a warm-up that absorbs the one-off torch.compile cost.  Run from the
repository root: ``python bench/kernel_choice.py``.  Prints a markdown table.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharded_optim import ShardedOptimizer  # noqa: E402
from sharded_optim.app.experiments.tasks import digits_model, load_digits  # noqa: E402


def time_steps(kernel: str, algorithm: str, model_kind: str, steps: int, amsgrad: bool = False) -> float:
    """Median seconds per training step over ``steps`` steps (after 20 warm-up steps)."""
    data = load_digits()
    model = digits_model(model_kind, 0)
    opt = ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=1e-3, kernel=kernel, amsgrad=amsgrad)
    x, y = data.x_train[:64], data.y_train[:64]
    times = []
    for i in range(20 + steps):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    cases = [("adam", "mlp", False), ("adam", "mlp", True), ("adamod", "mlp", False), ("adam", "logreg", False)]
    print("| algorithm | model | eager ms/step | compiled ms/step | compiled / eager |\n|---|---|---|---|---|")
    for algorithm, kind, ams in cases:
        eager, compiled = [], []
        for _ in range(3):  # interleaved rounds
            eager.append(time_steps("eager", algorithm, kind, 200, ams))
            compiled.append(time_steps("compiled", algorithm, kind, 200, ams))
        e, c = statistics.median(eager), statistics.median(compiled)
        name = algorithm + ("+amsgrad" if ams else "")
        print(f"| {name} | {kind} | {e * 1e3:.3f} | {c * 1e3:.3f} | {c / e:.2f} |", flush=True)


if __name__ == "__main__":
    main()
