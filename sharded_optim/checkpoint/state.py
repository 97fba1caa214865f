"""What the save and the load side share: the optimizer's parameters as checkpoint entries (name, group, runtime,
how the state is sharded), the DCP entries of their state, and the ranks' agreement on success or failure.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import rules
from ..kernels import int8_state
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


def _tensor_map(opt: ShardedOptimizer, la: Lookahead | None, params: list[_Param], buffer_of: Any,
                compressed: set[str]) -> dict[str, Tensor]:
    """DCP entries of the optimizer state; ``buffer_of(entry, key, live)`` gives the rank-local flat buffer
    (the live one when saving, a scratch one like ``live`` when loading) or, for non-flat runtimes, the tensor
    itself.  The state of the parameters named in ``compressed`` is 8-bit codes plus block scales
    (:func:`_codes_and_scales`); that of the others, values."""
    out: dict[str, Tensor] = {}
    values: dict[tuple[int, str], Tensor] = {}
    for entry in params:
        if entry.name in compressed:
            out.update(_codes_and_scales(opt, entry, buffer_of))
        keys = [] if entry.name in compressed else list(_state_keys(opt, entry))
        for key in keys + ([MASTER_KEY] if entry.has_master else []):
            live = entry.rt.master if key == MASTER_KEY else (_flat_state(entry.rt, key, values) if entry.flat
                                                              else _dtensor_state(opt, entry, key))
            out[f"optim.{entry.name}.{key}"] = _describe(entry, buffer_of(entry, key, live))
        if la is not None:
            if not entry.flat:
                raise NotImplementedError("Lookahead checkpoints need flat (non-DTensor) parameters")
            out[f"lookahead.{entry.name}.{SLOW_KEY}"] = _describe(entry, buffer_of(entry, SLOW_KEY,
                                                                                   la._slow[id(entry.rt)]))
    return out


SCALES_SUFFIX = "_block_scales"   # DCP key of an 8-bit state's block scales: optim.<param>.<state key><suffix>


def compressed_params(params: list[_Param]) -> set[str]:
    """The parameters whose state a checkpoint saves as 8-bit codes and block scales: those of int8 runtimes."""
    return {e.name for e in params if e.flat and e.rt.state_precision == "int8"}


def _codes_and_scales(opt: ShardedOptimizer, entry: _Param, buffer_of: Any) -> dict[str, Tensor]:
    """DCP entries of one parameter's 8-bit state: per state key its codes (int8/uint8, one per element, sharded as
    the values would be) and its block scales (fp32, one per 256 elements from the parameter's first).

    In an int8 runtime (always, saving) ``buffer_of`` gets the runtime's codes and scales buffers: the 8-bit
    layout puts every piece on a block boundary.  Loading into another precision, it gets codes flat like the
    runtime's values and scales packed per parameter (:meth:`SlotSharding.blocks` ``compact``: neighbouring
    pieces of a layout without blocks may share one).  :func:`decode_loaded` turns them into values."""
    rt, out = entry.rt, {}
    if not entry.flat:   # loading into FSDP2 (only flat runtimes save codes): codes as the parameter is sharded,
        numel = entry.p.numel()   # the scales whole on every rank (a 256th of the elements)
        for key in _state_keys(opt, entry):
            codes = rt.state_as_dtensor(torch.empty(rt.layout.local_numel, device=rt.device,
                                                    dtype=int8_state.codes_dtype(key)), entry.slot)
            out[f"optim.{entry.name}.{key}"] = buffer_of(entry, f"{key}:codes", codes)
            out[f"optim.{entry.name}.{key}{SCALES_SUFFIX}"] = buffer_of(
                entry, f"{key}:scales", torch.empty(-(-numel // int8_state.BLOCK), device=rt.device))
        return out
    blocked = rt.state_precision == "int8"
    blocks = entry.sharding.blocks(int8_state.BLOCK, compact=not blocked)
    for key in _state_keys(opt, entry):
        if blocked:
            codes = buffer_of(entry, f"{key}:codes", rt.state[key])
            scales = buffer_of(entry, f"{key}:scales", rt.scales[key])
        else:
            codes = buffer_of(entry, f"{key}:codes", torch.empty(rt.layout.local_numel, device=rt.device,
                                                                 dtype=int8_state.codes_dtype(key)))
            scales = buffer_of(entry, f"{key}:scales:{entry.name}", torch.empty(blocks.local_numel, device=rt.device))
        out[f"optim.{entry.name}.{key}"] = entry.sharding.sharded(codes)
        out[f"optim.{entry.name}.{key}{SCALES_SUFFIX}"] = blocks.sharded(scales)
    return out


def decode_loaded(opt: ShardedOptimizer, entry: _Param, scratch: dict[tuple[int, str], Tensor]) -> None:
    """After a load: the values of one parameter's 8-bit state, decoded from the codes and scales read into
    ``scratch`` (keys as :func:`_codes_and_scales` named them) into ``scratch[(id(runtime), key)]``, where a load
    of values would have put them."""
    rt = entry.rt
    if not entry.flat:
        first = rt.global_offset(entry.slot)
        for key in _state_keys(opt, entry):
            codes = scratch[(entry.name, f"{key}:codes")]
            values = int8_state.dequantize_range(codes.to_local().reshape(-1), scratch[(entry.name, f"{key}:scales")]
                                                 [first // int8_state.BLOCK:], first)
            scratch[(entry.name, key)] = rt.state_as_dtensor(values, entry.slot, whole=False)
        return
    blocked = rt.state_precision == "int8"
    blocks = entry.sharding.blocks(int8_state.BLOCK, compact=not blocked)
    for key in _state_keys(opt, entry):
        codes = scratch[(id(rt), f"{key}:codes")]
        scales = scratch[(id(rt), f"{key}:scales" if blocked else f"{key}:scales:{entry.name}")]
        values = scratch.setdefault((id(rt), key), torch.zeros(rt.layout.local_numel, dtype=rt.compute_dtype,
                                                                device=rt.device))
        for (lo, hi, local_lo), (first, stop, at) in zip(entry.sharding.local, blocks.local):
            values[local_lo: local_lo + hi - lo] = int8_state.dequantize_range(
                codes[local_lo: local_lo + hi - lo], scales[at: at + stop - first], lo)


def _dtensor_state(opt: ShardedOptimizer, entry: _Param, key: str) -> Tensor:
    """State ``key`` of an FSDP2/DTensor parameter as a checkpoint holds it: the live DTensor (fp32, bf16), or
    for 8-bit state a DTensor of its values (those checkpoints hold values)."""
    if entry.rt.state_precision == "int8":
        return entry.rt.exported_state(key, entry.slot)
    return opt.state[entry.p][key]


def _flat_state(rt: FlatParamGroup, key: str, cache: dict[tuple[int, str], Tensor]) -> Tensor:
    """The local buffer of state ``key`` of ``rt`` that checkpoints of values save from and load into: the state
    itself; for 8-bit state (a load of values, or of codes decoded into values) its fp32 values, one copy per
    runtime, stored back after the load (values decoded from codes lie on the grid and are stored exactly)."""
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
