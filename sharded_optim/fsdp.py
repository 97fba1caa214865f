"""FSDP2 / DTensor parameters: the fused update on the local shards, state kept as DTensors.

``torch.distributed.fsdp.fully_shard`` already makes every parameter a ``DTensor`` sharded over the data-parallel
mesh dimension (``Shard(0)``; ``(Replicate(), Shard(0))`` for a 2-D HSDP mesh), so the optimizer state is
sharded for free: sharding it again would only add communication.  :class:`DTensorParamGroup` lays the *local*
shards of one (param group, dtype) end to end in a world-size-1 :class:`~sharded_optim.flat.FlatLayout` and keeps
``master``, ``grad`` and every ``state[key]`` as flat local buffers, so the update is still one fused kernel call.

FSDP2 owns the parameters' storage (its all-gather reads from it), so the parameters are never re-pointed:
gradients are copied in (``collect_grads``), the updated ``master`` is copied back into the local shards
(``gather_params``), and ``master`` follows the shards when something else wrote them (a model checkpoint load).
Large same-dtype shards are instead updated where they live, and come last in the layout: ``master`` and ``grad``
cover only the shards before them until a step copies one (a statistics step, Lookahead).

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

from .flat import FlatLayout, merge_runs, run_counters
from .fsdp_state import DTensorStateExchange
from .kernels import int8_state, native_cpu
from .kernels.stats import sumsq
from .state_storage import StateStorage, layout_options
from .zero import DIRECT_MIN_NUMEL, LOW_PRECISION


def _shard_dims(p: DTensor) -> tuple[int, ...]:
    """Mesh dimensions over which ``p``'s local shards are disjoint."""
    return tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())


class DTensorParamGroup(DTensorStateExchange):
    """The optimizer runtime (same protocol as :class:`sharded_optim.zero.FlatParamGroup`) for DTensor parameters.

    Args:
        params: DTensor parameters of one param group and dtype, all on the same device mesh and sharded over the
            same mesh dimension (FSDP2 parameters of one model always are).
        state_keys: names of the per-element state tensors, in kernel argument order.
        master_weights: keep an fp32 master copy (and fp32 state) for bf16/fp16 parameters.
        state_precision: "fp32" (the compute dtype), "bf16" (:mod:`.kernels.low_precision`: elementwise, so the
            same on FSDP2's row shards as anywhere) or "int8" (:mod:`.kernels.int8_state`) for parameters whose
            rows are whole blocks (:func:`~sharded_optim.kernels.int8_state.effective_precision` decides): FSDP2
            shards whole rows, so blocks never straddle a shard and are the blocks of the unsharded parameter.
    """

    # ShardedOptimizer.state_dict/load_state_dict read this: state stays sharded (DTensors), never gathered
    keeps_dtensor_state = True

    def __init__(self, params: list[Tensor], *, state_keys: tuple[str, ...], master_weights: bool,
                 state_precision: str = "fp32", native: bool = False):
        if not params:
            raise ValueError("params must hold at least one DTensor parameter")
        if state_precision == "int8":
            for i, p in enumerate(params):
                if int8_state.effective_precision("int8", p.shape, row_sharded=True) != "int8":
                    raise ValueError(f"params[{i}] of shape {tuple(p.shape)} cannot keep int8 state under FSDP2: "
                                     f"its rows are not a whole number of {int8_state.BLOCK}-element blocks, so "
                                     "blocks would straddle the row shards (such parameters keep fp32 state)")
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
        self.dtype, self.device = first.dtype, first.to_local().device
        self.compute_dtype = torch.float32 if (self.dtype in LOW_PRECISION and master_weights) else self.dtype
        # Same dtype (no master copy): large local shards are updated where FSDP2 keeps them, from their own local
        # gradient, by a kernel call each, instead of three copies a step (gradient in, parameter in, parameter
        # out: 12 bytes/element of the ~28 an update moves).  zero.DIRECT_MIN_NUMEL says why the threshold.
        # (8-bit state runs over whole blocks, into the padding after a parameter: never in place.)
        # Decided from the global size, never the local one: the order below must be the same on every rank
        # (uneven shards differ in size; per-parameter loops over the slots issue collectives).
        threshold = DIRECT_MIN_NUMEL.get(self.device.type)
        shards = self.mesh.size(dims[0]) if dims else 1
        direct = [not self.has_master_copy and threshold is not None and state_precision != "int8"
                  and p.numel() >= threshold * shards for p in params]
        # Those shards come last in the layout (which lays parameters out last to first: they are listed first), so
        # ``master`` and ``grad`` need only the prefix before them on the common path: 8 bytes per element of a large
        # shard saved, until a step copies one (statistics, Lookahead, a non-contiguous gradient: ensure_full_buffers)
        self.params = [p for p, d in zip(params, direct) if d] + [p for p, d in zip(params, direct) if not d]
        locals_ = [p.to_local() for p in self.params]
        self.layout = FlatLayout([t.shape for t in locals_], 1, 0, None, **layout_options(state_precision))
        n = self.layout.local_numel
        # fp32 on CPU: every shard is read and written in place by the multi-tensor kernel (kernels.native_cpu), one
        # call per run (the order above stays: it must not depend on whether this rank could build the kernel)
        self.native = (native and self.device.type == "cpu" and self.dtype == self.compute_dtype == torch.float32
                       and state_precision == "fp32" and native_cpu.enabled())
        self._direct_slots = {s for s, slot in enumerate(self.layout.slots) if slot.index < sum(direct) or self.native}
        self._in_flat = True   # this step copied gradients into ``grad`` (native runtimes track it for the norm)
        prefix = min((self.layout.slots[s].offset for s in self._direct_slots), default=n)
        self.master = torch.zeros(prefix, dtype=self.compute_dtype, device=self.device)
        self.grad = torch.zeros(prefix, dtype=self.compute_dtype, device=self.device)
        self.state_precision = state_precision
        self.storage = StateStorage(n, state_keys, state_precision, self.compute_dtype, self.device)
        self.state, self.scales = self.storage.state, self.storage.scales
        self.steps, self.mu_products = torch.zeros(len(params), dtype=torch.int64), torch.ones(len(params)).double()
        # partial sums (grad norm, non-finite check, statistics) add up over the shard dimension only: along an
        # HSDP replicate dimension the shards are copies and summing there would count them twice
        self.reduce_group = self.mesh.get_group(dims[0]) if dims else None
        self.sync_enabled = True   # no_sync() toggles it; FSDP2 has its own set_requires_gradient_sync
        self._direct: dict[int, tuple[Tensor, Tensor]] = {}   # this step: slot -> (local param, local grad), flat
        self._stale_direct: set[int] = set()   # in-place slots whose region of ``grad`` a copying step wrote

    # ----------------------------------------------------------------------------------------------- helpers
    def ensure_full_buffers(self) -> None:
        """Grow ``master`` and ``grad`` from the prefix the common path needs to the whole layout (zeros beyond);
        for callers that read ``master`` whole (Lookahead's slow weights)."""
        n = self.layout.local_numel
        if self.grad.numel() == n:
            return
        for name in ("master", "grad"):
            old = getattr(self, name)
            new = torch.zeros(n, dtype=old.dtype, device=old.device)
            new[:old.numel()].copy_(old)
            setattr(self, name, new)

    def _range(self, slot_index: int) -> slice:
        slot = self.layout.slots[slot_index]
        return slice(slot.offset, slot.offset + slot.numel)

    def _local(self, slot_index: int) -> Tensor:
        # fetched afresh every time: FSDP2 may re-point a sharded parameter's local tensor (lazy init, to_empty)
        return self.params[self.layout.slots[slot_index].index].to_local()

    # ------------------------------------------------------------------------------------------------ views
    def state_values(self, key: str) -> Tensor:
        """The local state ``key`` as compute-dtype values (:meth:`StateStorage.values`)."""
        return self.storage.values(key)

    def store_state(self, key: str, values: Tensor) -> None:
        """Store ``values`` as the local state ``key``, rounding to nearest (:meth:`StateStorage.store`)."""
        self.storage.store(key, values)

    def state_args(self, keys: tuple[str, ...], rng: slice) -> tuple[Tensor, ...]:
        """The state arguments an update kernel over run ``rng`` takes (:meth:`StateStorage.args`)."""
        return self.storage.args(keys, rng)

    def param_state_view(self, slot_index: int, key: str) -> Tensor:
        """State ``key`` of parameter ``slot_index`` as a DTensor (live view) with the parameter's sharding."""
        return self._as_dtensor(self.state[key], slot_index)

    @property
    def has_master_copy(self) -> bool:
        """True when the update runs on an fp32 copy of bf16/fp16 parameters (``compute_dtype`` differs from
        ``dtype``)."""
        return self.compute_dtype != self.dtype

    def _as_dtensor(self, buffer: Tensor, slot_index: int) -> Tensor:
        """Parameter ``slot_index``'s range of the local ``buffer`` as a DTensor with the parameter's sharding (a
        view of ``buffer``)."""
        return self._wrap(buffer[self._range(slot_index)], slot_index)

    def _wrap(self, local: Tensor, slot_index: int) -> Tensor:
        p = self.params[self.layout.slots[slot_index].index]
        return DTensor.from_local(local.view(self.layout.slots[slot_index].shape), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())

    # ------------------------------------------------------------------------------------ update protocol
    def collect_grads(self, in_place: bool = True) -> list[bool]:
        """Copy the local gradient shards (already reduced by FSDP2) into ``grad``; report which exist.

        Large same-dtype shards are not copied when ``in_place``: the update reads them where they are (see
        ``_direct_slots``); a statistics step (``in_place=False``) copies everything, its sums read ``grad``."""
        has_grad = []
        self._direct = {}
        for s, slot in enumerate(self.layout.slots):
            p = self.params[slot.index]
            dst = self.grad[self._range(s)]   # empty beyond the prefix while the buffers have not grown
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
            if in_place and s in self._direct_slots and g.is_contiguous() and local.is_contiguous() and (
                    not self.native or g.dtype == torch.float32):
                self._direct[s] = (local.view(-1), g.view(-1))
                if s in self._stale_direct:
                    dst.zero_()
                    self._stale_direct.discard(s)
            else:
                if dst.numel() != slot.numel:
                    self.ensure_full_buffers()
                    dst = self.grad[self._range(s)]
                dst.copy_(g.reshape(-1))
                if s in self._direct_slots:
                    self._stale_direct.add(s)
            has_grad.append(True)
        self._in_flat = len(self._direct) < sum(has_grad)
        return has_grad

    def update_runs(self, has_grad: list[bool], uniform_steps: bool = False) -> list[tuple[slice, list[int]]]:
        """Local ranges for one kernel call each, with their slots; one run over everything in the usual case.

        Empty local shards are kept in the runs (an empty range costs nothing) so that their step counters move
        with everyone else's: ``step`` must agree on all ranks for DCP.
        """
        # uniform_steps: the device path, counters agree and are not read (that would synchronise)
        steps, mus = run_counters(self.steps, self.mu_products, uniform_steps)
        if all(has_grad) and len(set(steps)) <= 1 and len(set(mus)) <= 1 and (self.native or not self._direct):
            return [(slice(0, self.layout.local_numel), list(range(len(self.layout.slots))))]
        # slots are in increasing offset order; in-place slots run alone
        pieces = ((slot.offset, slot.offset + slot.numel, s) for s, slot in enumerate(self.layout.slots))
        alone = () if self.native else self._direct   # the native kernel reads in-place shards within any run
        return self.storage.whole_blocks(merge_runs(pieces, has_grad, steps, mus, alone=alone))

    def prepare_update(self) -> None:
        """Make ``master`` agree with the local shards, which others may have written (a model checkpoint load).

        Same dtype: copy the shards in (as cheap as checking them).  With an fp32 master for bf16/fp16 shards:
        keep the master where the shard still holds the master's rounding, re-read the slots where it does not
        (re-reading every step would throw away the master's extra precision).  Version counters cannot tell:
        DCP and FSDP2's state-dict hooks write the shards without always bumping them.
        """
        for s in range(len(self.layout.slots)):
            if not self._through_master(s):
                continue   # updated where it lives, or not at all: no master region is used this step
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
            if self._through_master(s):   # in-place shards already hold their new values
                self._local(s).copy_(self.master[self._range(s)].view(slot.shape))

    def _through_master(self, slot_index: int) -> bool:
        """Whether this step updates parameter ``slot_index`` through ``master``: not in place, and inside the
        buffer (a large shard beyond the prefix that is not in place had no gradient: nothing updates it)."""
        return slot_index not in self._direct and self._range(slot_index).stop <= self.master.numel()

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

    def grad_table(self, rng: slice, slots: list[int]) -> tuple[Tensor, int] | None:
        """Native runtimes: run ``rng``'s segments for :func:`.kernels.native_cpu.update` (offsets relative to
        ``rng``: base 0), each in-place shard with its own gradient and parameter, the others in ``grad`` and
        ``master``; else None."""
        if not self.native:
            return None
        rows: list[tuple[int, Tensor, Tensor | None]] = []
        for s in slots:
            at = self.layout.slots[s].offset - rng.start
            rows.append((at, self._direct[s][1], self._direct[s][0]) if s in self._direct
                        else (at, self.grad[self._range(s)], None))
        return native_cpu.segment_table(rows, self.master[rng] if self.master.numel() else None), 0

    def param_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The parameter values a run's update writes: the local shard itself when updated in place."""
        if len(slots) == 1 and slots[0] in self._direct:
            return self._direct[slots[0]][0]
        return self.master[rng]

    def grad_tensors(self) -> list[Tensor]:
        """Every tensor holding this step's gradient elements (``grad`` and the in-place shards)."""
        return [self.grad, *(g for _p, g in self._direct.values())]

    def local_grad_sumsq(self) -> Tensor:
        """Sum of squares of the local gradient shards in float64 (summed over ``reduce_group`` by the caller), by
        :func:`~sharded_optim.kernels.stats.sumsq`: a float64 ``vector_norm`` took 64 of a 97 ms step here."""
        if self.native:   # one multi-tensor pass over the in-place shards; ``grad`` only if written this step
            total = native_cpu.sumsq([g for _p, g in self._direct.values()])
            return total + sumsq(self.grad) if self._in_flat else total
        total = sumsq(self.grad)
        for _p, g in self._direct.values():
            total = total + sumsq(g)
        return total

    def stat_ranges(self) -> list[slice]:
        """The local ranges holding parameter elements (alignment padding excluded: with 8-bit state every
        parameter starts a block); none when this rank holds no elements."""
        return self.layout.slot_ranges()

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds, by buffer: each state tensor, ``master`` and ``grad_shard``."""
        out = self.storage.bytes()
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
