"""FSDP2 state interchange: one parameter's optimizer state as sharded DTensors, out (``state_dict``, DCP) and in.

A mixin of :class:`sharded_optim.fsdp.DTensorParamGroup`, which owns the buffers; kept apart because moving state
between the flat local buffers and DTensors of any placements is its own job (the runtime's is the update).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .flat import FlatLayout
from .serialization import MASTER_KEY
from .state_storage import StateStorage


class DTensorStateExchange:
    """``export_entry`` / ``import_entry`` and their helpers over a DTensor runtime's flat local buffers."""

    params: list[Tensor]
    layout: FlatLayout
    storage: StateStorage
    state: dict[str, Tensor]
    master: Tensor
    steps: Tensor
    mu_products: Tensor
    has_master_copy: bool
    # the runtime's own helpers
    _range: Callable[[int], slice]
    _local: Callable[[int], Tensor]
    _as_dtensor: Callable[[Tensor, int], Tensor]
    _wrap: Callable[[Tensor, int], Tensor]

    def state_as_dtensor(self, values: Tensor, slot_index: int, whole: bool = True) -> Tensor:
        """A DTensor with parameter ``slot_index``'s sharding over ``values``: a whole local flat buffer (its range
        is taken), or with ``whole=False`` the parameter's local elements themselves."""
        return self._as_dtensor(values, slot_index) if whole else self._wrap(values, slot_index)

    def global_offset(self, slot_index: int) -> int:
        """The index, within its parameter, of this rank's first local element (FSDP2 shards are contiguous)."""
        p = self.params[self.layout.slots[slot_index].index]
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return sum(o * s for o, s in zip(offset, p.stride()))

    def exported_state(self, key: str, slot_index: int) -> Tensor:
        """State ``key`` of one parameter as ``state_dict()`` and checkpoints give it: values in the compute dtype,
        a live view when stored so, else a copy (bf16 widened, int8 dequantized: torch.optim loads it, and loading
        it back stores the same values)."""
        return self._wrap(self.storage.range_values(key, self._range(slot_index)), slot_index)

    def export_entry(self, slot_index: int, with_mu_product: bool) -> dict[str, Tensor]:
        """``ShardedOptimizer.state_dict()``'s entry for one parameter: state as sharded DTensors (DCP's format).

        Present even before the first step: DCP loads into the structure ``state_dict()`` returns, so a fresh
        optimizer built eagerly (``zero_stage > 0``, where DCP's dummy step is not taken) must list every key.
        ``step`` and ``mu_product`` are plain tensors, equal on every rank (DCP saves them as replicated).
        """
        entry: dict[str, Tensor] = {"step": torch.tensor(int(self.steps[slot_index]), dtype=torch.int64)}
        for key in self.state:
            entry[key] = self.exported_state(key, slot_index)
        if with_mu_product:
            entry["mu_product"] = torch.tensor(float(self.mu_products[slot_index]), dtype=torch.float64)
        if self.has_master_copy:
            entry[MASTER_KEY] = self._as_dtensor(self.master, slot_index)
        return entry

    def import_entry(self, slot_index: int, entry: dict[str, Any] | None, with_mu_product: bool) -> None:
        """Load one parameter's (validated) ``state_dict()`` entry; ``None`` resets it to a fresh state."""
        rng = self._range(slot_index)
        for key, buffer in self.state.items():
            if entry is None:
                buffer[rng].zero_()   # codes 0: the value 0 in every precision
            else:
                self.import_state(slot_index, key, entry[key])
        if entry is not None and self.has_master_copy and MASTER_KEY in entry:
            self.master[rng].copy_(self._local_part(slot_index, MASTER_KEY, entry[MASTER_KEY]))
            self._local(slot_index).copy_(self.master[self._range(slot_index)].view(
                self.layout.slots[slot_index].shape))   # the parameter follows its restored master
        step = 0 if entry is None else entry["step"]
        self.steps[slot_index] = int(float(step.item() if isinstance(step, Tensor) else step))
        if with_mu_product:
            self.mu_products[slot_index] = 1.0 if entry is None else float(entry["mu_product"])

    def import_state(self, slot_index: int, key: str, value: Tensor) -> None:
        """Store ``value`` (a DTensor of any placements, or a full logical tensor) as parameter ``slot_index``'s
        state ``key`` on this rank, in the state's precision."""
        self.storage.store_range(key, self._range(slot_index), self._local_part(slot_index, key, value))

    def _local_part(self, slot_index: int, key: str, value: Tensor) -> Tensor:
        """This rank's shard of ``value`` (a DTensor of any placements, or a full logical tensor), flat."""
        p = self.params[self.layout.slots[slot_index].index]
        local_shape = self.layout.slots[slot_index].shape
        if isinstance(value, DTensor):
            if value.device_mesh != p.device_mesh:
                raise ValueError(f"state {key!r} is a DTensor on mesh {value.device_mesh}, its parameter is on "
                                 f"{p.device_mesh}")
            if tuple(value.placements) != tuple(p.placements):
                value = value.redistribute(p.device_mesh, p.placements)  # collective: every rank loads together
            local = value.to_local()
        else:  # a full logical tensor (torch.optim or a full state dict): cut this rank's shard out of it
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = value.reshape(p.shape)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        if tuple(local.shape) != tuple(local_shape):
            raise ValueError(f"state {key!r}: the local shard has shape {tuple(local.shape)}, the parameter's "
                             f"local shard {tuple(local_shape)}")
        return local.reshape(-1)
