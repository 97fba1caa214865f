"""Saving a sharded optimizer from one rank, and a clear error instead of a hang when a client tries it.

``state_dict()`` of a ZeRO-1/2 optimizer gathers the state from every rank, so it is a collective.  Clients that
save from rank 0 only (HF ``Trainer``, many hand-written loops) would leave rank 0 inside a gather that the other
ranks never join: a hang, or a crash inside gloo/NCCL.  Two things fix that:

* torch ``ZeroRedundancyOptimizer``'s protocol: ``consolidate_state_dict(to=0)`` on every rank gathers the full
  state once and keeps it on rank ``to``; ``state_dict()`` there returns it without communicating, as long as no
  step or load happened since (a stale copy is never returned).  Lightning's strategies call it by themselves;
  :mod:`sharded_optim.integrations.transformers` calls it for HF ``Trainer``.
* a rendezvous before every gathering call: each rank announces itself in the process group's key-value store
  (the TCPStore that ``init_process_group`` set up, whatever the backend) and waits at most ``timeout_s`` for the
  others.  A rank left alone raises :class:`ConsolidationError`, naming the ranks that did not come and the fix.
  Costs one store ``set`` and one ``wait``: a round trip to the store, milliseconds.
"""
from __future__ import annotations

import datetime
import itertools
from typing import Any

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 30.0
_tags = itertools.count()  # one per optimizer, in construction order: the same on every rank


def new_tag() -> int:
    """A number for a new optimizer that every rank assigns alike (optimizers are built in the same order)."""
    return next(_tags)


class ConsolidationError(RuntimeError):
    """``state_dict()`` or ``consolidate_state_dict()`` was called on some ranks of a sharded optimizer only."""


class Rendezvous:
    """Announce-and-wait over the default store, scoped to one optimizer's process group."""

    def __init__(self, process_group: Any, rank: int, world: int, tag: int):
        self.rank, self.world = rank, world
        ranks = [dist.get_global_rank(process_group, r) for r in range(world)]
        self.prefix = f"sharded_optim/state_dict/{tag}/{'-'.join(map(str, ranks))}/"
        self.round = 0

    @property
    def store(self) -> Any:
        """The default store under this optimizer's prefix, looked up per use: an optimizer that outlives its
        process group (collected at interpreter exit) then holds no store client past ``destroy_process_group``."""
        return dist.PrefixStore(self.prefix, dist.distributed_c10d._get_default_store())

    def arrive(self, what: str, timeout_s: float, hint: str) -> None:
        """Return once every rank of the group arrived at this round; raise ConsolidationError after timeout_s."""
        keys = [f"{self.round}/{r}" for r in range(self.world)]
        store = self.store
        store.set(keys[self.rank], what)
        try:
            store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except RuntimeError:  # DistStoreError (timeout) is a RuntimeError
            came = [r for r, key in enumerate(keys) if store.check([key])]
            # withdraw, so a later call of the same round on the other ranks does not enter a gather without us
            store.delete_key(keys[self.rank])
            missing = [r for r in range(self.world) if r not in came]
            raise ConsolidationError(
                f"{what}() of a sharded optimizer ({self.world} ranks) gathers the state from every rank, but only "
                f"rank(s) {came} called it within {timeout_s:g} s (not: {missing}). {hint}") from None
        self.round += 1


HINT = ("To save from one rank, call optimizer.consolidate_state_dict(to=0) on every rank first and then "
        "state_dict() on rank 0 (HF Trainer: add sharded_optim.integrations.transformers.ShardedOptimizerCallback() "
        "to its callbacks; Lightning's strategies do this themselves), or call state_dict() on every rank. The "
        "wait is optimizer.state_dict_timeout_s.")


def marker(opt: Any) -> tuple[int, int]:
    """What makes a consolidated copy stale: any step (taken or skipped) or load since it was taken."""
    return opt.steps_attempted, getattr(opt, "_loads", 0)


def rendezvous(opt: Any, what: str) -> None:
    """Wait until every rank of ``opt``'s group calls ``what``; a no-op unless the optimizer is sharded."""
    if not opt.sharded:
        return
    rdv = getattr(opt, "_rendezvous", None)
    if rdv is None:
        rdv = opt._rendezvous = Rendezvous(opt.process_group, opt.rank, opt.world_size, opt._rendezvous_tag)
    rdv.arrive(what, float(getattr(opt, "state_dict_timeout_s", DEFAULT_TIMEOUT_S)), HINT)


def held(opt: Any) -> dict[str, Any] | None:
    """The consolidated state held by this rank if it is still current, with the current hyperparameters."""
    kept = getattr(opt, "_consolidated", None)
    if kept is None or kept[0] != marker(opt):
        return None
    state_dict = kept[1]
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": saved["params"]}
              for group, saved in zip(opt.param_groups, state_dict["param_groups"])]
    return {**state_dict, "param_groups": groups}


def validate_to(opt: Any, to: int) -> None:
    """Refuse (``ValueError``) a ``to`` that is not a rank of ``opt``'s process group: an int in ``[0, world_size)``,
    not a bool."""
    if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < opt.world_size:
        raise ValueError(f"to must be a rank of the optimizer's process group (0..{opt.world_size - 1}), got {to!r}")
