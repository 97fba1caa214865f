"""Gradient reduction of a ZeRO param group: each gradient reaches this rank's shard of ``grad``, averaged.

ZeRO-2 reduce-scatters each bucket as soon as backward has produced every gradient in it (post-accumulate-grad
hooks, so communication overlaps the rest of backward) and frees the full gradients (on gloo by a send/recv
exchange, :meth:`GradientReduction._exchange`); ZeRO-1 all-reduces the bucket and keeps this rank's slice.  Buckets
are staged in a small pool of reused buffers (:data:`STAGING_BUFFERS`).  With ``reduce_grads=False`` (a
DDP-wrapped model, gradients already averaged) the slice is copied; on one rank large gradients are read where
autograd left them.  With ``world`` ranks the shard holds

    grad = sum_r g_r / world        (pre-divided by ``world`` as DDP does: gloo has no AVG, and sums stay small)

over the rank's slice of each bucket.  :class:`GradientReduction` is the gradient half of
:class:`~sharded_optim.zero.FlatParamGroup`; the buffers and the layout it works on are made there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable

from .flat import FlatLayout
from .kernels import native_cpu

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old names.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Bucket-sized staging buffers kept for reuse across buckets and steps.  A fresh buffer per bucket cost more than the
# reduction on CPU: a 32 MiB bucket is above glibc's largest mmap threshold, so every allocation was a new mapping,
# page-faulted and zero-filled again (2 gloo ranks, 25.2M-parameter MLP: 3 such fills per step took 60-70 ms of a
# 300 ms step).  A bucket launched while every kept buffer is in flight gets one of its own, dropped once reduced:
# waiting for an older reduction instead can deadlock, because ranks whose parameters lack gradients in different
# buckets launch buckets in different orders (tests/test_grad_reduction.py), and gloo's send/recv work cannot be
# polled for completion.  Four kept buffers cover the buckets the benchmark's backward leaves in flight (with two, a
# transient third bucket cost 20 ms a step); they cost 4 buckets of memory between steps at most (as many as were
# ever in flight), against DDP's full-size gradient buckets.
STAGING_BUFFERS = 4


@dataclass
class _Pending:
    """An in-flight gradient reduction of one bucket."""

    work: Any
    staging: Tensor         # the full bucket being reduced (kept alive until the collective completes)
    out: Tensor | None      # where this rank's averaged slice lands (reduce-scatter only)
    accumulate: bool        # add the result into the shard (a later micro-batch) instead of overwriting it
    bucket: int
    buffer: Tensor | None   # the pooled buffer ``staging`` is a view of (None: a transient one), reused once folded
    pieces: list[Tensor] | None = None   # exchange: every rank's piece of this rank's slice, in rank order


class GradientReduction:
    """Hooks, bucket reductions and gradient collection over the attributes a :class:`FlatParamGroup` sets up."""

    params: list[Tensor]
    layout: FlatLayout
    world: int
    device: torch.device
    grad_dtype: torch.dtype
    grad: Tensor
    process_group: Any
    reduce_grads: bool
    sync_enabled: bool
    _ready: list[int]
    _next_launch: int
    _backward_open: bool
    tag_base: int
    _reduced: list[bool]
    _pending: list[_Pending]
    _staging_free: list[Tensor]
    _staging_made: int
    _bucket_gaps: list[list[tuple[int, int]]]
    _hooks: list[Any]
    _scatters: bool
    _exchanges: bool
    _ranks: list[int]
    _grad_pieces: list[list[tuple[Tensor, int | None, int | None]]]
    _direct_slots: set[int]
    native: bool
    _direct: dict[int, Tensor]
    _table: Tensor | None
    _stale_direct: set[int]

    def _register_hooks(self) -> None:
        for slot_index, slot in enumerate(self.layout.slots):
            p = self.params[slot.index]
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(slot.bucket)))

    def _make_hook(self, bucket_index: int):
        def hook(_param: Tensor) -> None:
            if not self.sync_enabled:
                return  # inside no_sync(): gradients accumulate in p.grad until the last micro-batch
            if not self._backward_open:
                self._backward_open = True
                Variable._execution_engine.queue_callback(self._end_backward)
            self._ready[bucket_index] += 1
            self._launch_in_order()
        return hook

    def _launch_in_order(self) -> None:
        """Launch the complete buckets from ``_next_launch`` on, in index order (the order backward completes them).

        Every rank issues its reductions in the same order whatever its own backward produced: a rank whose
        parameters lack gradients in some bucket would otherwise launch the others first, and collectives issued in
        different orders pair the wrong buckets (a size error, or silently wrong sums when sizes agree)."""
        buckets = self.layout.buckets
        while self._next_launch < len(buckets) and \
                self._ready[self._next_launch] == len(buckets[self._next_launch].slots):
            self._launch(self._next_launch)
            self._next_launch += 1

    def _end_backward(self) -> None:
        """Queued by the first hook of a backward: launch, in order, the buckets it has not (parameters without a
        gradient count as zero), as DDP's unused-parameter search does, so every backward reduces every bucket."""
        self._backward_open = False
        for b in range(self._next_launch, len(self.layout.buckets)):
            self._launch(b)
        self._next_launch = 0

    def _launch(self, bucket_index: int) -> None:
        """Average bucket ``bucket_index``'s gradients into this rank's slice, asynchronously."""
        bucket = self.layout.buckets[bucket_index]
        self._ready[bucket_index] = 0
        buffer, pooled = self._take_staging()
        staging = buffer[:bucket.numel]
        for lo, hi in self._bucket_gaps[bucket_index]:
            staging[lo:hi].zero_()  # padding: a reused buffer holds the last bucket's values there
        for s in bucket.slots:
            slot = self.layout.slots[s]
            p = self.params[slot.index]
            dst = staging[slot.offset - bucket.start: slot.offset - bucket.start + slot.numel]
            if p.grad is not None:
                # pre-divide by the world size (as DDP does): gloo has no AVG reduction, and it keeps sums small
                torch.div(p.grad.reshape(-1), self.world, out=dst)
                p.grad = None  # the full gradient is no longer needed: only the shard is kept (ZeRO-2 memory)
            else:
                dst.zero_()
        accumulate = self._reduced[bucket_index]
        out = pieces = None
        if self._exchanges:
            work, pieces = self._exchange(staging, buffer[bucket.numel:], bucket, accumulate)
        elif self._scatters:
            # a later micro-batch lands in a temporary that wait() adds to the shard; the first writes in place
            out = torch.empty(bucket.shard_numel, dtype=self.grad_dtype, device=self.device) if accumulate \
                else self.grad[self.layout.bucket_local_range(bucket)]
            work = reduce_scatter(out, staging, group=self.process_group, async_op=True)
        else:  # ZeRO-1: all-reduce the transient bucket; wait() keeps this rank's slice
            work = dist.all_reduce(staging, group=self.process_group, async_op=True)
        self._pending.append(_Pending(work, staging, out, accumulate, bucket_index, buffer if pooled else None,
                                      pieces))
        self._reduced[bucket_index] = True

    def _exchange(self, staging: Tensor, spare: Tensor, bucket: Any,
                  accumulate: bool) -> tuple[list[Any], list[Tensor]]:
        """A reduce-scatter by point-to-point exchange (ZeRO-2 on gloo): send every other rank its slice of the
        bucket, receive this rank's slice from each of them; :meth:`_sum_exchanged` adds them up.

        The same bytes as a ring reduce-scatter, but gloo's ``all_reduce`` and ``reduce_scatter`` are 1.6-4x slower
        than its send/recv (``bench/gloo_collectives.py``, 2 ranks, 32 MiB bucket, one thread each: send/recv + add
        12-14 ms, all_reduce 22-27 ms, reduce_scatter 40-46 ms).  The first piece received lands in the gradient
        shard itself (unless a later micro-batch adds to it), the others in ``spare``, so two ranks need no buffer
        beyond the bucket.  The tag names the runtime and the bucket, so reductions in flight together never take
        each other's messages.
        Returns the works and every rank's piece in rank order (this rank's own is its slice of ``staging``)."""
        n, works, pieces = bucket.shard_numel, [], []
        shard = None if accumulate else self.grad[self.layout.bucket_local_range(bucket)]
        for r in range(self.world):
            if r == self.rank:
                pieces.append(staging[r * n:(r + 1) * n])
                continue
            if shard is not None:
                piece, shard = shard, None
            else:
                piece, spare = spare[:n], spare[n:]
                if piece.numel() < n:   # a micro-batch after the first: no room was kept for it
                    piece = torch.empty(n, dtype=self.grad_dtype, device=self.device)
            peer = self._ranks[r]
            tag = self.tag_base + bucket.index
            works.append(dist.isend(staging[r * n:(r + 1) * n], peer, group=self.process_group, tag=tag))
            works.append(dist.irecv(piece, peer, group=self.process_group, tag=tag))
            pieces.append(piece)
        return works, pieces

    def _take_staging(self) -> tuple[Tensor, bool]:
        """A buffer of the largest bucket's size, and whether it returns to the pool (see :data:`STAGING_BUFFERS`):
        a free pooled one, a new pooled one while fewer than the pool's size exist, else a transient one."""
        if self._staging_free:
            return self._staging_free.pop(), True
        numel = max(b.numel for b in self.layout.buckets)
        if self._exchanges:   # room for the pieces the other ranks send beyond the first (:meth:`_exchange`)
            numel += (self.world - 2) * max(b.shard_numel for b in self.layout.buckets)
        pooled = self._staging_made < STAGING_BUFFERS
        self._staging_made += pooled
        return torch.empty(numel, dtype=self.grad_dtype, device=self.device), pooled

    def collect_grads(self, in_place: bool = True) -> list[bool]:
        """Make ``self.grad`` hold this rank's averaged gradient shard; return which params had a gradient.

        One rank: large parameters' gradients are not copied but read in place by the update (``in_place=False``
        copies them too: a statistics step reads ``grad`` only).

        With one rank, parameters without a gradient are reported so the optimizer can skip them (torch.optim
        semantics).  With several ranks every parameter is updated, a missing gradient counting as zero (as in
        DeepSpeed): whether a gradient exists is a per-rank fact and the shards must stay in lock-step.
        """
        has_grad = [True] * len(self.layout.slots)
        self._table = None   # this step's segments (native runtimes): built again from this step's gradients
        if self.world == 1 or not self.reduce_grads:
            dsts: list[Tensor] = []
            srcs: list[Tensor] = []
            for s, slot in enumerate(self.layout.slots):
                g = self.params[slot.index].grad
                if g is None:
                    has_grad[s] = False
                    self._zero_local_pieces(s)  # no stale gradient may reach the norm or the statistics
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"parameter {slot.index} of its group has a sparse gradient; "
                                       "ShardedOptimizer supports dense gradients only")
                # (not when ``g`` is our own region of ``grad``, handed over by a copying step: that region is
                # read in ``grad``, and zeroing it as stale would wipe this very gradient)
                if in_place and s in self._direct_slots and g.is_contiguous() and (
                        not self.native or g.dtype == torch.float32) and g.data_ptr() != self._own_grad_ptr(s):
                    self._direct[s] = g.view(-1)   # read by the update where autograd left it: no copy
                    if s in self._stale_direct:   # copied by a statistics step: zero, or norms count it twice
                        self._zero_local_pieces(s)
                        self._stale_direct.discard(s)
                    continue
                if s in self._direct_slots:
                    self._stale_direct.add(s)
                for dst, lo, hi in self._grad_pieces[s]:
                    if lo is None:  # the whole parameter: the shapes match, no reshape
                        if g.data_ptr() != dst.data_ptr():  # else p.grad already is our buffer: no copy at all
                            dsts.append(dst)
                            srcs.append(g)
                    else:
                        dsts.append(dst)
                        srcs.append(g.reshape(-1)[lo:hi])
            # one multi-tensor copy instead of a Python loop of copies: the loop cost ~10 us of host time per
            # parameter, which on a GPU left the device idle for most of the step
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            if self.world == 1:
                self._hand_over_grad_views(has_grad)
            return has_grad
        for b, reduced in enumerate(self._reduced):
            if not reduced:  # no hook fired (hooks disabled, or no gradient reached this bucket on this rank)
                self._launch(b)
        self.wait()
        return has_grad

    def wait(self) -> None:
        """Wait for every in-flight reduction and fold its result into the gradient shard."""
        for pending in self._pending:
            self._complete(pending)
        self._pending.clear()

    def _complete(self, pending: _Pending) -> None:
        """Wait for one reduction, fold its result into the gradient shard, and free its staging buffer."""
        for work in pending.work if isinstance(pending.work, list) else [pending.work]:
            work.wait()
        bucket = self.layout.buckets[pending.bucket]
        shard = self.grad[self.layout.bucket_local_range(bucket)]
        if pending.pieces is not None:
            self._sum_exchanged(pending, shard)
        elif self._scatters:
            if pending.accumulate:
                shard.add_(pending.out)
        else:
            result = pending.staging[self.layout.bucket_rank_range(bucket).start - bucket.start:][:bucket.shard_numel]
            if pending.accumulate:
                shard.add_(result)
            else:
                shard.copy_(result)
        if pending.buffer is not None:
            self._staging_free.append(pending.buffer)

    def _sum_exchanged(self, pending: _Pending, shard: Tensor) -> None:
        """Fold this rank's slice of an exchanged bucket into ``shard``: the sum of every rank's piece in rank order,
        ``((p_0 + p_1) + p_2) + ...`` (for two ranks what gloo's all-reduce computes, bitwise).  The first two terms
        add in whichever order holds the shard (IEEE addition commutes)."""
        p0, p1, *rest = pending.pieces
        if pending.accumulate:
            total = torch.add(p0, p1)
        else:
            total = shard   # it received p0 or p1 (the lowest-ranked other rank's piece)
            total.add_(p1 if p0.data_ptr() == shard.data_ptr() else p0)
        for piece in rest:
            total.add_(piece)
        if pending.accumulate:
            shard.add_(total)

    def end_step(self) -> None:
        """Forget this step's reductions: the next backward starts a new accumulation cycle."""
        self._reduced = [False] * len(self.layout.buckets)
        self._ready = [0] * len(self.layout.buckets)
        self._next_launch, self._backward_open = 0, False
        self._direct, self._table = {}, None

    def grad_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The gradient the update of run ``rng`` reads: the parameter's own when read in place, else ``grad``."""
        if len(slots) == 1 and slots[0] in self._direct:
            return self._direct[slots[0]]
        return self.grad[rng]

    def grad_table(self, rng: slice, slots: list[int]) -> tuple[Tensor, int] | None:
        """Native runtimes: the gradient segments of run ``rng`` for :func:`.kernels.native_cpu.update` (each
        slot's in-place gradient, else its region of ``grad``) and the base of their offsets (``rng.start``): the
        rows of :meth:`step_table` for ``slots``, a view when consecutive; None: the update reads :meth:`grad_of`."""
        if not self.native:
            return None
        consecutive = slots == list(range(slots[0], slots[-1] + 1))
        return (self.step_table()[slots[0]: slots[-1] + 1] if consecutive else self.step_table()[slots]), rng.start

    def step_table(self) -> Tensor:
        """Native runtimes: this step's table of every slot's gradient segment (:func:`.kernels.native_cpu.
        slot_table`), built once after the gradients are collected and shared by the norm and the update runs
        (two loops over the parameters less per step)."""
        if self._table is None:
            slots = self.layout.slots
            self._table = native_cpu.slot_table([s.offset for s in slots], [s.numel for s in slots], self.grad,
                                                self.master, self._direct)
        return self._table

    def param_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The parameter values a run's update writes: always the flat ``master`` (parameters are its views)."""
        del slots
        return self.master[rng]

    def grad_tensors(self) -> list[Tensor]:
        """Every tensor holding this step's gradient elements (``grad`` and the in-place gradients)."""
        return [self.grad, *self._direct.values()]

    def _gradient_pieces(self) -> list[list[tuple[Tensor, int | None, int | None]]]:
        """Per slot: (destination in ``grad``, lo, hi) for each local piece of its gradient; ``lo is None`` when
        the destination is the whole parameter, shaped like it (one rank)."""
        out: list[list[tuple[Tensor, int | None, int | None]]] = [[] for _ in self.layout.slots]
        if self.world == 1:
            for s, slot in enumerate(self.layout.slots):
                out[s].append((self.grad[slot.offset: slot.offset + slot.numel].view(slot.shape), None, None))
            return out
        for piece in self.layout.pieces:
            out[piece.slot].append((self.grad[piece.local_lo: piece.local_lo + piece.hi - piece.lo],
                                    piece.lo, piece.hi))
        return out

    def _staging_gaps(self) -> list[list[tuple[int, int]]]:
        """Per bucket, the ranges of its staging buffer (bucket coordinates) that no parameter covers: alignment
        padding, zeroed at every launch."""
        out: list[list[tuple[int, int]]] = []
        for bucket in self.layout.buckets:
            gaps, cursor = [], 0
            for lo, hi in sorted((self.layout.slots[s].offset - bucket.start,
                                  self.layout.slots[s].offset - bucket.start + self.layout.slots[s].numel)
                                 for s in bucket.slots):
                if lo > cursor:
                    gaps.append((cursor, lo))
                cursor = max(cursor, hi)
            if cursor < bucket.numel:
                gaps.append((cursor, bucket.numel))
            out.append(gaps)
        return out

    def _hand_over_grad_views(self, has_grad: list[bool]) -> None:
        """Give each parameter our buffer as its ``.grad`` (one rank): after ``zero_grad(set_to_none=False)`` later
        backwards accumulate straight into it and the next step copies nothing."""
        for s, slot in enumerate(self.layout.slots):
            p = self.params[slot.index]
            view = self._grad_pieces[s][0][0]
            if has_grad[s] and s not in self._direct and p.grad is not view and p.grad.dtype == view.dtype \
                    and not p.grad.requires_grad:
                p.grad = view

    def _own_grad_ptr(self, slot_index: int) -> int:
        """Address of slot ``slot_index``'s region of ``grad`` (one rank: the whole parameter)."""
        return self._grad_pieces[slot_index][0][0].data_ptr()

    def _zero_local_pieces(self, slot_index: int) -> None:
        for piece in self.layout.pieces:
            if piece.slot == slot_index:
                self.grad[piece.local_lo: piece.local_lo + piece.hi - piece.lo].zero_()
