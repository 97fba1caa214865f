"""Flat contiguous buffers: where every element of every parameter lives, in the full buffer and in a shard.

The parameters of one (param group, dtype, device) are laid end to end in one flat buffer and the parameters
become views into it.  The buffer is cut into buckets (the unit of gradient reduction and parameter all-gather);
each bucket is padded to a multiple of ``world * ALIGN`` and split into ``world`` equal contiguous slices, slice
``r`` belonging to rank ``r``.  A rank's *local shard* is its slices of all buckets laid end to end, so the state,
the fp32 master copy and the gradient shard are each one contiguous tensor and the update is one kernel call.
A parameter may straddle ranks (like DeepSpeed ZeRO-1/2 and Megatron's distributed optimizer, unlike
ZeroRedundancyOptimizer's greedy whole-parameter assignment): memory stays balanced to within the padding.
With one rank there is a single bucket and the local shard is the whole buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Iterable

import torch
from torch import Tensor
from torch._C import TensorBase

Run = tuple[slice, list[int]]   # a local range updated by one kernel call, and the parameter slots it covers
ALIGN = 64  # elements; every slice boundary is 256-byte aligned for fp32, which keeps vector loads aligned


@dataclass
class ParamSlot:
    """One parameter's place in the full flat buffer."""

    index: int          # position in the group's parameter list
    shape: torch.Size
    numel: int
    offset: int         # first element in the full flat buffer
    bucket: int


@dataclass
class Bucket:
    """A run of whole parameters reduced and gathered together."""

    index: int
    start: int          # first element in the full flat buffer
    numel: int          # padded size, a multiple of world * ALIGN
    shard_numel: int    # numel // world
    local_start: int    # first element of this rank's slice in the local shard buffers
    slots: list[int] = field(default_factory=list)   # indices into FlatLayout.slots


@dataclass
class Piece:
    """Elements ``[lo, hi)`` of flattened parameter ``slot`` live at ``local[local_lo : local_lo + hi - lo]``."""

    slot: int
    lo: int
    hi: int
    local_lo: int


class FlatLayout:
    """Pure bookkeeping: offsets, buckets, this rank's pieces. Holds no tensors.

    ``align``: bucket sizes are multiples of ``world * align`` (so are the shard boundaries); ``slot_align``: every
    parameter starts at a multiple of it (blockwise 8-bit state: blocks then never straddle parameters)."""

    def __init__(self, shapes: list[torch.Size], world: int, rank: int, bucket_numel: int | None,
                 align: int = ALIGN, slot_align: int = 1):
        if world < 1 or not (0 <= rank < world):
            raise ValueError(f"rank {rank} is not in a world of size {world}")
        self.world, self.rank = world, rank
        quantum = world * align
        self.slots: list[ParamSlot] = []
        self.buckets: list[Bucket] = []
        # Gradients arrive in roughly reverse registration order during backward, so fill buckets from the last
        # parameter backwards (as DDP does): the first bucket is complete first and its reduction starts earliest.
        order = list(reversed(range(len(shapes))))
        current: list[int] = []
        current_numel = 0
        groups: list[list[int]] = []
        for i in order:
            n = int(torch.Size(shapes[i]).numel())
            current.append(i)
            current_numel += n
            if bucket_numel is not None and current_numel >= bucket_numel:
                groups.append(current)
                current, current_numel = [], 0
        if current or not groups:
            groups.append(current)
        offset = 0
        local = 0
        slot_of_index: dict[int, int] = {}
        for b, members in enumerate(groups):
            start = offset
            for i in members:
                offset = -(-offset // slot_align) * slot_align   # blockwise state: every parameter starts a block
                shape = torch.Size(shapes[i])
                slot_of_index[i] = len(self.slots)
                self.slots.append(ParamSlot(i, shape, shape.numel(), offset, b))
                offset += shape.numel()
            padded = max(quantum, -(-(offset - start) // quantum) * quantum)
            bucket = Bucket(b, start, padded, padded // world, local,
                            [slot_of_index[i] for i in members])
            self.buckets.append(bucket)
            offset = start + padded
            local += bucket.shard_numel
        self.total_numel = offset
        self.local_numel = local
        self.slot_of_index = slot_of_index
        self.pieces = self._local_pieces()

    def slot_ranges(self) -> list[slice]:
        """The ranges of a world-size-1 layout that hold parameter elements, merged where slots touch (padding
        excluded); empty slots add nothing."""
        ranges: list[slice] = []
        for slot in sorted(self.slots, key=lambda s: s.offset):
            if not slot.numel:
                continue
            if ranges and ranges[-1].stop == slot.offset:
                ranges[-1] = slice(ranges[-1].start, slot.offset + slot.numel)
            else:
                ranges.append(slice(slot.offset, slot.offset + slot.numel))
        return ranges

    def _local_pieces(self) -> list[Piece]:
        pieces = []
        for bucket in self.buckets:
            lo = bucket.start + self.rank * bucket.shard_numel
            hi = lo + bucket.shard_numel
            for s in bucket.slots:
                slot = self.slots[s]
                a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
                if a < b:
                    pieces.append(Piece(s, a - slot.offset, b - slot.offset, bucket.local_start + a - lo))
        return pieces

    def bucket_local_range(self, bucket: Bucket) -> slice:
        """``bucket``'s slice of this rank's local shard buffers."""
        return slice(bucket.local_start, bucket.local_start + bucket.shard_numel)

    def bucket_full_range(self, bucket: Bucket) -> slice:
        """``bucket``'s slice of the full flat buffer (every rank's part and the padding)."""
        return slice(bucket.start, bucket.start + bucket.numel)

    def bucket_rank_range(self, bucket: Bucket) -> slice:
        """This rank's slice of ``bucket`` inside the full flat buffer."""
        lo = bucket.start + self.rank * bucket.shard_numel
        return slice(lo, lo + bucket.shard_numel)

    def local_real_numel(self) -> int:
        """Elements of the local shard that belong to parameters (padding excluded)."""
        return sum(p.hi - p.lo for p in self.pieces)


def flatten_into_views(params: list[Tensor], layout: FlatLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate the full flat buffer, copy the parameters in, and make each parameter a view of it."""
    full = torch.zeros(layout.total_numel, dtype=dtype, device=device)
    for slot in layout.slots:
        p = params[slot.index]
        view = full[slot.offset: slot.offset + slot.numel]
        view.copy_(p.detach().reshape(-1))
        # Re-point the parameter's storage at the flat buffer: the update and the all-gather then write the
        # parameters in place, with no copy back (the same technique as apex's contiguous params).
        p.data = view.view(slot.shape)
    return full


def bound_views(params: list[Tensor]) -> tuple[list[int], list[torch.Size]]:
    """``(data_ptrs, shapes)`` of the parameters: the cheap identity of the flat-buffer views they are bound to.

    ``map`` over the unbound ``TensorBase`` methods: about a third of the cost of a comprehension of
    ``(p.data_ptr(), p.shape)`` tuples on ``nn.Parameter``s (measured, 300 parameters).
    """
    return list(map(TensorBase.data_ptr, params)), list(map(TensorBase.size, params))


def refresh_master_pieces(layout: FlatLayout, master: Tensor, slot_index: int, flat: Tensor) -> None:
    """Take the flattened values ``flat`` of parameter ``slot_index`` into this rank's pieces of ``master``,
    keeping the master's extra precision wherever the value still equals the master's rounding."""
    for piece in layout.pieces:
        if piece.slot == slot_index:
            dst = master[piece.local_lo: piece.local_lo + piece.hi - piece.lo]
            value = flat[piece.lo: piece.hi]
            changed = value != dst.to(value.dtype)
            dst.copy_(torch.where(changed, value.to(dst.dtype), dst))


def run_counters(steps: Tensor, mu_products: Tensor, uniform_steps: bool) -> tuple[list[int], list[float]]:
    """The per-slot step counts and NAdam products that decide where runs split.

    ``uniform_steps`` (the device path: the counters agree and reading them would synchronise): all equal.
    """
    if uniform_steps:
        return [0] * len(steps), [1.0] * len(steps)
    return steps.tolist(), mu_products.tolist()


def merge_runs(pieces: Iterable[tuple[int, int, int]], has_grad: list[bool], steps: list[int], mus: list[float],
               alone: Container[int] = ()) -> list[Run]:
    r"""Merge local pieces ``(lo, hi, slot)``, in increasing ``lo`` order, into runs for one kernel call each.

    A piece joins the previous run when it starts where that run stops and its slot has the same step count
    :math:`t` and NAdam product :math:`\prod_{i \le t} \mu_i` as the run's first slot (the host scalars of an
    update depend on both); pieces of slots without a gradient are left out, and slots in ``alone`` (updated
    where their gradient lies) always run on their own.
    """
    runs: list[Run] = []
    for lo, hi, s in pieces:
        if not has_grad[s]:
            continue
        if runs and s not in alone and runs[-1][1][-1] not in alone:
            rng, slots = runs[-1]
            first = slots[0]
            if rng.stop == lo and steps[first] == steps[s] and mus[first] == mus[s]:
                runs[-1] = (slice(rng.start, hi), slots + [s])
                continue
        runs.append((slice(lo, hi), [s]))
    return runs
