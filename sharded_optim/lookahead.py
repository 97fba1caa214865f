"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019) around a :class:`ShardedOptimizer`.

Every ``k`` inner steps the slow weights move towards the fast ones and the fast weights restart from them:

.. math::  \\phi \\leftarrow \\phi + \\alpha(\\theta - \\phi), \\qquad \\theta \\leftarrow \\phi

The slow weights are one more buffer per flat runtime, sharded exactly like the Adam state (each rank keeps only
its slice), and the interpolation runs on the local shard right after the inner update and before the parameter
all-gather, so a synchronisation step costs no extra communication.  The slow weights are a copy of the
parameters taken when the wrapper is constructed (as in the authors' code); the inner optimizer's state is not
reset.  Defaults k=5, alpha=0.5 (the paper's robustness grid covers alpha in {0.5, 0.8}, k in {5, 10}).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .kernels import dispatch
from .optimizer import ShardedOptimizer
from .zero import FlatParamGroup

SLOW_KEY = "slow_param"


class Lookahead:
    """Wrap ``optimizer``; call :meth:`step`, :meth:`zero_grad`, :meth:`state_dict` as on the inner optimizer."""

    def __init__(self, optimizer: ShardedOptimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, ShardedOptimizer):
            raise TypeError(f"Lookahead wraps a ShardedOptimizer, got {type(optimizer).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.optimizer = optimizer
        self.k, self.alpha = k, float(alpha)
        self.inner_steps = 0
        self._slow: dict[int, Tensor] = {}
        optimizer._ensure_runtimes()
        for _, rt in optimizer._all_runtimes():
            self._slow[id(rt)] = rt.master.clone()
        self._remove = optimizer.add_shard_hook(self._on_shard)
        self._sync_now = False

    # the torch.optim surface, delegated
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _on_shard(self, rt: FlatParamGroup, group: dict[str, Any]) -> None:
        if self._sync_now:
            slow = self._slow[id(rt)]
            alpha = torch.tensor(self.alpha, dtype=slow.dtype, device=slow.device)
            dispatch.run(dispatch.LOOKAHEAD_SYNC, self.optimizer.kernel_mode, rt.master, slow, alpha)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        before = self.optimizer.steps_attempted
        skipped_before = sum(self.optimizer.skipped_steps.values())
        self._sync_now = (self.inner_steps + 1) % self.k == 0
        try:
            loss = self.optimizer.step(closure)
        finally:
            self._sync_now = False
        taken = self.optimizer.steps_attempted - before - (sum(self.optimizer.skipped_steps.values()) - skipped_before)
        self.inner_steps += max(taken, 0)
        return loss

    def slow_state(self) -> dict[int, Tensor]:
        """Full logical slow weights per parameter index (gathered when sharded), for checkpoints."""
        out: dict[int, Tensor] = {}
        index = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                rt, slot_index = self.optimizer._locate[id(p)]
                slot = rt.layout.slots[slot_index]
                full = self.optimizer._gather_full(rt, self._slow[id(rt)])
                out[index] = full[slot.offset: slot.offset + slot.numel].view(slot.shape).clone()
                index += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "k": self.k, "alpha": self.alpha,
                "inner_steps": self.inner_steps, SLOW_KEY: self.slow_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("optimizer", "k", "alpha", "inner_steps", SLOW_KEY):
            if key not in state_dict:
                raise ValueError(f"Lookahead state_dict is missing key {key!r}")
        slow = state_dict[SLOW_KEY]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i not in slow or slow[i].numel() != p.numel():
                raise ValueError(f"Lookahead state_dict: slow weights of parameter {i} are missing or have the "
                                 f"wrong size (expected {p.numel()} elements)")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.k, self.alpha, self.inner_steps = int(state_dict["k"]), float(state_dict["alpha"]), \
            int(state_dict["inner_steps"])
        for i, p in enumerate(params):
            rt, slot_index = self.optimizer._locate[id(p)]
            ShardedOptimizer._write_slot(rt, slot_index, self._slow[id(rt)], slow[i].reshape(-1))
