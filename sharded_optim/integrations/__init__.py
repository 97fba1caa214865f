"""Integrations with the trainers people already use: HF ``Trainer``/Accelerate and Lightning.

Each submodule imports its framework only when imported itself (``pip install 'sharded-optim[integrations]'``).
What both need from a :class:`~sharded_optim.ShardedOptimizer` under data parallelism:

* ``reduce_grads=False``: both frameworks wrap the model in ``DistributedDataParallel``, which averages the
  gradients itself (our own reduction hooks would race DDP's);
* one-rank checkpoints: the frameworks save the optimizer from rank 0 only, so the state is consolidated on rank 0
  first (``consolidate_state_dict``: Lightning's strategies call it themselves, :mod:`.transformers` adds a
  callback that calls it when ``Trainer`` is about to save).
"""
from __future__ import annotations

from typing import Any

from ..lookahead import Lookahead
from ..optimizer import ShardedOptimizer


def find_sharded(optimizer: Any) -> ShardedOptimizer | Lookahead | None:
    """Our optimizer under the wrappers a framework puts around it (``AcceleratedOptimizer``,
    ``LightningOptimizer``); None when there is none."""
    for _ in range(4):
        if isinstance(optimizer, (ShardedOptimizer, Lookahead)):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def check_under_ddp(optimizer: ShardedOptimizer | Lookahead, framework: str) -> None:
    """Refuse ``reduce_grads=True`` on a sharded optimizer whose model the framework wraps in DDP."""
    inner = optimizer.optimizer if isinstance(optimizer, Lookahead) else optimizer
    if inner.sharded and inner.reduce_grads:
        raise ValueError(f"{framework} wraps the model in DistributedDataParallel, which already averages the "
                         "gradients: build the optimizer with ShardedOptimizer(..., reduce_grads=False)")
