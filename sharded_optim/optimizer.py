"""``ShardedOptimizer``: the public ``torch.optim.Optimizer`` for the whole Adam family, ZeRO-sharded.

This class does bookkeeping only: param groups, validation, the step sequence, hooks; it delegates the rest, as
torch.optim's classes delegate to their functional forms.  The math lives in :mod:`sharded_optim.rules` (host
scalars) and :mod:`sharded_optim.kernels` (the fused update); the decision and the kernel calls of a step in
:mod:`sharded_optim.update`; gradient norms and statistics in :mod:`sharded_optim.step_stats`; ``state_dict`` in
:mod:`sharded_optim.serialization`; buffers and communication in the runtimes (:mod:`sharded_optim.runtime`).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import agreement, consolidate, device_step, options, rebind, runtime, serialization, step_stats, update
from .kernels import dispatch
from .runtime import ParamRuntime
from .serialization import MASTER_KEY  # noqa: F401  (re-exported: the state_dict key of the fp32 master copy)
from .step_stats import FRICTION_KEY, StepStats  # noqa: F401  (FRICTION_KEY re-exported)
from .telemetry.report import StepReport

NONFINITE_POLICIES = options.NONFINITE_POLICIES  # re-exported


class ShardedOptimizer(Optimizer):
    r"""The Adam family (Adam, AdamW, L2-Adam, AMSGrad, AdaMax, NAdam, RAdam, AdaMod, AdaBound/AMSBound, diffGrad,
    DiffMod) as one fused, ZeRO-sharded optimizer.

    Every algorithm is the elementwise update (per element, step :math:`t`, :math:`bc_i = 1-\beta_i^t`)

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta_{t-1} - \frac{\alpha}{bc_1}\,\frac{m_t}{\sqrt{v_t}/\sqrt{bc_2} + \epsilon}

    with the variations each algorithm defines; the exact form of each is written in ``docs/ARCHITECTURE.md``
    ("Semantics chosen per algorithm"): torch.optim's math where torch has the algorithm (adam, adamw, amsgrad,
    adamax, nadam, radam), the authors' reference code where it has not (adamod, adabound, diffgrad = diffGrad v2 =
    torch-optimizer's DiffGrad, diffmod).  diffgrad/diffmod scale the first moment in the step by the friction
    :math:`\xi = 1/(1+e^{-|g_{t-1} - g_t|})` and keep :math:`g_{t-1}` as state ``previous_grad``.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim`` optimizer.
        algorithm: one of :data:`sharded_optim.ALGORITHMS`.
        lr, betas, eps, weight_decay: as in torch.optim; ``lr``/``weight_decay`` default to the algorithm's.
        process_group: the data-parallel group to shard over (default: the world group once
            ``torch.distributed`` is initialised).
        zero_stage: 0 = no sharding (a fast local fused optimizer; use under DeepSpeed/FSDP2), 1 = state
            sharded and gradients all-reduced, 2 = state sharded and gradients reduce-scattered.
        bucket_mb: gradient-reduction / all-gather bucket size in MiB of parameters.
        overlap: launch gradient reductions from backward hooks as buckets fill (overlaps backward).
        reduce_grads: set False when the model is wrapped in DDP (gradients already averaged).
        grad_reduce_dtype, param_gather_dtype: dtypes of the gradient reduction and the parameter all-gather.
        master_weights: keep an fp32 master copy (and fp32 state) for bf16/fp16 parameters.
        nonfinite_policy: "skip" (every rank skips a step with a non-finite gradient), "raise", or "ignore".
        spike_sigma: skip a step whose gradient norm exceeds mean + ``spike_sigma`` * std of the last
            ``spike_window`` taken steps (None disables).
        kernel: "auto" (compiled, eager fallback), "compiled" or "eager".
        stats_interval: compute optimizer-health statistics every this many steps (0 = never).
        overlap_param_gather: leave the parameter all-gather in flight after ``step()`` and complete each bucket
            when a module first uses it in the next forward (needs :meth:`attach_model`; code that reads the
            parameters outside a forward calls :meth:`wait_params` first).  Default off: the synchronous gather
            is always correct, whoever reads the parameters.
        capturable: decide every step on the device (:mod:`sharded_optim.device_step`): step counters on the
            device, no host synchronisation inside ``step()``, so the step can be captured in a CUDA graph
            (torch's word; for the same reason hyperparameters are read when the step is issued, so a captured
            graph replays the values it was captured with).  CUDA parameters take this path by default; on CPU it
            is opt-in (a synchronisation costs nothing there).
        state_precision: "fp32", "bf16" (.kernels.low_precision) or "int8" (.kernels.int8_state); per group too.
        **algorithm_options: ``amsgrad``, ``bias_correction``, ``decoupled_weight_decay``, ``maximize``,
            ``beta3`` (adamod, diffmod), ``len_memory`` (diffmod: ``beta3 = 1 - 1/len_memory``, not both),
            ``final_lr``/``gamma`` (adabound), ``momentum_decay`` (nadam), ``degenerated_to_sgd`` (radam).

    Example::

        opt = ShardedOptimizer(model.parameters(), algorithm="adamod", lr=1e-3, beta3=0.999)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], algorithm: str = "adamw",
                 lr: float | Tensor | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | None = None, *, process_group: Any = None, zero_stage: int = 2,
                 bucket_mb: float = 25.0, overlap: bool = True, reduce_grads: bool = True,
                 grad_reduce_dtype: torch.dtype | str | None = None,
                 param_gather_dtype: torch.dtype | str | None = None, master_weights: bool = True,
                 nonfinite_policy: str = "skip", spike_sigma: float | None = None, spike_window: int = 128,
                 kernel: str = "auto", stats_interval: int = 0, overlap_param_gather: bool = False,
                 capturable: bool = False, state_precision: str = "fp32", **algorithm_options: Any):
        algorithm, defaults = options.resolve_defaults(algorithm, lr, betas, eps, weight_decay, algorithm_options)
        options.check_arguments(zero_stage=zero_stage, bucket_mb=bucket_mb, nonfinite_policy=nonfinite_policy,
                                spike_sigma=spike_sigma, spike_window=spike_window, stats_interval=stats_interval,
                                capturable=capturable, state_precision=state_precision)
        self.capturable, self.state_precision = capturable, defaults.setdefault("state_precision", state_precision)
        self._on_device = capturable   # the device path (device_step); CUDA parameters switch it on too
        self.algorithm = algorithm
        self.zero_stage = zero_stage
        self.kernel_mode = dispatch.resolve_mode(kernel)
        self.bucket_numel_bytes = int(bucket_mb * 2**20)
        self.overlap, self.reduce_grads = overlap, reduce_grads
        self.grad_reduce_dtype = options.as_dtype("grad_reduce_dtype", grad_reduce_dtype)
        self.param_gather_dtype = options.as_dtype("param_gather_dtype", param_gather_dtype)
        self.master_weights = master_weights
        self.nonfinite_policy = nonfinite_policy
        self.spike_sigma = spike_sigma
        self._recent_norms: deque[float] = deque(maxlen=spike_window)
        self.stats_interval = stats_interval
        self.overlap_param_gather = bool(overlap_param_gather)
        self._attached = False
        self.process_group, self.world_size, self.rank = options.resolve_group(process_group, zero_stage)
        self.steps_attempted = 0
        self._skipped: dict[str, int] = {"nonfinite": 0, "spike": 0}   # host path; see skipped_steps
        self._skipped_on_device: Tensor | None = None   # device path: skipped steps not yet read back
        self._runtimes: dict[int, list[ParamRuntime]] = {}   # id(param group) -> its runtimes
        self._locate: dict[int, tuple[ParamRuntime, int]] = {}  # id(param) -> (runtime, slot)
        self._collected: update.Collected | None = None   # set by clip_grad_norm_, consumed by the next step
        self._hyper = device_step.HyperparameterBuffers()   # device path: each group's hyperparameters on device
        self._diverged: set[int] = set()   # device path: runtimes whose step counters no longer all agree
        self._stats = StepStats(self)   # gradient norms and statistics: their passes and collectives
        self._report_hooks: list[Callable[[StepReport], None]] = []
        self._validated: dict[int, tuple] = {}
        self._state_bytes: int | None = None
        self._shard_hooks: list[Callable[[ParamRuntime, dict[str, Any]], None]] = []
        self._building = True
        self._rendezvous_tag = consolidate.new_tag()  # state_dict() rendezvous: same number on every rank
        super().__init__(params, defaults)
        self._building = False
        if self.sharded:
            self._ensure_runtimes()  # the gradient hooks must exist before the first backward
            agreement.verify(self)  # every rank lays out the same flat buffers, or every rank raises

    @classmethod
    def from_config(cls, params: Iterable[Tensor] | Iterable[dict[str, Any]], config: Any, *,
                    exclude: Iterable[str] = (), **overrides: Any) -> ShardedOptimizer:
        """Build from a config dataclass whose fields are constructor arguments (``None``: the default), e.g.
        the run config's ``OptimizerConfig`` with ``exclude=OptimizerConfig.LOOP_FIELDS``; ``overrides`` win.
        A field that is not an argument raises ``TypeError`` naming it (:func:`options.config_kwargs`)."""
        return cls(params, **{**options.config_kwargs(cls.__init__, config, exclude), **overrides})

    # ---------------------------------------------------------------------------------------- setup
    @property
    def sharded(self) -> bool:
        """True when the state is split across ranks (ZeRO stage > 0, world > 1)."""
        return self.zero_stage > 0 and self.world_size > 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated first: a rejected group leaves the optimizer unchanged)."""
        params, devices = options.check_params(param_group)
        if self.sharded and params:
            options.check_backend(self.process_group, params[0].device)
        if "cuda" in devices and self.nonfinite_policy != "raise" and self.spike_sigma is None:
            if self.state:
                raise ValueError("a CUDA param group cannot join an optimizer whose state lives on the host path")
            self._on_device = True  # no host synchronisation inside step() (device_step)
        options.complete_param_group(self.algorithm, self.defaults, param_group, len(self.param_groups))
        super().add_param_group(param_group)
        if not self._building and self.sharded:
            self._ensure_runtimes()
            agreement.verify(self)

    def _ensure_runtimes(self) -> None:
        """Build the runtimes of param groups that have none (:func:`runtime.ensure_runtimes`)."""
        runtime.ensure_runtimes(self)

    def _build_runtimes(self, group: dict[str, Any]) -> list[ParamRuntime]:
        """New runtimes for ``group``, registered in ``state`` (:func:`runtime.build_runtimes`)."""
        return runtime.build_runtimes(self, group)

    def _all_runtimes(self) -> Iterator[tuple[dict[str, Any], ParamRuntime]]:
        """Every (param group, runtime), in param-group order."""
        for group in self.param_groups:
            for rt in self._runtimes.get(id(group), []):
                yield group, rt

    # ---------------------------------------------------------------------------------------- hooks
    def add_report_hook(self, fn: Callable[[StepReport], None]) -> Callable[[], None]:
        """Call ``fn(report)`` after every step (taken or skipped); returns a function that removes the hook."""
        self._report_hooks.append(fn)
        return lambda: self._report_hooks.remove(fn) if fn in self._report_hooks else None

    def add_shard_hook(self, fn: Callable[[ParamRuntime, dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``fn(runtime, group)`` after each shard's update and before the parameter all-gather (Lookahead)."""
        self._shard_hooks.append(fn)
        return lambda: self._shard_hooks.remove(fn) if fn in self._shard_hooks else None

    def attach_model(self, model: torch.nn.Module) -> None:
        """Let each module of ``model`` wait, in a forward pre-hook, for the all-gather of its own parameters only
        (used with ``overlap_param_gather=True``: the gather of later layers overlaps the forward of earlier ones)."""
        runtime.attach_model(self, model)
        self._attached = True

    def wait_params(self) -> None:
        """Complete every parameter all-gather still in flight (a no-op unless ``overlap_param_gather``)."""
        for _, rt in self._all_runtimes():
            rt.wait_params()

    # ---------------------------------------------------------------------------------------- gradients
    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradient accumulation: inside this context backward does not reduce; the next backward outside does."""
        return runtime.no_sync(self)

    def _collect(self) -> dict[int, list[bool]]:
        self._finish_deferred_stats()  # before waiting: the reduce-scatters launched by backward are in flight
        # a statistics step's separate passes read the flat gradient buffer (native runtimes' sums come from the
        # update): not in place then, nor with shard hooks (Lookahead reads the flat master right after the update)
        hooks, stats = bool(self._shard_hooks), self._stats.next_is_stats_step()
        return {id(rt): rt.collect_grads(not hooks and (rt.native or not stats)) for _, rt in self._all_runtimes()}

    def _finish_deferred_stats(self) -> None:
        """Read back the sums of the last statistics step deferred to now (:meth:`StepStats.finish_deferred`)."""
        self._stats.finish_deferred()

    def _group_norms(self, has_grad: dict[int, list[bool]]) -> Tensor:
        """Global pre-clip gradient sum of squares per param group, one all-reduce (:meth:`StepStats.group_norms`)."""
        return self._stats.group_norms(has_grad)

    def flush_stats(self) -> tuple[int, Tensor] | None:
        """Make the statistics of the last statistics step global now, instead of with the next step.

        Statistics normally travel with the next step's gradient-norm all-reduce, so the report of step
        ``t + 1`` carries those of step ``t`` (``StepReport.stats_step``).  Call this once training is over
        to get the last ones: ``(step, sums)`` with sums of shape ``(num_groups, NUM_FIELDS)``, or ``None``
        if none are waiting.  A collective when sharded: call it on every rank, as :meth:`step`.
        """
        return self._stats.flush()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the global gradient norm across all shards; return the total pre-clip norm.

        Matches ``torch.nn.utils.clip_grad_norm_`` on the unsharded model (coefficient ``max_norm/(norm+1e-6)``
        clamped to 1).  Call it between ``backward()`` and ``step()``: under ZeRO-2 the full gradients are freed
        as they are reduced, so ``torch.nn.utils.clip_grad_norm_(model.parameters())`` would see none.

        The gradients are not rescaled here: the coefficient enters the next :meth:`step`'s update kernel as its
        gradient scale, so clipping costs no pass over the gradients beyond the norm.  On the device path (CUDA,
        or ``capturable=True``) the returned norm is a device tensor and nothing synchronises unless the caller
        reads it; on the host path it is a CPU tensor.
        """
        if norm_type != 2.0:
            raise ValueError(f"norm_type must be 2.0 (the global L2 norm), got {norm_type!r}")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        self._rebind_replaced_storage()
        self._ensure_runtimes()
        collected = self._collected_grads()
        collected.max_norm = float(max_norm)
        self._collected = collected
        return collected.total_norm().float()   # float32, as torch's clip_grad_norm_ returns for float32 grads

    def _collected_grads(self) -> update.Collected:
        """Stages 1-2 of a step: gradients into the shards, then their global sums of squares per group."""
        if self._collected is not None:
            return self._collected  # clip_grad_norm_ ran them already
        has_grad = self._collect()
        return update.Collected(has_grad, self._group_norms(has_grad))

    # ---------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (all ranks must call it together when sharded).

        The pipeline: collect (gradients into the shards) -> norm (global, one all-reduce) -> decide (skip on
        a non-finite norm, clip coefficient) -> update (one fused kernel per shard run) -> gather (parameter
        all-gather) -> report.  On the device path (CUDA, or ``capturable=True``) the decision stays on the device
        and nothing synchronises with the host, except what ``nonfinite_policy="raise"``, ``spike_sigma``,
        Lookahead and report hooks read (each says so).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        start = time.perf_counter()
        self._rebind_replaced_storage()
        self._ensure_runtimes()
        self.wait_params()
        if self.overlap_param_gather and self.sharded and not self._attached:
            raise RuntimeError("overlap_param_gather=True needs optimizer.attach_model(model) before the first step, "
                               "so the next forward can wait for the parameters it uses")
        for group in self.param_groups:
            self._check_group(group)
        collected = self._collected_grads()
        self._collected = None
        self.steps_attempted += 1
        partials = self._stats.begin_update()  # a dict on a statistics step
        if self._on_device:
            decision = update.decide_on_device(self, collected)
            if partials is not None:  # statistics step: masking non-finite elements needs to know (synchronises)
                decision.finite = bool(torch.isfinite(decision.norm))
        else:
            decision = update.decide_on_host(self, collected)
        rectification: list[float | None] = []
        if decision.reason is None:
            for gi, group in enumerate(self.param_groups):
                rectification.append(update.update_group(self, group, gi, collected.has_grad, partials, decision))
            if partials is not None:  # delivered now, or global with the next gradient-norm all-reduce
                self._stats.end_update(self.steps_attempted, partials)
        self._stats.pre_sums = None
        for _, rt in self._all_runtimes():
            rt.end_step()
        if self._report_hooks:  # reads the norm and the decision: a synchronisation on the device path
            total_norm = decision.host_norm()
            reason = decision.reason if decision.keep is None else (None if bool(decision.keep) else "nonfinite")
            if self._on_device and decision.max_norm is None:
                decision.coef = 1.0
            if self._on_device:
                rectification = update.device_rectification(self)
            delivered = self._stats.take_delivered()
            self._report(reason, collected.sumsq.cpu(), total_norm, decision.clipped(), delivered, rectification,
                         time.perf_counter() - start)
        return loss

    def _check_group(self, group: dict[str, Any]) -> None:
        """Re-validate hyperparameters (users and schedulers edit param_groups between steps)."""
        options.revalidate_group(self.algorithm, group, self._validated, self._runtimes.get(id(group), []))

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Steps not applied, by reason.  On the device path reading it synchronises (the count is on the device)."""
        if self._skipped_on_device is not None:
            n = int(self._skipped_on_device)
            if n:
                self._skipped["nonfinite"] += n
                self._skipped_on_device.zero_()
        return self._skipped

    def _report(self, reason: str | None, sumsq: Tensor, total_norm: float, clipped: bool,
                stats: tuple[int, Tensor] | None, rectification: list[float | None], seconds: float) -> None:
        """Build the step's :class:`StepReport` (:func:`step_stats.build_report`) and hand it to the report hooks."""
        report = step_stats.build_report(self, reason, sumsq, total_norm, clipped, stats, rectification, seconds)
        for fn in list(self._report_hooks):
            fn(report)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; also drops any reduction still in flight (its gradients are discarded)."""
        for _, rt in self._all_runtimes():
            rt.wait()
            rt.end_step()
        self._collected = None
        self._stats.pre_sums = None
        super().zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------------------------------- introspection
    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state held by this rank, per state tensor, and the unsharded equivalent."""
        return runtime.memory_report(self)

    # ---------------------------------------------------------------------------------------- state_dict
    state_dict_timeout_s = consolidate.DEFAULT_TIMEOUT_S  # how long a sharded state_dict() waits for the others

    def state_dict(self) -> dict[str, Any]:
        """torch.optim-style state with full logical tensors (gathered from all ranks when sharded).

        Loadable at any world size, and by ``load_state_dict`` of a torch.optim optimizer of the same algorithm
        where the keys match.  The extra top-level ``algorithm`` key lets a mismatched load be refused.

        Sharded, this is a collective: call it on every rank, or call :meth:`consolidate_state_dict` on every
        rank and then this on the receiving rank only.  A rank that calls it alone gets a
        :class:`~sharded_optim.consolidate.ConsolidationError` after ``state_dict_timeout_s`` seconds.
        """
        self._rebind_replaced_storage()
        kept = consolidate.held(self)
        if kept is not None:
            return kept
        consolidate.rendezvous(self, "state_dict")
        return serialization.full_state_dict(self)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the full state onto rank ``to`` of the process group (call on every rank), so that
        ``state_dict()`` on that rank alone returns it (torch ``ZeroRedundancyOptimizer``'s protocol).

        The copy is dropped as soon as a step or a load makes it stale.  Not sharded: nothing to do.
        """
        consolidate.validate_to(self, to)
        if not self.sharded:
            return
        self._rebind_replaced_storage()
        consolidate.rendezvous(self, "consolidate_state_dict")
        state_dict = serialization.full_state_dict(self)
        self._consolidated = (consolidate.marker(self), state_dict) if self.rank == to else None

    def _rebind_replaced_storage(self) -> None:
        """Follow parameters whose storage was replaced since the last step (see :mod:`sharded_optim.rebind`)."""
        rebind.rebind_replaced_storage(self)

    def _gather_full(self, rt: ParamRuntime, local: Tensor) -> Tensor:
        """The full flat tensor of which ``local`` is this rank's shard (:func:`serialization.gather_full`)."""
        return serialization.gather_full(self, rt, local)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (any world size) or a torch.optim optimizer of the same algorithm.

        Everything is validated before anything is written: a rejected state dict leaves the optimizer unchanged.
        """
        serialization.load_state_dict(self, state_dict)

    _write_slot = staticmethod(serialization.write_slot)   # this rank's pieces of one parameter (Lookahead uses it)
