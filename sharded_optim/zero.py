"""The ZeRO engine for one (param group, dtype, device): buffers, gradient reduction, parameter all-gather.

Per step, on each rank:

1. gradients reach the rank's shard: ZeRO-2 reduce-scatters each bucket (averaged) as soon as backward has
   produced every gradient in it (post-accumulate-grad hooks, so communication overlaps the rest of backward) and
   frees the full gradients; ZeRO-1 all-reduces the bucket and keeps its slice; with ``reduce_grads=False`` (a
   DDP-wrapped model, gradients already averaged) the slice is just copied; on one rank it is a copy;
2. the optimizer runs one fused kernel over the local shard (``master``, ``grad``, ``state``);
3. the updated shard is all-gathered back into the flat parameter buffer, which the parameters are views of.

Communication uses ``reduce_scatter`` and ``all_gather`` on NCCL; on gloo, whose implementations of those two
are 2-3x slower, the same data moves through ``all_reduce`` and per-rank ``broadcast``.  Nothing here is
CUDA-specific.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .flat import FlatLayout, bound_views, flatten_into_views, merge_runs, refresh_master_pieces, run_counters
from .kernels import native_cpu
from .kernels.int8_state import BLOCK as INT8_BLOCK
from .kernels.stats import sumsq
from .state_storage import StateStorage, layout_options
from .zero_grads import GradientReduction, _Pending

LOW_PRECISION = (torch.bfloat16, torch.float16)

# One rank: a parameter at least this large is updated by a kernel call of its own that reads its gradient where
# autograd left it, instead of being copied into the flat buffer first (8 bytes/element of the ~28 a step moves).
# The threshold is where a copy costs more than the extra kernel call: a run costs ~0.3-0.5 ms of host time on this
# project's 2-core CPU (measured: 67 runs of a 100-tensor list took 55 ms against 18 ms for torch's fused AdamW), the
# time ~1M fp32 elements take to copy there; on a GPU ~50 us (an H200 with torch 2.11: 100 runs of a 289-tensor list
# made the step host-bound), the time 32M elements take to copy at 4 TB/s.
DIRECT_MIN_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 25}

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old names.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class FlatParamGroup(GradientReduction):
    """Flat buffers and communication for the parameters of one (param group, dtype, device).

    ``master`` (the compute-dtype copy of this rank's shard; a view of the parameter buffer when no copy is needed),
    ``grad`` (this rank's averaged gradient shard) and ``state[key]`` are 1-D tensors of ``layout.local_numel``
    elements, so each fused update is a single kernel call.
    """

    keeps_dtensor_state = False   # state_dict() gathers the shards into full tensors (fsdp.py's runtime does not)

    def __init__(self, params: list[Tensor], *, state_keys: tuple[str, ...], process_group: Any, world: int,
                 rank: int, zero_stage: int, bucket_numel: int | None, master_weights: bool, reduce_grads: bool,
                 grad_reduce_dtype: torch.dtype | None, gather_dtype: torch.dtype | None, overlap: bool,
                 state_precision: str = "fp32", tag_base: int = 0, native: bool = False):
        self.params = list(params)
        self.tag_base = tag_base   # point-to-point tags of this runtime's buckets: distinct per runtime (zero_grads)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.process_group = process_group
        self.world, self.rank = world, rank
        self.zero_stage = zero_stage
        self.reduce_grads = reduce_grads and world > 1
        # blockwise 8-bit state: parameters and shard boundaries on block boundaries (state_storage)
        self.layout = FlatLayout([p.shape for p in params], world, rank, bucket_numel if world > 1 else None,
                                 **layout_options(state_precision))
        self.compute_dtype = torch.float32 if (self.dtype in LOW_PRECISION and master_weights) else self.dtype
        self.grad_dtype = grad_reduce_dtype or self.compute_dtype
        self.gather_dtype = gather_dtype or self.dtype
        self.full = flatten_into_views(self.params, self.layout, self.dtype, self.device)
        self._bound = bound_views(self.params)  # what rebind_replaced_storage() compares against
        self.rebinds = 0  # parameters re-pointed into the flat buffer after a client replaced their storage
        self._real_ranges = self._compute_real_ranges()  # the layout is fixed: computed once
        if world == 1 and self.compute_dtype == self.dtype:
            self.master = self.full  # update the parameters in place: no copy at all
        else:
            self.master = torch.empty(self.layout.local_numel, dtype=self.compute_dtype, device=self.device)
            for bucket in self.layout.buckets:
                self.master[self.layout.bucket_local_range(bucket)].copy_(self.full[self.layout.bucket_rank_range(bucket)])
        # a separate master exists for low-precision parameters (a copy worth saving) or for shards (a slice)
        self.has_master_copy = self.compute_dtype != self.dtype
        self.grad = torch.zeros(self.layout.local_numel, dtype=self.grad_dtype, device=self.device)
        # the state is stored in ``state_precision`` (kernels.low_precision, kernels.int8_state): bf16 halves it,
        # int8 keeps one byte per element plus an fp32 scale per block (``scales``); the math stays fp32
        self.state_precision = state_precision
        self.storage = StateStorage(self.layout.local_numel, state_keys, state_precision, self.compute_dtype,
                                    self.device)
        self.state, self.scales = self.storage.state, self.storage.scales
        # Host-side per-parameter counters; state[p]["step"] are 0-d views of these, so writes through the
        # torch.optim-style state are seen here (int64: no saturation at 2**24).
        self.steps = torch.zeros(len(params), dtype=torch.int64)
        self.mu_products = torch.ones(len(params), dtype=torch.float64)
        # gradient-reduction bookkeeping
        self._ready = [0] * len(self.layout.buckets)
        self._next_launch, self._backward_open = 0, False   # buckets launch in order (zero_grads)
        self._reduced = [False] * len(self.layout.buckets)
        self._pending: list[_Pending] = []
        self._staging_free: list[Tensor] = []   # reusable reduction buffers (zero_grads.STAGING_BUFFERS)
        self._staging_made = 0
        self._bucket_gaps = self._staging_gaps()
        self._hooks: list[Any] = []
        self.sync_enabled = True
        self._versions = [p._version for p in self.params]
        self._grad_pieces = self._gradient_pieces()  # the layout is fixed: where each gradient lands, computed once
        # one rank: slots whose gradient the update reads in place (see DIRECT_MIN_NUMEL); their region of ``grad``
        # is never written and stays zero, so norms over ``grad`` plus these tensors count each element once
        threshold = DIRECT_MIN_NUMEL.get(self.device.type)
        # one rank, fp32 on CPU: every gradient is read in place by the multi-tensor kernel (kernels.native_cpu),
        # one call per run, no copy; ``native`` says the caller's variant and kernel mode allow it
        self.native = (native and world == 1 and self.device.type == "cpu" and state_precision == "fp32"
                       and self.dtype == self.compute_dtype == self.grad_dtype == torch.float32
                       and native_cpu.enabled())
        # (8-bit state: only a whole number of blocks, since a run covers whole blocks and the kernel would read a
        # partial last block's padding beyond the gradient; slots start on blocks)
        self._direct_slots = {s for s, slot in enumerate(self.layout.slots)
                              if world == 1 and threshold is not None and (slot.numel >= threshold or self.native)
                              and (state_precision != "int8" or slot.numel % INT8_BLOCK == 0)}
        self._direct: dict[int, Tensor] = {}   # this step's in-place gradients, by slot
        self._table: Tensor | None = None       # native: this step's gradient segments (step_table)
        self._stale_direct: set[int] = set()   # in-place slots whose region of ``grad`` a copy wrote since
        # gloo's reduce_scatter and all_gather are 2-3x slower than its all_reduce and broadcast (25 MiB bucket,
        # 2 ranks: reduce_scatter 57.8 ms vs all_reduce 19.8 ms; all_gather 24.1 ms vs one broadcast per rank
        # 10.9 ms), so on gloo the same data movement goes through those; NCCL keeps the real collectives.
        self._gloo = world > 1 and dist.get_backend(process_group) == "gloo"
        self._scatters = self.zero_stage >= 2 and not self._gloo  # reduce-scatter straight into the shard
        self._exchanges = self.zero_stage >= 2 and self._gloo   # reduce-scatter by send/recv (zero_grads)
        self._ranks = [dist.get_global_rank(process_group, r) for r in range(world)] if world > 1 else [0]
        self._gathers: dict[int, tuple[Any, Tensor | None, Tensor]] = {}  # bucket -> in-flight all-gather
        # partial sums (gradient norm, statistics) are summed over this group: the shards are disjoint in it
        self.reduce_group = process_group if world > 1 else None
        if self.reduce_grads and overlap:
            self._register_hooks()

    # ----------------------------------------------------------------------------------------------- views
    def state_values(self, key: str) -> Tensor:
        """This rank's shard of state ``key`` as values in the compute dtype (:meth:`StateStorage.values`)."""
        return self.storage.values(key)

    def store_state(self, key: str, values: Tensor) -> None:
        """Store ``values`` (this rank's whole shard of state ``key``), rounding to nearest
        (:meth:`StateStorage.store`)."""
        self.storage.store(key, values)

    def state_args(self, keys: tuple[str, ...], rng: slice) -> tuple[Tensor, ...]:
        """The state arguments of an update kernel over run ``rng`` (:meth:`StateStorage.args`)."""
        return self.storage.args(keys, rng)

    def param_state_view(self, slot_index: int, key: str) -> Tensor:
        """This rank's part of parameter ``slot_index``'s state ``key``: full-shape view when wholly local."""
        return self._param_view(self.state[key], slot_index)

    def _param_view(self, buffer: Tensor, slot_index: int) -> Tensor:
        slot = self.layout.slots[slot_index]
        if self.world == 1:
            return buffer[slot.offset: slot.offset + slot.numel].view(slot.shape)
        for piece in self.layout.pieces:
            if piece.slot == slot_index:
                view = buffer[piece.local_lo: piece.local_lo + piece.hi - piece.lo]
                return view.view(slot.shape) if piece.hi - piece.lo == slot.numel else view
        return buffer[:0]

    def _compute_real_ranges(self) -> list[slice]:
        """Ranges of the local shard that hold parameter elements (padding excluded): this rank's pieces, merged
        where they touch inside one bucket."""
        ranges: list[slice] = []
        bucket_of = [self.layout.slots[q.slot].bucket for q in self.layout.pieces]
        last_bucket = None
        for piece, b in sorted(zip(self.layout.pieces, bucket_of), key=lambda x: x[0].local_lo):
            lo, hi = piece.local_lo, piece.local_lo + piece.hi - piece.lo
            if ranges and b == last_bucket and ranges[-1].stop == lo:
                ranges[-1] = slice(ranges[-1].start, hi)
            else:
                ranges.append(slice(lo, hi))
            last_bucket = b
        return ranges

    # ------------------------------------------------------------------------------------ parameter gather
    def gather_params(self, wait: bool = True) -> None:
        """Write the updated shard back into the flat parameter buffer on every rank.

        With ``wait=False`` the all-gathers stay in flight and :meth:`wait_params` (called from a forward pre-hook
        on first use of a parameter, or before anything else reads the parameters) completes them.
        """
        if self.master is self.full:
            return
        if self.world == 1:
            self.full.copy_(self.master)
            return
        for bucket in self.layout.buckets:
            local = self.master[self.layout.bucket_local_range(bucket)]
            full = self.full[self.layout.bucket_full_range(bucket)]
            if self.gather_dtype == self.dtype:
                mine = self.full[self.layout.bucket_rank_range(bucket)]
                mine.copy_(local)  # casts the master to the parameter dtype
                work = self._gather(full, mine, bucket)
                self._gathers[bucket.index] = (work, None, full)
            else:
                out = torch.empty(bucket.numel, dtype=self.gather_dtype, device=self.device)
                mine = out[self.rank * bucket.shard_numel: (self.rank + 1) * bucket.shard_numel]
                mine.copy_(local)
                work = self._gather(out, mine, bucket)
                self._gathers[bucket.index] = (work, out, full)
        if wait:
            self.wait_params()

    def _gather(self, out: Tensor, mine: Tensor, bucket: Any) -> Any:
        """All-gather the rank slices of ``out`` in place (``mine`` is this rank's slice of ``out``)."""
        if not self._gloo:
            return all_gather(out, mine, group=self.process_group, async_op=True)
        n = bucket.shard_numel
        return [dist.broadcast(out[r * n: (r + 1) * n], src=self._ranks[r], group=self.process_group, async_op=True)
                for r in range(self.world)]

    def wait_params(self, buckets: Iterable[int] | None = None) -> None:
        """Complete in-flight parameter all-gathers (all, or only ``buckets``)."""
        for b in list(self._gathers) if buckets is None else [b for b in buckets if b in self._gathers]:
            work, out, full = self._gathers.pop(b)
            for w in work if isinstance(work, list) else [work]:
                w.wait()
            if out is not None:
                full.copy_(out)

    def buckets_of(self, params: Iterable[Tensor]) -> set[int]:
        """Indices of the buckets that hold any of ``params``."""
        ids = {id(p) for p in params}
        return {slot.bucket for slot in self.layout.slots if id(self.params[slot.index]) in ids}

    # ------------------------------------------------------------------------------- update-time protocol
    def update_runs(self, has_grad: list[bool], uniform_steps: bool = False) -> list[tuple[slice, list[int]]]:
        """Local ranges to update in one kernel call each, with the parameter slots they cover.

        Normally one run covering the whole shard.  Parameters without a gradient (one rank only) are left out,
        and parameters at different step counts (possible after loading a torch.optim state) run separately,
        because the host scalars depend on the step.
        """
        if self._direct and not self.native:   # the native kernel reads in-place gradients within any run
            return self.storage.whole_blocks(self._split_direct(self._runs(has_grad, uniform_steps)))
        return self.storage.whole_blocks(self._runs(has_grad, uniform_steps))

    def _split_direct(self, runs: list[tuple[slice, list[int]]]) -> list[tuple[slice, list[int]]]:
        """Cut each run around the slots whose gradient is read in place: those run alone (one rank)."""
        out: list[tuple[slice, list[int]]] = []
        for rng, slots in runs:
            pending: list[int] = []
            for s in slots:
                slot = self.layout.slots[s]
                if s in self._direct:
                    if pending:
                        out.append((self._span(pending), pending))
                        pending = []
                    out.append((slice(slot.offset, slot.offset + slot.numel), [s]))
                else:
                    pending.append(s)
            if pending:
                out.append((self._span(pending, rng), pending))
        return out

    def _span(self, slots: list[int], rng: slice | None = None) -> slice:
        """The local range of consecutive ``slots`` (one rank), up to ``rng``'s end for the run's last piece."""
        first, last = self.layout.slots[slots[0]], self.layout.slots[slots[-1]]
        stop = rng.stop if rng is not None else last.offset + last.numel
        return slice(first.offset, stop)

    def _runs(self, has_grad: list[bool], uniform_steps: bool) -> list[tuple[slice, list[int]]]:
        whole = [(slice(0, self.layout.local_numel), list(range(len(self.layout.slots))))]
        if self.world > 1 or (uniform_steps and all(has_grad)):
            # sharded: every rank advances every parameter's counter (load_state_dict keeps them equal); the
            # device path keeps one count per runtime and reads no counter here (it would synchronise)
            return whole
        # uniform_steps: parameters without a gradient are left out, as below; counters agree
        steps, mus = run_counters(self.steps, self.mu_products, uniform_steps)
        if not uniform_steps and all(has_grad) and len(set(steps)) <= 1 and len(set(mus)) <= 1:
            return whole
        pieces = sorted(self.layout.pieces, key=lambda q: q.local_lo)
        return merge_runs(((q.local_lo, q.local_lo + q.hi - q.lo, q.slot) for q in pieces), has_grad, steps, mus)

    def ensure_full_buffers(self) -> None:
        """Nothing to do: ``master`` and ``grad`` always cover the whole shard."""

    def prepare_update(self) -> None:
        """Refresh the master copy of any parameter written from outside since the last step.

        ``model.load_state_dict`` (or any in-place write through a parameter) bumps that parameter's version
        counter; our own writes go through the flat buffer and do not.  Without this, a separate master copy would
        silently overwrite the user's new values at the next step.
        """
        if self.master is self.full:
            return
        versions = [p._version for p in self.params]
        if versions == self._versions:
            return
        for s, slot in enumerate(self.layout.slots):
            if versions[slot.index] != self._versions[slot.index]:
                refresh_master_pieces(self.layout, self.master, s, self.params[slot.index].detach().reshape(-1))
        self._versions = versions

    # --------------------------------------------------------------------------------- replaced storage
    def rebind_replaced_storage(self, describe: Callable[[int], str] | None = None) -> bool:
        """Re-bind parameters whose storage a client replaced; True if the caller must rebuild this group
        (:func:`sharded_optim.rebind.rebind_flat_group`)."""
        from .rebind import rebind_flat_group

        return rebind_flat_group(self, describe)

    def local_grad_sumsq(self) -> Tensor:
        """Sum of squares of this rank's gradient shard, in float64 (padding is zero and adds nothing)."""
        if self.native:   # one multi-tensor pass over every slot's segment: in place, or its region of ``grad``
            return native_cpu.sumsq_table(self.step_table())
        # every gradient read in place: ``grad`` holds zeros only (stale copies were zeroed): no pass over it
        total = torch.zeros((), dtype=torch.float64, device=self.device) if len(self._direct) == len(
            self.layout.slots) else sumsq(self.grad)
        for g in self._direct.values():
            total = total + sumsq(g)
        return total

    def stat_ranges(self) -> list[slice]:
        """Ranges of the local shard that hold parameter elements (bucket padding excluded)."""
        return self._real_ranges

    # --------------------------------------------------------------------------------------------- memory
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds, by buffer: each state tensor, ``master`` (when not the parameters' own flat buffer)
        and ``grad_shard``."""
        out = self.storage.bytes()
        if self.master is not self.full:
            out["master"] = self.master.numel() * self.master.element_size()
        out["grad_shard"] = self.grad.numel() * self.grad.element_size()
        return out

    def remove_hooks(self) -> None:
        """Remove the post-accumulate-grad hooks that start bucket reductions during backward."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
