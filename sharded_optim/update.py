r"""The decision and the update of one ``ShardedOptimizer.step()``: skip or take it, clip, run the fused kernels.

Decide (:func:`decide_on_host`, :func:`decide_on_device`): with the global gradient norm
:math:`\|g\| = \sqrt{\sum_g s_g}` the step is skipped when it is non-finite (``nonfinite_policy="skip"``) or a
spike (:math:`\|g\| > \mu + k\sigma` of the last steps taken, ``spike_sigma=k``), and with ``clip_grad_norm_``'s
``max_norm`` the gradient enters the kernel scaled by :math:`\min(1, \text{max\_norm}/(\|g\| + 10^{-6}))`.

Update (:func:`update_group`): per runtime, one fused kernel call per run (:meth:`ParamRuntime.update_runs`), with
the scalars of :mod:`sharded_optim.rules` computed on the host from host step counters (:func:`host_runs`) or on
the device, gated by the device's keep flag (:func:`device_runs`, :mod:`sharded_optim.device_step`); statistics
steps add their sums (:class:`~sharded_optim.step_stats.StepStats`); the updated shard is then gathered back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from . import device_step, rules
from .kernels import dispatch, native_cpu
from .flat import Run
from .runtime import ParamRuntime
from .step_stats import intersect


@dataclass
class Collected:
    """Gradients collected into the shards and their global sums of squares per param group (float64; on the
    host on the host path, on the device on the device path); ``max_norm`` once ``clip_grad_norm_`` asked."""

    has_grad: dict[int, list[bool]]
    sumsq: Tensor
    max_norm: float | None = None

    def total_norm(self) -> Tensor:
        r""":math:`\|g\| = \sqrt{\sum_g s_g}`."""
        return self.sumsq.sum().sqrt()


@dataclass
class Decision:
    """What a step does: skip (host path: ``reason``; device path: the 0-d flag ``keep``) and the clip coefficient
    (a float or a 0-d device tensor) that scales the gradient inside the update kernel."""

    reason: str | None
    norm: float | Tensor
    coef: float | Tensor
    keep: Tensor | None = None   # device path: set by the first runtime's scalar kernel
    finite: bool = True   # every gradient element finite (statistics skip non-finite masking)
    sumsq: Tensor | None = None   # device path: the groups' sums of squares the kernels decide from
    max_norm: float | None = None

    def host_norm(self) -> float:
        """The norm as a float (reads the device norm on the device path)."""
        return float(self.norm)

    def clipped(self) -> bool:
        r"""Whether clipping scaled the gradients, :math:`\text{max\_norm}/(\|g\| + 10^{-6}) < 1` (reads the
        device norm on the device path)."""
        if self.max_norm is None:
            return float(self.coef) < 1.0
        norm = float(self.norm)
        return math.isfinite(norm) and self.max_norm / (norm + 1e-6) < 1.0


def _index(slots: list[int], device: torch.device | None = None) -> slice | Tensor:
    """Index of a run's slots into the per-slot counters: a slice when consecutive (no index tensor, no copy)."""
    if slots == list(range(slots[0], slots[-1] + 1)):
        return slice(slots[0], slots[-1] + 1)
    return torch.tensor(slots, dtype=torch.long, device=device)


def decide_on_host(opt: Any, collected: Collected) -> Decision:
    """Skip and clip decided from the norm read back to the host (the CPU default)."""
    total_norm = math.sqrt(float(collected.sumsq.sum()))
    reason = skip_reason(opt, total_norm)
    if reason is not None:
        opt._skipped[reason] += 1
    elif math.isfinite(total_norm):
        opt._recent_norms.append(total_norm)
    coef = 1.0
    if collected.max_norm is not None and math.isfinite(total_norm):
        coef = min(1.0, collected.max_norm / (total_norm + 1e-6))
    return Decision(reason=reason, norm=total_norm, coef=coef, finite=math.isfinite(total_norm))


def decide_on_device(opt: Any, collected: Collected) -> Decision:
    """Skip and clip are decided on the device, inside each runtime's scalar kernel (:func:`device_step.prepare`),
    from ``collected.sumsq``: nothing synchronises here.  Lookahead must know whether the step is taken before
    it runs (its slow-weight sync is not gated): with shard hooks the flag is read (a synchronisation)."""
    decision = Decision(reason=None, norm=collected.total_norm(), coef=1.0, sumsq=collected.sumsq,
                        max_norm=collected.max_norm)
    if opt._shard_hooks and opt.nonfinite_policy == "skip" and not bool(torch.isfinite(decision.norm)):
        decision.reason = "nonfinite"
        opt._skipped["nonfinite"] += 1
    return decision


def skip_reason(opt: Any, total_norm: float) -> str | None:
    r"""Why the host path skips a step of norm ``total_norm``: "nonfinite", "spike" (:math:`\|g\| > \mu + k\sigma`
    over the recent norms, once there are ``max(8, window/4)``), or None; raises under ``nonfinite_policy="raise"``."""
    if not math.isfinite(total_norm) and opt.nonfinite_policy != "ignore":
        if opt.nonfinite_policy == "raise":
            raise FloatingPointError(f"non-finite gradient norm {total_norm} at step {opt.steps_attempted}; "
                                     "parameters and optimizer state were left unchanged")
        return "nonfinite"
    recent = opt._recent_norms
    if opt.spike_sigma is not None and len(recent) >= max(8, recent.maxlen // 4):
        mean = sum(recent) / len(recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in recent) / len(recent))
        if total_norm > mean + opt.spike_sigma * std:
            return "spike"
    return None


def device_rectification(opt: Any) -> list[float | None]:
    """RAdam's r_t per group for the report, from the (synchronised) step counters."""
    out: list[float | None] = []
    for group in opt.param_groups:
        runtimes = opt._runtimes.get(id(group), [])
        if opt.algorithm != "radam" or not runtimes or not len(runtimes[0].steps):
            out.append(None)
            continue
        t = int(runtimes[0].steps.max())
        out.append(rules.host_scalars(opt.algorithm, group, max(t, 1), initial_lr=0.0).rectification)
    return out


def update_group(opt: Any, group: dict[str, Any], gi: int, has_grad: dict[int, list[bool]],
                 partials: dict[Any, Tensor] | None, decision: Decision) -> float | None:
    """Update every runtime of param group ``gi`` (statistics into ``partials`` on a statistics step), run the
    shard hooks, gather the parameters; return RAdam's rectification of the host path (else None)."""
    rectification = None
    variant = rules.kernel_variant(opt.algorithm, group)
    stats_traffic = opt._stats
    for rt in opt._runtimes.get(id(group), []):
        runs = rt.update_runs(has_grad[id(rt)], uniform_steps=opt._on_device and id(rt) not in opt._diverged)
        rt.prepare_update()
        stats = None
        if partials is not None:
            stats = stats_traffic.group_sums(partials, rt, gi)
        keys = tuple(rt.state)
        # native runtimes (one rank or FSDP2 on CPU, fp32) compute a statistics step's sums in the update's own pass
        separate = stats is not None and not rt.native
        if separate:
            real = rt.stat_ranges()
            stats_traffic.add_pre(stats, group, rt, has_grad[id(rt)], decision.finite)
        post: list[tuple[slice, Tensor]] = []  # statistics step: (range, scalars) still to read back
        if opt._on_device:
            scalar_runs = device_runs(opt, group, rt, runs, variant, keys, decision)
        else:
            scalar_runs = host_runs(opt, group, rt, runs, variant, keys, decision, stats)
        for rng, sc, rect in scalar_runs:
            if separate:  # statistics step: the updated state is read back over real elements
                post.extend((sub, sc) for sub in intersect(rng, real))
            rectification = rect
        if post:
            stats_traffic.schedule_post(rt, variant, keys, post, stats, float(group["lr"]),
                                        now=bool(opt._shard_hooks) or rt.reduce_group is None)
        for fn in opt._shard_hooks:
            fn(rt, group)
        rt.gather_params(wait=not opt.overlap_param_gather)
    return rectification


def _seed(rt: ParamRuntime, step: int | Tensor) -> tuple[Tensor, ...]:
    """The step counter before the step (host and device paths alike), which low-precision kernels mix into their
    rounding bits (none for fp32 state): without it a state at a fixed point would round the same way every
    step (kernels.low_precision)."""
    if rt.state_precision == "fp32":
        return ()
    return (step if isinstance(step, Tensor) else torch.tensor(step, dtype=torch.int64, device=rt.device),)


def host_runs(opt: Any, group: dict[str, Any], rt: ParamRuntime, runs: list[Run], variant: str,
              keys: tuple[str, ...], decision: Decision, stats: Tensor | None = None
              ) -> Iterator[tuple[slice, Tensor, Any]]:
    """The update with host scalars from host step counters (the clip coefficient in the gradient scale).

    Native runtimes on a statistics step add the step's sums to the statistics row ``stats`` from the update's pass
    (:func:`.kernels.native_cpu.update`); the others leave ``stats`` to the caller."""
    steps = rt.steps.tolist()
    mus = rt.mu_products.tolist()
    for rng, slots in runs:
        t = steps[slots[0]] + 1
        hs = rules.host_scalars(opt.algorithm, group, t, initial_lr=float(group.get("base_lr", 0.0)),
                                mu_product=mus[slots[0]])
        hs.values[rules.GSCALE] *= decision.coef
        sc = torch.tensor(hs.values, dtype=rt.compute_dtype, device=rt.device)
        segments = rt.grad_table(rng, slots)
        if segments is not None:   # CPU, fp32: every gradient read where autograd left it
            table, base = segments
            sums = native_cpu.update(variant, table, rt.state_args(keys, rng), sc, stats=stats is not None,
                                     gsign=-1.0 if group.get("maximize", False) else 1.0, base=base)
            if sums is not None:   # a statistics step
                native_cpu.add_sums(stats, sums, float(group["lr"]))
        else:
            dispatch.run(dispatch.update(variant, rt.state_precision), opt.kernel_mode, rt.param_of(rng, slots),
                         rt.grad_of(rng, slots), *rt.state_args(keys, rng), sc, *_seed(rt, t - 1))
        index = _index(slots)
        if isinstance(index, slice):
            rt.steps[index].add_(1)   # a view: one in-place op instead of a read, an add and a write back
        else:
            rt.steps[index] += 1
        if hs.mu_product is not None:
            rt.mu_products[index] = hs.mu_product
        yield rng, sc, hs.rectification


def device_runs(opt: Any, group: dict[str, Any], rt: ParamRuntime, runs: list[Run], variant: str,
                keys: tuple[str, ...], decision: Decision) -> Iterator[tuple[slice, Tensor, Any]]:
    """The gated update with scalars computed on the device from device step counters.

    Usually one scalar kernel per runtime: its counters agree.  After a step that left some parameters out (no
    gradient, one rank) they differ, and each run computes its own (still on the device)."""
    max_norm = math.inf if decision.max_norm is None else decision.max_norm
    h = opt._hyper.get(rules.hyperparameters(opt.algorithm, group, float(group.get("base_lr", 0.0))) + [max_norm],
                       id(group), rt.device)
    compiled = opt.kernel_mode != "eager" and rt.device.type == "cuda"
    diverged = id(rt) in opt._diverged
    skip = opt.nonfinite_policy == "skip"
    shared = None if diverged else device_step.prepare(
        opt.algorithm, group, skip, decision.sumsq, h, rt.steps[0], rt.mu_products[0], rt.compute_dtype, compiled)
    covered = 0
    for rng, slots in runs:
        first = slots[0]
        sc, keep, mu_after = shared or device_step.prepare(
            opt.algorithm, group, skip, decision.sumsq, h, rt.steps[first], rt.mu_products[first],
            rt.compute_dtype, compiled)
        dispatch.run(dispatch.gated(variant, rt.state_precision), opt.kernel_mode, keep, rt.param_of(rng, slots),
                     rt.grad_of(rng, slots), *rt.state_args(keys, rng), sc, *_seed(rt, rt.steps[first]))
        covered += len(slots)
        if diverged:
            index = _index(slots, rt.device)
            rt.steps[index] += keep.long()
            if opt.algorithm == "nadam":
                rt.mu_products[index] = torch.where(keep, mu_after, rt.mu_products[index])
        yield rng, sc, None
    if shared is not None:
        sc, keep, mu_after = shared
        if covered == len(rt.layout.slots):   # every counter moves together: one update
            rt.steps.add_(keep.long())
            if opt.algorithm == "nadam":
                rt.mu_products.copy_(torch.where(keep, mu_after, rt.mu_products))
        else:   # some parameters had no gradient: their counters stay, and from now on counters differ
            for _rng, slots in runs:
                index = torch.tensor(slots, dtype=torch.long)
                rt.steps[index.to(rt.device)] += keep.long()
                if opt.algorithm == "nadam":
                    rt.mu_products[index.to(rt.device)] = torch.where(keep, mu_after,
                                                                      rt.mu_products[index.to(rt.device)])
            opt._diverged.add(id(rt))
    if decision.keep is None:
        decision.keep = shared[1] if shared is not None else keep
        count_skip(opt, decision.keep)


def count_skip(opt: Any, keep: Tensor) -> None:
    """Device path: count a skipped step on the device (read back by ``skipped_steps``)."""
    if opt._skipped_on_device is None or opt._skipped_on_device.device != keep.device:
        opt._skipped_on_device = torch.zeros((), dtype=torch.int64, device=keep.device)
    opt._skipped_on_device += (~keep).long()
