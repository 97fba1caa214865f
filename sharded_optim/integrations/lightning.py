"""Lightning with a :class:`~sharded_optim.ShardedOptimizer`.

Lightning's strategies already follow torch ``ZeroRedundancyOptimizer``'s protocol: ``Strategy.optimizer_state``
calls ``optimizer.consolidate_state_dict()`` on every rank and ``state_dict()`` on global rank 0 only, and
``ShardedOptimizer`` and ``Lookahead`` both have ``consolidate_state_dict``, so checkpoints need nothing more.
Resuming (``trainer.fit(..., ckpt_path=...)``) loads the full state on every rank.  What
:class:`ShardedOptimizerCallback` adds is the check that a DDP strategy meets ``reduce_grads=False``.

Example::

    class Module(L.LightningModule):
        def configure_optimizers(self):
            opt = ShardedOptimizer(self.parameters(), algorithm="adamw", zero_stage=2, reduce_grads=False)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)}

    L.Trainer(strategy="ddp", accelerator="cpu", devices=2, callbacks=[ShardedOptimizerCallback()]).fit(module)
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from . import check_under_ddp, find_sharded


class ShardedOptimizerCallback(Callback):
    """Refuse, when fitting starts, a sharded optimizer that would reduce gradients DDP already averaged."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Under a DDP strategy with two or more processes, refuse a sharded optimizer built with
        ``reduce_grads=True``."""
        if not isinstance(trainer.strategy, DDPStrategy) or trainer.world_size < 2:
            return
        for optimizer in trainer.optimizers:
            opt = find_sharded(optimizer)
            if opt is not None:
                check_under_ddp(opt, "Lightning's DDP strategy")
