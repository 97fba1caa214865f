"""The statistics traffic of a step: gradient norms per param group, optimizer-health statistics, their packing.

One object, :class:`StepStats`, owned by a :class:`~sharded_optim.optimizer.ShardedOptimizer`, does all of it:

* the global pre-clip gradient sum of squares per param group, :math:`s_g = \\sum_{i \\in g} g_i^2` over every
  rank's shard, in one all-reduce per process group (:meth:`StepStats.group_norms`);
* on a statistics step (every ``stats_interval`` steps), the ``PRE_FIELDS`` sums of the gradient and the state
  before the update (:meth:`StepStats.pre_pass`, whose ``grad_sumsq`` field is :math:`s_g` itself) and the sums of
  the updated state after it (:meth:`StepStats.post_stats`, deferred to the next step when sharded);
* packing those local statistics into the next step's norm all-reduce instead of a collective of their own, and
  keeping the global sums that come back for the next report (:meth:`StepStats.take_delivered`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .kernels import dispatch
from .kernels import stats as stats_kernels
from .runtime import ParamRuntime
from .telemetry.fields import FIELD_INDEX, NUM_FIELDS
from .telemetry.report import StepReport

LOCAL = object()  # key for partial sums that need no reduction
_GRAD_SUMSQ = stats_kernels.PRE_FIELDS.index("grad_sumsq")
FRICTION_KEY = "previous_grad"  # diffgrad/diffmod state: the previous (transformed) gradient


def intersect(rng: slice, ranges: list[slice]) -> Iterator[slice]:
    """The parts of ``rng`` inside ``ranges`` (both in local-shard coordinates)."""
    for r in ranges:
        lo, hi = max(rng.start, r.start), min(rng.stop, r.stop)
        for start in range(lo, hi, stats_kernels.MAX_CALL_NUMEL):  # int32 counts stay exact
            yield slice(start, min(hi, start + stats_kernels.MAX_CALL_NUMEL))


def reduce_key(rt: ParamRuntime) -> Any:
    """The key of ``rt``'s partial sums: the process group they are summed over, or :data:`LOCAL`."""
    return rt.reduce_group if rt.reduce_group is not None else LOCAL


class StepStats:
    """Gradient norms and optimizer-health statistics of ``opt``'s steps, and the collectives that carry them.

    Statistics ride on the next gradient-norm all-reduce instead of taking one of their own (see
    :meth:`group_norms`): the local partial sums of the last statistics step wait in ``pending``, the global ones
    that came back wait in ``delivered`` for the next report.  Each is (step the statistics describe, sums).
    """

    def __init__(self, opt: Any):
        self.opt = opt
        self.local_sumsq_parts: list[Tensor] = []  # per-runtime shard sums of squares of the last norm pass
        # id(runtime) -> PRE_FIELDS sums of the gradient and the state before the update, when the last norm pass
        # was that of a statistics step (it then decides that the next step computes statistics); else None
        self.pre_sums: dict[int, Tensor] | None = None
        self.pending: tuple[int, dict[Any, Tensor]] | None = None
        self.delivered: tuple[int, Tensor] | None = None
        # sums of the updated state still to read back (sharded statistics steps): they run at the start of the
        # next step, while that step's gradient reduce-scatters are in flight (see finish_deferred)
        self.deferred_post: list[Callable[[], None]] = []
        # id(runtime) -> copy of its previous_grad taken by the statistics pass before a diffgrad/diffmod update
        self.friction_before: dict[int, Tensor] = {}
        # id(runtime) -> fp32 copies of the parameters and the state before a bf16/int8 update (statistics steps)
        self.quant_before: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}

    def next_is_stats_step(self) -> bool:
        """Whether the step about to run computes statistics (every ``stats_interval``-th step)."""
        opt = self.opt
        return opt.stats_interval > 0 and (opt.steps_attempted + 1) % opt.stats_interval == 0

    def finish_deferred(self) -> None:
        """Read back the updated state of the last statistics step (statistics of the parameters and the step
        sizes, :func:`~sharded_optim.kernels.stats._post`).

        Sharded, those sums are only needed at the next step's norm all-reduce, and nothing changes the state in
        between (anything that would, such as loading a checkpoint, calls this first).  Deferred to the start of
        the next step, they run while the main thread would otherwise only wait for the gradient
        reduce-scatters: a 2-rank gloo run spends about 18 ms per step there.
        """
        deferred, self.deferred_post = self.deferred_post, []
        for read_back in deferred:
            read_back()

    def group_norms(self, has_grad: dict[int, list[bool]]) -> Tensor:
        r"""Global pre-clip gradient sum of squares per param group, :math:`s_g = \sum_{i \in g} g_i^2` (float64),
        one all-reduce.

        The local statistics sums of the previous statistics step, if any, are packed into the same all-reduce:
        a second collective per statistics step measured 0.5 ms median and up to 4 ms at the 90th percentile on
        gloo, more than the statistics themselves.  The global sums are kept for the next report.

        Before a statistics step the local pass is :func:`~sharded_optim.kernels.stats.pre_sums` over the ranges
        the update will cover (kept in ``pre_sums``): their ``grad_sumsq`` is the shard's sum of squares, since
        the rest of the shard (bucket padding, parameters without a gradient) holds zeros.
        """
        opt = self.opt
        per_group: dict[Any, list[Tensor | float]] = {}
        devices: dict[Any, torch.device] = {}
        self.local_sumsq_parts = []  # this rank's shard sums, kept for the report's per-rank shard norm
        self.pre_sums = {} if self.next_is_stats_step() else None
        for i, group in enumerate(opt.param_groups):
            for rt in opt._runtimes.get(id(group), []):
                key = reduce_key(rt)
                acc = per_group.setdefault(key, [0.0] * len(opt.param_groups))
                devices.setdefault(key, rt.device)
                if self.pre_sums is None or rt.native:   # native: a statistics step's sums come with the update
                    local = rt.local_grad_sumsq()
                else:  # statistics step: the norm comes out of the statistics pass over the gradient
                    pre = self.pre_pass(group, rt, has_grad[id(rt)], finite=True)
                    self.pre_sums[id(rt)] = pre
                    local = pre[_GRAD_SUMSQ]
                self.local_sumsq_parts.append(local)
                acc[i] = acc[i] + local
        pending, self.pending = self.pending, None
        n = len(opt.param_groups)
        if pending is not None and any(v.shape[0] != n for v in pending[1].values()):
            pending = None  # a param group was added since: those sums no longer line up with the groups
        if pending is None and len(per_group) == 1 and LOCAL in per_group and not opt._on_device:
            return torch.tensor([float(x) for x in per_group[LOCAL]], dtype=torch.float64)  # one process
        # partial sums stay on the parameters' device: NCCL reduces CUDA tensors only (and a float made into a
        # device tensor by a fill, not a copy from the host, which would synchronise)
        packed = {k: torch.stack([x if isinstance(x, Tensor) else
                                  torch.zeros((), dtype=torch.float64, device=devices[k]) for x in v])
                  for k, v in per_group.items()}
        if pending is None:
            return self.reduce_sum(packed, (n,))
        stats_step, partials = pending
        for key, sums in partials.items():
            norms = packed.get(key, torch.zeros(n, dtype=torch.float64, device=sums.device))
            packed[key] = torch.cat([norms, sums.reshape(-1)])
        for key, norms in packed.items():
            if key not in partials:  # every key must send the same length
                packed[key] = torch.cat([norms, norms.new_zeros(n * NUM_FIELDS)])
        total = self.reduce_sum(packed, (n + n * NUM_FIELDS,))
        self.delivered = (stats_step, total[n:].view(n, NUM_FIELDS))
        return total[:n]

    def flush(self) -> tuple[int, Tensor] | None:
        """Make the statistics of the last statistics step global now (see ``ShardedOptimizer.flush_stats``)."""
        self.finish_deferred()
        pending, self.pending = self.pending, None
        if pending is None:
            delivered, self.delivered = self.delivered, None
            return delivered
        self.delivered = None
        stats_step, partials = pending
        return stats_step, self.reduce_sum(partials, (len(self.opt.param_groups), NUM_FIELDS)).cpu()

    def reduce_sum(self, partials: dict[Any, Tensor], shape: tuple[int, ...]) -> Tensor:
        """Sum per-process-group partial sums: one all_reduce per group over which shards are disjoint.

        The partials live on the device of their parameters.  On the host path the result comes back to the host
        (the one host synchronisation of a step: the skip decision and the clip coefficient need the value); on
        the device path (:mod:`.device_step`) it stays on the device of the first partial."""
        total: Tensor | None = None
        for key, value in partials.items():
            if key is not LOCAL:
                dist.all_reduce(value, group=key)
            if not self.opt._on_device:
                value = value.cpu()
            elif total is not None:
                value = value.to(total.device, non_blocking=True)
            total = value.reshape(shape) if total is None else total + value.reshape(shape)
        return total if total is not None else torch.zeros(shape, dtype=torch.float64)

    # ------------------------------------------------------------------------------- one statistics step
    def begin_update(self) -> dict[Any, Tensor] | None:
        """The partial sums the update fills, per reduce key: ``{}`` on a statistics step, else None."""
        return {} if self.pre_sums is not None else None

    def group_sums(self, partials: dict[Any, Tensor], rt: ParamRuntime, gi: int) -> Tensor:
        """The row of param group ``gi`` (``NUM_FIELDS`` float64 sums) that ``rt``'s statistics add into."""
        return partials.setdefault(reduce_key(rt), torch.zeros(len(self.opt.param_groups), NUM_FIELDS,
                                                               dtype=torch.float64, device=rt.device))[gi]

    def add_pre(self, stats: Tensor, group: dict[str, Any], rt: ParamRuntime, has_grad: list[bool],
                finite: bool) -> None:
        """Add ``rt``'s sums before the update into ``stats``: those of the norm pass, or, with non-finite
        gradients (``nonfinite_policy="ignore"``), taken again, masked (the gradient and the state are still
        those it read)."""
        pre = self.pre_sums.pop(id(rt)) if finite else self.pre_pass(group, rt, has_grad, finite=False)
        stats_kernels.add_pre_sums(stats, pre)
        if rt.state_precision != "fp32":   # for quantization_error; state_values: widened or dequantized copies
            self.quant_before[id(rt)] = (rt.master.clone(), {k: rt.state_values(k) for k in rt.state})

    def schedule_post(self, rt: ParamRuntime, variant: str, keys: tuple[str, ...], post: list[tuple[slice, Tensor]],
                      stats: Tensor, lr: float, now: bool) -> None:
        """Read back the updated state's sums over the ``post`` ranges: ``now`` (Lookahead is about to rewrite the
        parameters, or one process reports this very step), else at the next norm all-reduce
        (:meth:`finish_deferred`)."""
        self.quantization_error(rt, variant, keys, post, stats)   # now: it reads this step's gradient
        read_back = functools.partial(self.post_stats, rt, variant, keys, post, stats, lr)
        if now:
            read_back()
        else:
            self.deferred_post.append(read_back)

    def end_update(self, step: int, partials: dict[Any, Tensor]) -> None:
        """After a statistics step's update: sums needing no collective are delivered now; the others go global
        with the next gradient-norm all-reduce (or :meth:`flush`)."""
        if all(key is LOCAL for key in partials):
            self.delivered = (step, self.reduce_sum(partials, (len(self.opt.param_groups), NUM_FIELDS)))
        else:
            self.pending = (step, partials)

    def take_delivered(self) -> tuple[int, Tensor] | None:
        """The global statistics waiting for a report (then forgotten)."""
        delivered, self.delivered = self.delivered, None
        return delivered

    def pre_pass(self, group: dict[str, Any], rt: ParamRuntime, has_grad: list[bool], finite: bool) -> Tensor:
        """``PRE_FIELDS`` sums of the gradient and the first moment before the update, over the real elements of
        the ranges the update will cover (:func:`~sharded_optim.kernels.stats.pre_sums`), in float64."""
        gscale = torch.tensor(-1.0 if group.get("maximize", False) else 1.0, dtype=torch.float64, device=rt.device)
        m = _readable(rt, next(iter(rt.state)))  # every variant's first state tensor is the first moment
        if FRICTION_KEY in rt.state:
            # diffGrad/DiffMod: the update overwrites the previous gradient, and the statistics of its friction
            # need the old one (see kernels.stats._post); a copy on statistics steps only, dropped by post_stats
            # (sharded: at the start of the next step, after the user's zero_grad, so zero_grad keeps it)
            self.friction_before[id(rt)] = _readable(rt, FRICTION_KEY).clone()
        real = rt.stat_ranges()
        total = torch.zeros(len(stats_kernels.PRE_FIELDS), dtype=torch.float64, device=rt.device)
        for rng, _ in rt.update_runs(has_grad):
            for sub in intersect(rng, real):
                total += dispatch.run(dispatch.PRE_SUMS, self.opt.kernel_mode, rt.grad[sub], m[sub], gscale, finite)
        return total

    def quantization_error(self, rt: ParamRuntime, variant: str, keys: tuple[str, ...],
                           post: list[tuple[slice, Tensor]], stats: Tensor) -> None:
        r"""bf16/int8 state: add :math:`\sum (q(x) - x)^2` and :math:`\sum x^2` of the first and second moment
        into ``stats``, where :math:`x` is the fp32 state the update computed before rounding and :math:`q(x)` the
        stored one.

        :math:`x` comes from running the fp32 kernel on copies of the state and parameters taken right before the
        update (by :meth:`add_pre`) with the same gradient and scalars: the low-precision kernels run that same
        math on the same dequantized values (exactly so in eager mode; compiled loops may contract it differently,
        an ulp against errors of 2**-8 and more).  Statistics steps only: one more fp32 update over the shard."""
        before = self.quant_before.pop(id(rt), None)
        if before is None:
            return
        master, state = before
        stored = {k: rt.state_values(k) for k in keys[:2]}
        for sub, sc in post:
            exact = [state[k][sub].clone() for k in keys]
            dispatch.run(dispatch.update(variant), self.opt.kernel_mode, master[sub].clone(), rt.grad[sub], *exact, sc)
            for moment, key, x in zip("mv", keys, exact):
                x = x.double()
                stats[FIELD_INDEX[f"quant_err_{moment}_sumsq"]] += (stored[key][sub].double() - x).square().sum()
                stats[FIELD_INDEX[f"quant_ref_{moment}_sumsq"]] += x.square().sum()

    def post_stats(self, rt: ParamRuntime, variant: str, keys: tuple[str, ...], post: list[tuple[slice, Tensor]],
                   stats: Tensor, lr: float) -> None:
        """Statistics of the updated state over the ranges the update covered (reads only)."""
        edges = stats_kernels.edges_for(rt.device)
        before = self.friction_before.pop(id(rt), None)
        if FRICTION_KEY in rt.state and before is None:
            raise RuntimeError("statistics of the diffGrad friction need the previous gradient from before the "
                               "update; the statistics pass did not keep it")
        state = {k: _readable(rt, k) for k in keys}
        for sub, sc in post:
            extra = () if before is None else (before[sub],)
            sums = dispatch.run(dispatch.post_sums(variant), self.opt.kernel_mode, rt.master[sub],
                                *(state[k][sub] for k in keys), *extra, sc, edges)
            stats_kernels.add_post_sums(stats, sums, lr)

    def local_sumsq(self) -> float:
        """This rank's shard sum of squares from the last norm pass (a host synchronisation per runtime)."""
        return sum(x.item() for x in self.local_sumsq_parts)


def _readable(rt: ParamRuntime, key: str) -> Tensor:
    """State ``key`` as the statistics kernels read it: the buffer (fp32, or bf16 that they widen), or for 8-bit
    state its dequantized values (a copy, on statistics steps only)."""
    return rt.state_values(key) if rt.state_precision == "int8" else rt.state[key]


def build_report(opt: Any, reason: str | None, sumsq: Tensor, total_norm: float, clipped: bool,
                 stats: tuple[int, Tensor] | None, rectification: list[float | None], seconds: float) -> StepReport:
    r"""The :class:`StepReport` of ``opt``'s last step: norms :math:`\sqrt{s_g}` per group from ``sumsq``, this
    rank's shard norm and non-finite count, and the global statistics ``stats`` of an earlier step, if any."""
    # Few tensor calls: right after the update kernels each one costs tens of microseconds (cold caches), and
    # this runs on every step (0.25 ms per step in the 2-rank benchmark with float() on each element, 0.15 ms
    # with one tolist()).
    local_sumsq = opt._stats.local_sumsq()  # computed with the global norm
    # counting non-finite elements costs a pass: only when the shard's norm says there are some
    shard_nonfinite = 0 if math.isfinite(local_sumsq) else \
        sum(int((~torch.isfinite(g)).sum()) for _, rt in opt._all_runtimes() for g in rt.grad_tensors())
    if opt._state_bytes is None:
        opt._state_bytes = opt.memory_report()["state_bytes"]  # constant once the buffers exist
    return StepReport(
        step=opt.steps_attempted, skipped_reason=reason,
        group_names=[str(g.get("name", f"group{i}")) for i, g in enumerate(opt.param_groups)],
        lrs=[float(g["lr"]) for g in opt.param_groups], grad_norm=total_norm,
        group_grad_norms=[math.sqrt(x) for x in sumsq.tolist()], clipped=clipped, algorithm=opt.algorithm,
        stats=None if stats is None else stats[1], stats_step=None if stats is None else stats[0],
        radam_rectification=rectification, rank=opt.rank,
        shard_grad_norm=math.sqrt(local_sumsq) if math.isfinite(local_sumsq) else float("nan"),
        shard_nonfinite=shard_nonfinite, state_bytes=opt._state_bytes, step_seconds=seconds)
