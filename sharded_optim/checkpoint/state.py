"""What the save and the load side share: the optimizer's parameters as checkpoint entries (name, group, runtime,
how the state is sharded), the DCP entries of their state, and the ranks' agreement on success or failure.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import rules
from ..lookahead import Lookahead
from ..optimizer import ShardedOptimizer
from ..zero import FlatParamGroup
from . import io as ckpt_io
from .format import MASTER_KEY, SLOW_KEY, CheckpointCorruptError, CheckpointError


def _unwrap(optimizer: Any) -> tuple[ShardedOptimizer, Lookahead | None]:
    if isinstance(optimizer, Lookahead):
        return optimizer.optimizer, optimizer
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer, None
    raise TypeError(f"optimizer must be a ShardedOptimizer or a Lookahead around one, got "
                    f"{type(optimizer).__name__}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (so that all ranks apply a load, or none does).

    The ranks exchange their errors (one small all-gather), so a rank that did not fail raises the failing
    rank's message, and of the same class: every rank then takes the same decision (fall back, or stop).
    """
    if _distributed():
        mine = None if error is None else (isinstance(error, CheckpointCorruptError), str(error))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
        if failed and error is None:
            r, (corrupt, message) = failed[0]
            raise (CheckpointCorruptError if corrupt else CheckpointError)(f"{what}: failed on rank {r}: "
                                                                            f"{message}")
    if error is not None:
        raise error


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class _Param:
    """One optimizer parameter: its name, group, runtime and how its state is sharded."""

    def __init__(self, name: str, gi: int, p: Tensor, opt: ShardedOptimizer):
        self.name, self.gi, self.p = name, gi, p
        self.rt, self.slot = opt._locate[id(p)]
        self.flat = isinstance(self.rt, FlatParamGroup)
        group = opt.process_group if opt.sharded else None
        self.sharding = ckpt_io.SlotSharding(self.rt, self.slot, group) if self.flat else None
        self.has_master = self.flat and self.rt.master is not self.rt.full and self.rt.compute_dtype != self.rt.dtype


def _params(model: torch.nn.Module, opt: ShardedOptimizer) -> list[_Param]:
    opt._ensure_runtimes()
    opt.wait_params()  # an overlapped all-gather still in flight would race with reading or loading the weights
    if opt.sharded and opt.process_group is not dist.group.WORLD and \
            dist.get_world_size(opt.process_group) != dist.get_world_size():
        raise NotImplementedError("checkpoints of an optimizer sharded over a sub-group of the world are not "
                                  "supported; shard over the world group")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            out.append(_Param(names.get(id(p), f"group{gi}.param{i}"), gi, p, opt))
    seen = set()
    for entry in out:
        if entry.name in seen:
            raise ValueError(f"parameter name {entry.name!r} appears twice among the optimizer's parameters")
        seen.add(entry.name)
    return out


def _state_keys(opt: ShardedOptimizer, entry: _Param) -> tuple[str, ...]:
    return rules.state_keys(opt.algorithm, opt.param_groups[entry.gi])


def _tensor_map(opt: ShardedOptimizer, la: Lookahead | None, params: list[_Param],
                buffer_of: Any) -> dict[str, Tensor]:
    """DCP entries of the optimizer state; ``buffer_of(entry, key, live)`` gives the rank-local flat buffer
    (the live one when saving, a scratch one when loading) or, for non-flat runtimes, the tensor itself."""
    out: dict[str, Tensor] = {}
    values: dict[tuple[int, str], Tensor] = {}
    for entry in params:
        keys = list(_state_keys(opt, entry)) + ([MASTER_KEY] if entry.has_master else [])
        for key in keys:
            live = entry.rt.master if key == MASTER_KEY else (_flat_state(entry.rt, key, values) if entry.flat
                                                              else opt.state[entry.p][key])
            out[f"optim.{entry.name}.{key}"] = _describe(entry, buffer_of(entry, key, live))
        if la is not None:
            if not entry.flat:
                raise NotImplementedError("Lookahead checkpoints need flat (non-DTensor) parameters")
            out[f"lookahead.{entry.name}.{SLOW_KEY}"] = _describe(entry, buffer_of(entry, SLOW_KEY,
                                                                                   la._slow[id(entry.rt)]))
    return out


def _flat_state(rt: FlatParamGroup, key: str, cache: dict[tuple[int, str], Tensor]) -> Tensor:
    """The local buffer a checkpoint saves for state ``key`` of ``rt`` (and loads into): the state itself, or for
    8-bit state its fp32 values, one copy per runtime (exactly on the code grid, so a load stores them exactly;
    the checkpoint is then fp32-sized: compressed checkpoints are not built yet)."""
    if rt.state_precision != "int8":
        return rt.state[key]
    if (id(rt), key) not in cache:
        cache[(id(rt), key)] = rt.state_values(key)
    return cache[(id(rt), key)]


def _describe(entry: _Param, tensor: Tensor) -> Tensor:
    if entry.flat:
        return entry.sharding.sharded(tensor)
    if tuple(tensor.shape) != tuple(entry.p.shape):
        raise NotImplementedError(f"state of parameter {entry.name!r} has shape {tuple(tensor.shape)}, not the "
                                  f"parameter's logical shape {tuple(entry.p.shape)}: cannot checkpoint it")
    return tensor
