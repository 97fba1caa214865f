"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019) around a :class:`ShardedOptimizer`.

Every ``k`` inner steps the slow weights move towards the fast ones and the fast weights restart from them:

.. math::  \\phi \\leftarrow \\phi + \\alpha(\\theta - \\phi), \\qquad \\theta \\leftarrow \\phi

The slow weights are one more buffer per flat runtime, sharded exactly like the Adam state (each rank keeps only
its slice), and the interpolation runs on the local shard right after the inner update and before the parameter
all-gather, so a synchronisation step costs no extra communication.  The slow weights are a copy of the
parameters taken when the wrapper is constructed (as in the authors' code); the inner optimizer's state is not
reset.  Defaults k=5, alpha=0.5 (the paper's robustness grid covers alpha in {0.5, 0.8}, k in {5, 10}).

:class:`Lookahead` is a ``torch.optim.Optimizer`` sharing ``param_groups``, ``state`` and ``defaults`` with the
inner optimizer (the same list and dicts, not copies), so LR schedulers (``LambdaLR``, ``OneCycleLR``,
``ReduceLROnPlateau``, ``swa_utils.SWALR``), HF ``Trainer`` and Lightning accept it and whatever they write into a
param group reaches the inner optimizer.  Its own step and state-dict hooks work as on any torch optimizer.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import consolidate
from .kernels import dispatch
from .optimizer import ShardedOptimizer
from .zero import FlatParamGroup

SLOW_KEY = "slow_param"


class Lookahead(Optimizer):
    """Wrap ``optimizer``; call :meth:`step`, :meth:`zero_grad`, :meth:`state_dict` as on the inner optimizer."""

    def __init__(self, optimizer: ShardedOptimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, ShardedOptimizer):
            raise TypeError(f"Lookahead wraps a ShardedOptimizer, got {type(optimizer).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        # torch.optim.Optimizer.__init__ would build param groups of its own: set up only its hook registries
        # and the step-hook patch, and share everything else with the inner optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self.optimizer = optimizer
        self.k, self.alpha = k, float(alpha)
        self.inner_steps = 0
        # slow weights per flat runtime; weak keys: a runtime rebuilt before the first step (parameters moved to
        # another device or dtype) gets fresh slow weights, and its predecessor's go with it
        self._slow_by_rt: weakref.WeakKeyDictionary[FlatParamGroup, Tensor] = weakref.WeakKeyDictionary()
        self._sync_slow_buffers()
        self._remove = optimizer.add_shard_hook(self._on_shard)
        self._sync_now = False
        self._consolidated: tuple[Any, dict[int, Tensor]] | None = None

    # ----------------------------------------------------------------------- the torch.optim surface, shared
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's ``param_groups`` (the same list: what a scheduler writes reaches it)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        """Replace the inner optimizer's ``param_groups``."""
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter ``state`` (the same dict)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        """Replace the inner optimizer's ``state``."""
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's ``defaults`` (the same dict)."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        """Replace the inner optimizer's ``defaults``."""
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its slow weights start as a copy of its parameters."""
        self.optimizer.add_param_group(param_group)
        self._sync_slow_buffers()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or with ``set_to_none``, drop) the gradients through the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    # ------------------------------------------------------------------------------------------ slow weights
    @property
    def _slow(self) -> dict[int, Tensor]:
        """Slow weights by ``id(runtime)`` (the live buffers; the checkpoint code reads and writes them)."""
        return {id(rt): slow for rt, slow in self._slow_by_rt.items()}

    def _sync_slow_buffers(self) -> None:
        """Give every flat runtime that has none a copy of its master (before its first step: the parameters)."""
        self.optimizer._ensure_runtimes()
        for _, rt in self.optimizer._all_runtimes():
            if rt not in self._slow_by_rt:
                rt.ensure_full_buffers()   # an FSDP2 runtime keeps no master room for in-place shards until now
                rt.prepare_update()   # and fills its master from the shards only when a step needs it
                self._slow_by_rt[rt] = rt.master.clone()

    def _on_shard(self, rt: FlatParamGroup, group: dict[str, Any]) -> None:
        if self._sync_now:
            slow = self._slow_by_rt[rt]
            alpha = torch.tensor(self.alpha, dtype=slow.dtype, device=slow.device)
            dispatch.run(dispatch.LOOKAHEAD_SYNC, self.optimizer.kernel_mode, rt.master, slow, alpha)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; on every ``k``-th step taken (skipped steps do not count) also, on the local shard,
        ``slow <- slow + alpha * (fast - slow)`` and ``fast <- slow``.  Returns the closure's loss."""
        self.optimizer._rebind_replaced_storage()  # a runtime rebuilt here needs its slow weights before the update
        self._sync_slow_buffers()
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
        """Full logical slow weights per parameter index (gathered when sharded: a collective), for checkpoints."""
        out: dict[int, Tensor] = {}
        index = 0
        gathered: dict[int, Tensor] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                rt, slot_index = self.optimizer._locate[id(p)]
                slot = rt.layout.slots[slot_index]
                if id(rt) not in gathered:
                    gathered[id(rt)] = self.optimizer._gather_full(rt, self._slow_by_rt[rt])
                out[index] = gathered[id(rt)][slot.offset: slot.offset + slot.numel].view(slot.shape).clone()
                index += 1
        return out

    # ------------------------------------------------------------------------------------------- state dict
    def consolidate_state_dict(self, to: int = 0) -> None:
        """The inner optimizer's :meth:`~ShardedOptimizer.consolidate_state_dict` plus the slow weights (every
        rank calls it; then :meth:`state_dict` on rank ``to`` alone returns the whole state)."""
        self.optimizer.consolidate_state_dict(to)
        if self.optimizer.sharded:
            slow = self.slow_state()
            self._consolidated = (consolidate.marker(self.optimizer), slow) if self.optimizer.rank == to else None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner state dict plus ``k``, ``alpha``, ``inner_steps`` and the full slow weights per parameter index (a
        collective when sharded, unless consolidated onto this rank)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner = self.optimizer.state_dict()  # sharded and not consolidated: the rendezvous with the other ranks
        kept = self._consolidated
        if kept is not None and kept[0] == consolidate.marker(self.optimizer):
            slow = kept[1]
        else:
            slow = self.slow_state()
        state_dict = {"optimizer": inner, "k": self.k, "alpha": self.alpha, "inner_steps": self.inner_steps,
                      SLOW_KEY: slow}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`: the inner state, ``k``, ``alpha``, ``inner_steps``, and this rank's part of each
        parameter's slow weights (all of them checked for presence and size first)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
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
        self._sync_slow_buffers()
        self.k, self.alpha, self.inner_steps = int(state_dict["k"]), float(state_dict["alpha"]), \
            int(state_dict["inner_steps"])
        for i, p in enumerate(params):
            rt, slot_index = self.optimizer._locate[id(p)]
            ShardedOptimizer._write_slot(rt, slot_index, self._slow_by_rt[rt], slow[i].reshape(-1))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
