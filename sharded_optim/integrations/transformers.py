"""HF ``Trainer`` (and Accelerate) with a :class:`~sharded_optim.ShardedOptimizer`.

``Trainer._save_checkpoint`` calls ``optimizer.state_dict()`` on the process that saves (``args.should_save``:
rank 0) and on no other, right after the step whose ``on_step_end`` / ``on_epoch_end`` callbacks set
``control.should_save`` (with ``save_strategy="best"`` the decision comes after ``on_evaluate``).  Under ZeRO-1/2
that call must not gather: :class:`ShardedOptimizerCallback` consolidates the state on rank 0, on every rank, in
those callbacks, so rank 0's ``state_dict()`` returns the consolidated copy.  Loading needs nothing: every rank
loads the full file (``load_state_dict`` takes this rank's shard of it).

Example::

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64))
    opt = ShardedOptimizer(model.parameters(), algorithm="adamod", lr=1e-3, zero_stage=2, reduce_grads=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[ShardedOptimizerCallback()])
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from . import check_under_ddp, find_sharded


class ShardedOptimizerCallback(TrainerCallback):
    """Consolidate a sharded optimizer's state onto the saving rank whenever ``Trainer`` is about to save it,
    and refuse, at the start of training, a setup that would double-reduce gradients under DDP."""

    def __init__(self, to: int = 0):
        self.to = to

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """In distributed (DDP) training, refuse a sharded optimizer built with ``reduce_grads=True``."""
        opt = find_sharded(optimizer)
        if opt is not None and args.world_size > 1 and args.parallel_mode.value == "distributed":
            check_under_ddp(opt, "Trainer")

    def _consolidate(self, args: Any, optimizer: Any) -> None:
        opt = find_sharded(optimizer)
        if opt is not None and not args.save_only_model:
            opt.consolidate_state_dict(to=self.to)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Consolidate the state onto rank ``to`` when ``Trainer`` saves after this step."""
        if control.should_save:  # set by DefaultFlowCallback, which runs before user callbacks
            self._consolidate(args, optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Consolidate the state onto rank ``to`` when ``Trainer`` saves at this epoch's end."""
        if control.should_save:
            self._consolidate(args, optimizer)

    def on_evaluate(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """With ``save_strategy='best'``, consolidate now: whether to save is decided after this callback."""
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            self._consolidate(args, optimizer)  # whether it saves is decided after this callback
