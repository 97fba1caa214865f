"""The training problems: logistic regression and an MLP on scikit-learn's bundled digits, and the project's
small byte-level transformer on the shipped corpus.  Each run is a pure function of its seed and is
rank-aware (the global batch is drawn on every rank, each rank trains on its slice; see :mod:`.common`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import Context, make_optimizer

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]  # returns an object with .step(), or None


@dataclass(frozen=True)
class Digits:
    """8x8 digits scaled to [0, 1] and centred: 1437 training and 360 validation images (fixed split)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@lru_cache(maxsize=1)
def load_digits() -> Digits:
    """scikit-learn's digits as :class:`Digits`: a fixed seeded split (360 validation images), pixels scaled by 1/16 and
    centred on the training mean; cached."""
    from sklearn.datasets import load_digits as sk_load
    x, y = sk_load(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = 360
    val, train = perm[:n_val], perm[n_val:]
    # Scaled to [0, 1] and centred on the training mean.  No division by the per-pixel std: some border
    # pixels are (almost) always 0 in training, and dividing by their tiny std turns a rare nonzero value in a
    # validation image into a feature of ~1e4 that dominates the validation loss through an untrained weight.
    x = x / 16.0
    x = x - x[train].mean(0)
    return Digits(x[train], y[train], x[val], y[val])


def digits_model(kind: str, seed: int) -> nn.Module:
    """``logreg`` (64 -> 10) or ``mlp`` (64 -> 128 -> ReLU -> 10), initialised from ``seed``."""
    torch.manual_seed(seed)
    if kind == "logreg":
        return nn.Linear(64, 10)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    raise ValueError(f"unknown digits model {kind!r}")


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def _batch_indices(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``steps`` global batches of ``batch`` indices: epoch-wise shuffles drawn from ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(n, generator=g)[: per_epoch * batch] for _ in range(epochs)])
    return order[: steps * batch].view(steps, batch)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def train_digits(ctx: Context, model_kind: str, label: str, lr: float, steps: int, seed: int, *,
                 batch: int = 64, eval_every: int = 0, scheduler: SchedulerFactory | None = None,
                 n_train: int | None = None, **optimizer_options: Any) -> dict[str, Any]:
    """Train one digits model; return the curve ``[(step, train_loss, val_loss, val_acc)]`` and final values.

    The training loss reported is the full-training-set loss (no dropout: deterministic), evaluated at step 0,
    every ``eval_every`` steps and at the end.  ``n_train``: train on the first ``n_train`` training images only
    (a small training set that a long run overfits).
    """
    data = load_digits()
    if n_train is not None:
        data = Digits(data.x_train[:n_train], data.y_train[:n_train], data.x_val, data.y_val)
    if batch % ctx.world_size:
        raise ValueError(f"batch {batch} is not divisible by the world size {ctx.world_size}")
    model = digits_model(model_kind, seed)
    opt = make_optimizer(ctx, model.parameters(), label, lr, **optimizer_options)
    sched = scheduler(opt) if scheduler is not None else None
    batches = _batch_indices(len(data.y_train), batch, steps, seed)
    share = batch // ctx.world_size
    mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
    curve = []

    def record(step: int) -> None:
        train_loss, _ = _evaluate(model, data.x_train, data.y_train)
        val_loss, val_acc = _evaluate(model, data.x_val, data.y_val)
        curve.append((step, _finite(train_loss), _finite(val_loss), val_acc))

    record(0)
    for step in range(steps):
        idx = batches[step, mine]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            record(step + 1)
    record(steps)
    _, train_loss, val_loss, val_acc = curve[-1]
    params = [p.detach().clone() for p in model.parameters()]
    return {"curve": curve, "initial_train_loss": curve[0][1], "train_loss": train_loss, "val_loss": val_loss,
            "val_acc": val_acc, "param_norm": math.sqrt(sum(float(p.double().pow(2).sum()) for p in params)),
            "params": params}


# ---------------------------------------------------------------------------------------------- transformer
TRANSFORMER = {"seq_len": 32, "d_model": 48, "n_layers": 2, "n_heads": 4}
TRANSFORMER_BATCH = 16
VAL_BATCHES = 8


@lru_cache(maxsize=1)
def _corpus(seq_len: int) -> tuple[Any, Any]:
    from ..data import read_corpus, split_corpus
    return split_corpus(read_corpus(), seq_len, 0.1)


@torch.no_grad()
def _evaluate_lm(model: nn.Module, val: Any) -> tuple[float, float]:
    from ..data import eval_batches
    losses, accs = [], []
    for x, y in eval_batches(val, VAL_BATCHES, TRANSFORMER_BATCH, rank=0, world_size=1):  # full set, every rank
        logits, loss = model(x, y)
        losses.append(float(loss))
        accs.append(float((logits.argmax(-1) == y).float().mean()))
    return sum(losses) / len(losses), sum(accs) / len(accs)


def train_transformer(ctx: Context, label: str, lr: float, steps: int, seed: int, *, eval_every: int = 0,
                      scheduler: SchedulerFactory | None = None, **optimizer_options: Any) -> dict[str, Any]:
    """Train the project's small GPT (``sharded_optim.app.model``, 2 layers, d=48, 32-byte context, 70k parameters)
    on the shipped corpus; the usual GPT parameter groups (no decay on norms, biases and embeddings)."""
    from ..config import ModelConfig
    from ..data import train_batch
    from ..model import build_model, param_groups
    train, val = _corpus(TRANSFORMER["seq_len"])
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**TRANSFORMER))
    opt = make_optimizer(ctx, param_groups(model, None, separate_no_decay=True), label, lr, **optimizer_options)
    sched = scheduler(opt) if scheduler is not None else None
    curve = []

    def record(step: int, train_loss: float) -> None:
        val_loss, val_acc = _evaluate_lm(model, val)
        curve.append((step, _finite(train_loss), _finite(val_loss), val_acc))

    record(0, float("nan"))
    recent: list[float] = []
    for step in range(steps):
        x, y = train_batch(train, seed, step, 0, TRANSFORMER_BATCH, ctx.rank, ctx.world_size)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        recent = (recent + [loss.item()])[-20:]  # this rank's micro-batch loss: a noisy running estimate
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            record(step + 1, sum(recent) / len(recent))
    _, train_loss, val_loss, val_acc = curve[-1]
    return {"curve": curve, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}


TASKS = ("logreg", "mlp", "transformer")


def run_task(ctx: Context, task: str, label: str, lr: float, steps: int, seed: int, **kwargs: Any) -> dict[str, Any]:
    """One training run of ``task`` (one of :data:`TASKS`); the returned dict has no tensors."""
    if task == "transformer":
        out = train_transformer(ctx, label, lr, steps, seed, **kwargs)
    else:
        out = train_digits(ctx, task, label, lr, steps, seed, **kwargs)
        out.pop("params")
    return out
