"""FSDP2 / DTensor parameters: the fused update on the local shards, state kept as DTensors.

``torch.distributed.fsdp.fully_shard`` already makes every parameter a ``DTensor`` sharded over the data-parallel
mesh dimension (``Shard(0)``; ``(Replicate(), Shard(0))`` for a 2-D HSDP mesh), so the optimizer state is
sharded for free: sharding it again would only add communication.  :class:`DTensorParamGroup` lays the *local*
shards of one (param group, dtype) end to end in a world-size-1 :class:`~sharded_optim.flat.FlatLayout` and keeps
``master``, ``grad`` and every ``state[key]`` as flat local buffers, so the update is still one fused kernel call.

FSDP2 owns the parameters' storage (its all-gather reads from it), so the parameters are never re-pointed:
gradients are copied in (``collect_grads``), the updated ``master`` is copied back into the local shards
(``gather_params``), and ``master`` follows the shards when something else wrote them (a model checkpoint load).

``self.state[p][key]`` is a DTensor with the parameter's mesh, placements, global shape and stride, a live view of
the flat buffer.  That is what ``torch.distributed.checkpoint`` needs: state held as plain local tensors would be
taken for replicated tensors, so uneven shards would fail to load and even ones would load silently corrupted.
Ranks may hold 0-element shards (a dim smaller than the mesh); their parameters still count their steps, so every
rank reports the same ``step``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .flat import FlatLayout, merge_runs, run_counters
from .kernels.low_precision import state_dtype
from .serialization import MASTER_KEY
from .zero import DIRECT_MIN_NUMEL, LOW_PRECISION


def _shard_dims(p: DTensor) -> tuple[int, ...]:
    """Mesh dimensions over which ``p``'s local shards are disjoint."""
    return tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())


class DTensorParamGroup:
    """The optimizer runtime (same protocol as :class:`sharded_optim.zero.FlatParamGroup`) for DTensor parameters.

    Args:
        params: DTensor parameters of one param group and dtype, all on the same device mesh and sharded over the
            same mesh dimension (FSDP2 parameters of one model always are).
        state_keys: names of the per-element state tensors, in kernel argument order.
        master_weights: keep an fp32 master copy (and fp32 state) for bf16/fp16 parameters.
        state_precision: "fp32" (the compute dtype) or "bf16" (:mod:`.kernels.low_precision`: elementwise, so the
            same on FSDP2's row shards as anywhere).  "int8" is refused: its 256-element blocks would run across
            FSDP2's row shards, whose boundaries move with the world size.
    """

    # ShardedOptimizer.state_dict/load_state_dict read this: state stays sharded (DTensors), never gathered
    keeps_dtensor_state = True

    def __init__(self, params: list[Tensor], *, state_keys: tuple[str, ...], master_weights: bool,
                 state_precision: str = "fp32"):
        if not params:
            raise ValueError("params must hold at least one DTensor parameter")
        if state_precision not in ("fp32", "bf16"):
            raise ValueError(f"state_precision={state_precision!r} is not available for FSDP2/DTensor parameters: "
                             "its blocks of 256 elements would run across FSDP2's row shards, whose boundaries "
                             "move with the world size; use 'bf16' (2 bytes per state element) or 'fp32' for "
                             "that param group")
        for i, p in enumerate(params):
            if not isinstance(p, DTensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a DTensor: a param group cannot mix "
                                "FSDP2/DTensor parameters with regular ones of the same dtype")
        first = params[0]
        self.mesh = first.device_mesh
        dims = _shard_dims(first)
        for i, p in enumerate(params):
            if p.device_mesh != self.mesh or _shard_dims(p) != dims:
                raise ValueError(f"params[{i}] lives on mesh {p.device_mesh} sharded over mesh dims "
                                 f"{_shard_dims(p)}, params[0] on {self.mesh} over {dims}: put parameters of "
                                 "different meshes in different param groups")
        if len(dims) > 1:
            raise NotImplementedError(f"parameters sharded over several mesh dimensions {dims} (placements "
                                      f"{first.placements}) are not supported; FSDP2 and HSDP shard over one")
        self.params = list(params)
        self.dtype = first.dtype
        locals_ = [p.to_local() for p in self.params]
        self.device = locals_[0].device
        self.layout = FlatLayout([t.shape for t in locals_], 1, 0, None)
        self.compute_dtype = torch.float32 if (self.dtype in LOW_PRECISION and master_weights) else self.dtype
        n = self.layout.local_numel
        self.master = torch.zeros(n, dtype=self.compute_dtype, device=self.device)
        self.grad = torch.zeros(n, dtype=self.compute_dtype, device=self.device)
        self.state_precision = state_precision
        stored = self.compute_dtype if state_precision == "fp32" else state_dtype(state_precision)
        self.state: dict[str, Tensor] = {key: torch.zeros(n, dtype=stored, device=self.device) for key in state_keys}
        self.steps = torch.zeros(len(params), dtype=torch.int64)   # per slot, as in FlatParamGroup
        self.mu_products = torch.ones(len(params), dtype=torch.float64)
        # partial sums (grad norm, non-finite check, statistics) add up over the shard dimension only: along an
        # HSDP replicate dimension the shards are copies and summing there would count them twice
        self.reduce_group = self.mesh.get_group(dims[0]) if dims else None
        self.sync_enabled = True   # no_sync() toggles it; FSDP2 has its own set_requires_gradient_sync
        # Same dtype (no master copy): large local shards are updated where FSDP2 keeps them, from their own local
        # gradient, by a kernel call each, instead of three copies a step (gradient in, parameter in, parameter
        # out: 12 bytes/element of the ~28 an update moves).  Their regions of ``master`` and ``grad`` are then
        # unused (``grad``'s stays zero so norms over it count nothing twice).  zero.DIRECT_MIN_NUMEL says why
        # the threshold.
        threshold = DIRECT_MIN_NUMEL.get(self.device.type)
        self._direct_slots = set() if self.has_master_copy or threshold is None else {
            s for s, slot in enumerate(self.layout.slots) if slot.numel >= threshold}
        self._direct: dict[int, tuple[Tensor, Tensor]] = {}   # this step: slot -> (local param, local grad), flat
        self._stale_direct: set[int] = set()   # in-place slots whose region of ``grad`` a copying step wrote

    # ----------------------------------------------------------------------------------------------- helpers
    def _range(self, slot_index: int) -> slice:
        slot = self.layout.slots[slot_index]
        return slice(slot.offset, slot.offset + slot.numel)

    def _local(self, slot_index: int) -> Tensor:
        # fetched afresh every time: FSDP2 may re-point a sharded parameter's local tensor (lazy init, to_empty)
        return self.params[self.layout.slots[slot_index].index].to_local()

    # ------------------------------------------------------------------------------------------------ views
    def state_values(self, key: str) -> Tensor:
        """The local state buffer ``key`` as compute-dtype values: the buffer itself, or a widened copy of bf16
        state (for serialization and statistics; never for updates)."""
        buffer = self.state[key]
        return buffer if buffer.dtype == self.compute_dtype else buffer.to(self.compute_dtype)

    def store_state(self, key: str, values: Tensor) -> None:
        """Write ``values`` into the local state buffer ``key``, rounding to nearest into bf16 state (nothing to do
        when they are the buffer)."""
        if values is not self.state[key]:
            self.state[key].copy_(values)

    def state_args(self, keys: tuple[str, ...], rng: slice) -> tuple[Tensor, ...]:
        """The state slices an update kernel over run ``rng`` takes."""
        return tuple(self.state[k][rng] for k in keys)

    def param_state_view(self, slot_index: int, key: str) -> Tensor:
        """State ``key`` of parameter ``slot_index`` as a DTensor (live view) with the parameter's sharding."""
        return self._as_dtensor(self.state[key], slot_index)

    @property
    def has_master_copy(self) -> bool:
        """True when the update runs on an fp32 copy of bf16/fp16 parameters (``compute_dtype`` differs from
        ``dtype``)."""
        return self.compute_dtype != self.dtype

    def _as_dtensor(self, buffer: Tensor, slot_index: int, dtype: torch.dtype | None = None) -> Tensor:
        """Parameter ``slot_index``'s range of the local ``buffer`` as a DTensor with the parameter's sharding: a
        live view, or with ``dtype`` a converted copy."""
        p = self.params[self.layout.slots[slot_index].index]
        view = buffer[self._range(slot_index)].view(self.layout.slots[slot_index].shape)
        return DTensor.from_local(view if dtype is None else view.to(dtype), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())

    def _exported(self, key: str, slot_index: int) -> Tensor:
        """State ``key`` of one parameter as ``state_dict()`` gives it: a live view, or for bf16 state an fp32
        copy (torch.optim loads it; loading it back rounds to the same bf16 values)."""
        buffer = self.state[key]
        wide = None if buffer.dtype == self.compute_dtype else self.compute_dtype
        return self._as_dtensor(buffer, slot_index, wide)

    def export_entry(self, slot_index: int, with_mu_product: bool) -> dict[str, Tensor]:
        """``ShardedOptimizer.state_dict()``'s entry for one parameter: state as sharded DTensors (DCP's format).

        Present even before the first step: DCP loads into the structure ``state_dict()`` returns, so a fresh
        optimizer built eagerly (``zero_stage > 0``, where DCP's dummy step is not taken) must list every key.
        ``step`` and ``mu_product`` are plain tensors, equal on every rank (DCP saves them as replicated).
        """
        entry: dict[str, Tensor] = {"step": torch.tensor(int(self.steps[slot_index]), dtype=torch.int64)}
        for key in self.state:
            entry[key] = self._exported(key, slot_index)
        if with_mu_product:
            entry["mu_product"] = torch.tensor(float(self.mu_products[slot_index]), dtype=torch.float64)
        if self.has_master_copy:
            entry[MASTER_KEY] = self._as_dtensor(self.master, slot_index)
        return entry

    def import_entry(self, slot_index: int, entry: dict[str, Any] | None, with_mu_product: bool) -> None:
        """Load one parameter's (validated) ``state_dict()`` entry; ``None`` resets it to a fresh state."""
        for key, buffer in self.state.items():
            if entry is None:
                buffer[self._range(slot_index)].zero_()
            else:
                self._import(slot_index, key, entry[key], buffer)
        if entry is not None and self.has_master_copy and MASTER_KEY in entry:
            self._import(slot_index, MASTER_KEY, entry[MASTER_KEY], self.master)
            self._local(slot_index).copy_(self.master[self._range(slot_index)].view(
                self.layout.slots[slot_index].shape))   # the parameter follows its restored master
        step = 0 if entry is None else entry["step"]
        self.steps[slot_index] = int(float(step.item() if isinstance(step, Tensor) else step))
        if with_mu_product:
            self.mu_products[slot_index] = 1.0 if entry is None else float(entry["mu_product"])

    def _import(self, slot_index: int, key: str, value: Tensor, buffer: Tensor) -> None:
        """Copy ``value`` (a DTensor of any placements, or a full logical tensor) into this rank's shard."""
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
        buffer[self._range(slot_index)].copy_(local.reshape(-1))

    # ------------------------------------------------------------------------------------ update protocol
    def collect_grads(self, in_place: bool = True) -> list[bool]:
        """Copy the local gradient shards (already reduced by FSDP2) into ``grad``; report which exist.

        Large same-dtype shards are not copied when ``in_place``: the update reads them where they are (see
        ``_direct_slots``); a statistics step (``in_place=False``) copies everything, its sums read ``grad``."""
        has_grad = []
        self._direct = {}
        for s, slot in enumerate(self.layout.slots):
            p = self.params[slot.index]
            dst = self.grad[self._range(s)]
            g = p.grad
            if g is None:
                dst.zero_()  # no stale gradient may reach the norm or the statistics
                has_grad.append(False)
                continue
            if isinstance(g, DTensor):
                if tuple(g.placements) != tuple(p.placements):
                    g = g.redistribute(p.device_mesh, p.placements)
                g = g.to_local()
            if tuple(g.shape) != tuple(slot.shape):
                raise ValueError(f"parameter {slot.index} of its group has a gradient of shape {tuple(g.shape)} "
                                 f"but a local shard of shape {tuple(slot.shape)}; expected a DTensor gradient")
            local = self._local(s)
            if in_place and s in self._direct_slots and g.is_contiguous() and local.is_contiguous():
                self._direct[s] = (local.view(-1), g.view(-1))
                if s in self._stale_direct:
                    dst.zero_()
                    self._stale_direct.discard(s)
            else:
                dst.copy_(g.reshape(-1))
                if s in self._direct_slots:
                    self._stale_direct.add(s)
            has_grad.append(True)
        return has_grad

    def update_runs(self, has_grad: list[bool], uniform_steps: bool = False) -> list[tuple[slice, list[int]]]:
        """Local ranges for one kernel call each, with their slots; one run over everything in the usual case.

        Empty local shards are kept in the runs (an empty range costs nothing) so that their step counters move
        with everyone else's: ``step`` must agree on all ranks for DCP.
        """
        # uniform_steps: the device path, counters agree and are not read (that would synchronise)
        steps, mus = run_counters(self.steps, self.mu_products, uniform_steps)
        if all(has_grad) and len(set(steps)) <= 1 and len(set(mus)) <= 1 and not self._direct:
            return [(slice(0, self.layout.local_numel), list(range(len(self.layout.slots))))]
        # slots are in increasing offset order; in-place slots run alone
        pieces = ((slot.offset, slot.offset + slot.numel, s) for s, slot in enumerate(self.layout.slots))
        return merge_runs(pieces, has_grad, steps, mus, alone=self._direct)

    def prepare_update(self) -> None:
        """Make ``master`` agree with the local shards, which others may have written (a model checkpoint load).

        Same dtype: copy the shards in (as cheap as checking them).  With an fp32 master for bf16/fp16 shards:
        keep the master where the shard still holds the master's rounding, re-read the slots where it does not
        (re-reading every step would throw away the master's extra precision).  Version counters cannot tell:
        DCP and FSDP2's state-dict hooks write the shards without always bumping them.
        """
        for s in range(len(self.layout.slots)):
            if s in self._direct:
                continue   # updated where it lives: its master region is unused this step
            local = self._local(s).reshape(-1)
            master = self.master[self._range(s)]
            if not self.has_master_copy:
                master.copy_(local)
            elif not torch.equal(master.to(self.dtype), local):
                master.copy_(local)

    def rebind_replaced_storage(self, describe: Any = None) -> bool:
        """Nothing to re-bind: the parameters are never re-pointed and every access fetches ``to_local()`` afresh
        (a replaced local shard is picked up by :meth:`prepare_update`)."""
        del describe
        return False

    def gather_params(self, wait: bool = True) -> None:
        """Write the updated ``master`` back into FSDP2's local shards.

        No communication, so nothing is left in flight whatever ``wait`` says: FSDP2 all-gathers (and overlaps
        that with the forward) itself.
        """
        del wait
        for s, slot in enumerate(self.layout.slots):
            if s not in self._direct:   # in-place shards already hold their new values
                self._local(s).copy_(self.master[self._range(s)].view(slot.shape))

    def wait_params(self, buckets: Iterable[int] | None = None) -> None:
        """Nothing in flight: see :meth:`gather_params`."""

    def buckets_of(self, params: Iterable[Tensor]) -> set[int]:
        """No all-gather buckets of ours (``attach_model`` then registers no forward pre-hook for FSDP2)."""
        del params
        return set()

    def grad_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The gradient a run's update reads: the local shard itself when updated in place, else ``grad``."""
        if len(slots) == 1 and slots[0] in self._direct:
            return self._direct[slots[0]][1]
        return self.grad[rng]

    def param_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The parameter values a run's update writes: the local shard itself when updated in place."""
        if len(slots) == 1 and slots[0] in self._direct:
            return self._direct[slots[0]][0]
        return self.master[rng]

    def grad_tensors(self) -> list[Tensor]:
        """Every tensor holding this step's gradient elements (``grad`` and the in-place shards)."""
        return [self.grad, *(g for _p, g in self._direct.values())]

    def local_grad_sumsq(self) -> Tensor:
        """Sum of squares of the local gradient shards in float64 (summed over ``reduce_group`` by the caller)."""
        total = torch.linalg.vector_norm(self.grad, dtype=torch.float64).square()
        for _p, g in self._direct.values():
            total = total + torch.linalg.vector_norm(g, dtype=torch.float64).square()
        return total

    def stat_ranges(self) -> list[slice]:
        """The local range holding parameter elements, ``[0, real numel)`` (alignment padding excluded); none when this
        rank holds no elements."""
        real = self.layout.local_real_numel()
        return [slice(0, real)] if real else []

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds, by buffer: each state tensor, ``master`` and ``grad_shard``."""
        out = {key: t.numel() * t.element_size() for key, t in self.state.items()}
        out["master"] = self.master.numel() * self.master.element_size()
        out["grad_shard"] = self.grad.numel() * self.grad.element_size()
        return out

    def wait(self) -> None:
        """Nothing in flight: FSDP2 reduced the gradients during backward."""

    def end_step(self) -> None:
        """Forget this step's in-place shards (FSDP2 may re-point them before the next)."""
        self._direct = {}

    def remove_hooks(self) -> None:
        """No hooks were registered."""

    def describe(self) -> dict[str, Any]:
        """Mesh and sharding summary (for logs and tests)."""
        return {"mesh": str(self.mesh), "placements": [str(p.placements) for p in self.params],
                "local_numel": self.layout.local_real_numel()}
