"""How far diffGrad's friction is from 1/2 in practice: the telemetry's friction statistics on the digits MLP.

xi = 1/(1 + exp(-|g_prev - g|)) is not scale-invariant: for |g_prev - g| << 1 it is 1/2 + |g_prev - g|/4, and the
step is then the base algorithm's at half the learning rate (diffgrad: E0 Adam; diffmod: AdaMod).  This trains the
lr-sensitivity experiment's MLP (digits, batch 64, 400 steps) and prints, every 100 steps, the mean of xi and the
fraction of elements with xi <= 0.51 (``friction_mean``, ``friction_near_half_ratio``).

Run from the repository root:  ``python bench/friction_probe.py``
"""
from __future__ import annotations

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from sharded_optim import ShardedOptimizer
from sharded_optim.app.experiments.tasks import digits_model, load_digits
from sharded_optim.telemetry.finalize import finalize

CASES = (("diffmod", 2.51e-2), ("diffgrad", 2.51e-2), ("diffmod", 1.58e-3))


def probe(algorithm: str, lr: float, steps: int = 400, every: int = 100) -> list[tuple[int, float, float]]:
    data = load_digits()
    model = digits_model("mlp", 0)
    opt = ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=lr, kernel="eager", stats_interval=every)
    seen: list[tuple[int, float, float]] = []

    def record(report) -> None:
        if report.stats is not None:
            st = finalize(report.stats, report.group_names)[report.group_names[0]]
            seen.append((report.stats_step, st.friction_mean, st.friction_near_half_ratio))

    opt.add_report_hook(record)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return seen


def main() -> None:
    torch.set_num_threads(1)
    for algorithm, lr in CASES:
        rows = ", ".join(f"step {s}: mean {m:.4f}, <= 0.51: {r:.3f}" for s, m, r in probe(algorithm, lr))
        print(f"{algorithm} lr {lr:g}: {rows}")


if __name__ == "__main__":
    main()
