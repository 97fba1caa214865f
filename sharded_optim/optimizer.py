"""``ShardedOptimizer``: the public ``torch.optim.Optimizer`` for the whole Adam family, ZeRO-sharded.

This class does bookkeeping only: param groups, validation, the step sequence, state_dict.  The math lives in
:mod:`sharded_optim.rules` (host scalars) and :mod:`sharded_optim.kernels` (the fused update); buffers and
communication in :mod:`sharded_optim.zero`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
import math
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import agreement, consolidate, device_step, rebind, rules
from .kernels import dispatch
from .kernels import stats as stats_kernels
from .telemetry.fields import NUM_FIELDS
from .telemetry.report import StepReport
from .zero import FlatParamGroup, all_gather

NONFINITE_POLICIES = ("skip", "raise", "ignore")
_LOCAL = object()  # key for partial sums that need no reduction
_GRAD_SUMSQ = stats_kernels.PRE_FIELDS.index("grad_sumsq")
FRICTION_KEY = "previous_grad"  # diffgrad/diffmod state: the previous (transformed) gradient
MASTER_KEY = "master_param"  # fp32 master copy of bf16/fp16 parameters, in state_dict()
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _intersect(rng: slice, ranges: list[slice]) -> Iterator[slice]:
    """The parts of ``rng`` inside ``ranges`` (both in local-shard coordinates)."""
    for r in ranges:
        lo, hi = max(rng.start, r.start), min(rng.stop, r.stop)
        for start in range(lo, hi, stats_kernels.MAX_CALL_NUMEL):  # int32 counts stay exact
            yield slice(start, min(hi, start + stats_kernels.MAX_CALL_NUMEL))


def _index(slots: list[int], device: torch.device | None = None) -> slice | Tensor:
    """Index of a run's slots into the per-slot counters: a slice when consecutive (no index tensor, no copy)."""
    if slots == list(range(slots[0], slots[-1] + 1)):
        return slice(slots[0], slots[-1] + 1)
    return torch.tensor(slots, dtype=torch.long, device=device)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or (type(t).__name__ == "Parameter" and
                                              type(getattr(t, "data", None)).__name__ == "DTensor")


def _as_dtype(name: str, value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"{name} must be a torch.dtype or one of {sorted(_DTYPES)}, got {value!r}")


@dataclass
class _Collected:
    """Gradients collected into the shards and their global sums of squares per param group (float64; on the
    host on the host path, on the device on the device path); ``max_norm`` once ``clip_grad_norm_`` asked."""

    has_grad: dict[int, list[bool]]
    sumsq: Tensor
    max_norm: float | None = None

    def total_norm(self) -> Tensor:
        return self.sumsq.sum().sqrt()


@dataclass
class _Decision:
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
        return float(self.norm)

    def clipped(self) -> bool:
        """Whether clipping scaled the gradients (reads the device norm on the device path)."""
        if self.max_norm is None:
            return float(self.coef) < 1.0
        norm = float(self.norm)
        return math.isfinite(norm) and self.max_norm / (norm + 1e-6) < 1.0


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
                 capturable: bool = False, **algorithm_options: Any):
        if not isinstance(algorithm, str):
            raise TypeError(f"algorithm must be a string, one of {', '.join(rules.ALGORITHMS)}; got {algorithm!r}")
        algorithm = algorithm.lower()
        options = rules.resolve_options(algorithm, algorithm_options)
        spec = rules.SPECS[algorithm]
        defaults = dict(lr=spec.lr if lr is None else lr, betas=betas, eps=eps,
                        weight_decay=spec.weight_decay if weight_decay is None else weight_decay, **options)
        rules.validate_group(algorithm, defaults)
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r}")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        if nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_policy must be one of {NONFINITE_POLICIES}, got {nonfinite_policy!r}")
        if spike_sigma is not None and (isinstance(spike_sigma, bool) or not isinstance(spike_sigma, (int, float))
                                        or not spike_sigma > 0):
            raise ValueError(f"spike_sigma must be None or a number > 0, got {spike_sigma!r}")
        if isinstance(spike_window, bool) or not isinstance(spike_window, int) or spike_window < 2:
            raise ValueError(f"spike_window must be an integer >= 2, got {spike_window!r}")
        if isinstance(stats_interval, bool) or not isinstance(stats_interval, int) or stats_interval < 0:
            raise ValueError(f"stats_interval must be an integer >= 0, got {stats_interval!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        if capturable and (nonfinite_policy == "raise" or spike_sigma is not None):
            raise ValueError("capturable=True decides every step on the device; nonfinite_policy='raise' and "
                             "spike_sigma need the gradient norm on the host: use nonfinite_policy='skip' or "
                             "'ignore' and spike_sigma=None, or capturable=False")
        self.capturable = capturable
        self._on_device = capturable   # the device path (device_step); CUDA parameters switch it on too
        self.algorithm = algorithm
        self.zero_stage = zero_stage
        self.kernel_mode = dispatch.resolve_mode(kernel)
        self.bucket_numel_bytes = int(bucket_mb * 2**20)
        self.overlap = overlap
        self.reduce_grads = reduce_grads
        self.grad_reduce_dtype = _as_dtype("grad_reduce_dtype", grad_reduce_dtype)
        self.param_gather_dtype = _as_dtype("param_gather_dtype", param_gather_dtype)
        self.master_weights = master_weights
        self.nonfinite_policy = nonfinite_policy
        self.spike_sigma = spike_sigma
        self._recent_norms: deque[float] = deque(maxlen=spike_window)
        self.stats_interval = stats_interval
        self.overlap_param_gather = bool(overlap_param_gather)
        self._attached = False
        self.process_group, self.world_size, self.rank = self._resolve_group(process_group)
        self.steps_attempted = 0
        self._skipped: dict[str, int] = {"nonfinite": 0, "spike": 0}   # host path; see skipped_steps
        self._skipped_on_device: Tensor | None = None   # device path: skipped steps not yet read back
        self._runtimes: dict[int, list[FlatParamGroup]] = {}   # id(param group) -> its flat runtimes
        self._locate: dict[int, tuple[FlatParamGroup, int]] = {}  # id(param) -> (runtime, slot)
        self._collected: _Collected | None = None   # set by clip_grad_norm_, consumed by the next step
        self._hyper = device_step.HyperparameterBuffers()   # device path: each group's hyperparameters on device
        self._diverged: set[int] = set()   # device path: runtimes whose step counters no longer all agree
        self._local_sumsq_parts: list[Tensor] = []  # per-runtime shard sums of squares of the last norm pass
        # id(runtime) -> PRE_FIELDS sums of the gradient and the state before the update, when the last norm pass
        # was that of a statistics step (it then decides that the next step computes statistics); else None
        self._pre_sums: dict[int, Tensor] | None = None
        # Statistics ride on the next gradient-norm all-reduce instead of taking one of their own (see
        # _group_norms): the local partial sums of the last statistics step wait here, the global ones that came
        # back wait in _delivered_stats for the next report.  Each is (step the statistics describe, sums).
        self._pending_stats: tuple[int, dict[Any, Tensor]] | None = None
        self._delivered_stats: tuple[int, Tensor] | None = None
        # sums of the updated state still to read back (sharded statistics steps): they run at the start of the
        # next step, while that step's gradient reduce-scatters are in flight (see _finish_deferred_stats)
        self._deferred_post: list[Callable[[], None]] = []
        # id(runtime) -> copy of its previous_grad taken by the statistics pass before a diffgrad/diffmod update
        self._friction_before: dict[int, Tensor] = {}
        self._report_hooks: list[Callable[[StepReport], None]] = []
        self._validated: dict[int, tuple] = {}
        self._state_bytes: int | None = None
        self._shard_hooks: list[Callable[[FlatParamGroup, dict[str, Any]], None]] = []
        self._building = True
        self._rendezvous_tag = consolidate.new_tag()  # state_dict() rendezvous: same number on every rank
        super().__init__(params, defaults)
        self._building = False
        if self.sharded:
            self._ensure_runtimes()  # the gradient hooks must exist before the first backward
            agreement.verify(self)  # every rank lays out the same flat buffers, or every rank raises

    # ---------------------------------------------------------------------------------------- setup
    @property
    def sharded(self) -> bool:
        return self.zero_stage > 0 and self.world_size > 1

    def _resolve_group(self, process_group: Any) -> tuple[Any, int, int]:
        if self.zero_stage == 0 or not dist.is_available() or not dist.is_initialized():
            if process_group is not None and self.zero_stage > 0 and not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("process_group was given but torch.distributed is not initialised")
            return None, 1, 0
        group = process_group if process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group), dist.get_rank(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated first: a rejected group leaves the optimizer unchanged)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}; the optimizer can only optimize Tensors")
            if p.is_complex():
                raise TypeError(f"params[{i}] is complex ({p.dtype}); ShardedOptimizer supports real floating "
                                "point parameters only (view complex parameters with torch.view_as_real)")
            if not p.is_floating_point():
                raise TypeError(f"params[{i}] has dtype {p.dtype}; expected a floating point parameter")
            if p.is_sparse:
                raise TypeError(f"params[{i}] is a sparse tensor; ShardedOptimizer supports dense parameters only")
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears more than once in the same param group")
            seen.add(id(p))
        devices = {p.device.type for p in params}
        if len(devices) > 1:
            raise ValueError(f"a param group mixes devices {sorted(devices)}; put parameters of each device type "
                             "in their own optimizer or param group")
        if self.sharded and params:
            self._check_backend(params[0].device)
        if "cuda" in devices and self.nonfinite_policy != "raise" and self.spike_sigma is None:
            if self.state:
                raise ValueError("a CUDA param group cannot join an optimizer whose state lives on the host path")
            self._on_device = True  # no host synchronisation inside step() (device_step)
        if "len_memory" in param_group:  # DiffMod's other spelling of beta3: the group stores beta3 only
            converted = rules.len_memory_to_beta3(self.algorithm, param_group)
            param_group.pop("len_memory")
            param_group.update(converted)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        spec = rules.SPECS[self.algorithm]
        for key in rules.OPTION_DEFAULTS:
            if key in param_group and key not in spec.options:
                raise ValueError(f"option {key!r} in a param group does not apply to algorithm {self.algorithm!r}")
        rules.validate_group(self.algorithm, merged)
        if self.algorithm == "adabound":
            param_group.setdefault("base_lr", float(merged["lr"]))  # AdaBound scales its bounds by lr/base_lr
        param_group.setdefault("name", f"group{len(self.param_groups)}")
        super().add_param_group(param_group)
        if not self._building and self.sharded:
            self._ensure_runtimes()
            agreement.verify(self)

    def _check_backend(self, device: torch.device) -> None:
        backend = dist.get_backend(self.process_group)
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group uses the nccl backend but parameters are on {device.type}; "
                             "use a gloo group for CPU parameters")
        if backend == "gloo" and device.type not in ("cpu",):
            raise ValueError(f"the process group uses the gloo backend but parameters are on {device.type}; "
                             "use an nccl group for CUDA parameters")

    def _ensure_runtimes(self) -> None:
        """Build flat buffers for param groups that have none (or whose parameters were swapped while the state
        is still empty, as DeepSpeed does when it hands the optimizer its flat fp32 partitions)."""
        for group in self.param_groups:
            runtimes = self._runtimes.get(id(group))
            if runtimes is not None:
                current = [p for rt in runtimes for p in rt.params]
                if len(current) == len(group["params"]) and all(
                        id(p) in self._locate for p in group["params"]):
                    continue
                if any(int(rt.steps.max()) > 0 for rt in runtimes if len(rt.steps)):
                    raise RuntimeError("the parameters of a param group changed after the optimizer took steps")
                for rt in runtimes:
                    rt.remove_hooks()
            self._runtimes[id(group)] = self._build_runtimes(group)
            self._state_bytes = None

    def _build_runtimes(self, group: dict[str, Any]) -> list[FlatParamGroup]:
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in group["params"]:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        keys = rules.state_keys(self.algorithm, group)
        runtimes = []
        for (dtype, _device), params in by_kind.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            if _is_dtensor(params[0]):
                # FSDP2 / DTensor parameters are sharded already: never shard twice (see fsdp.py)
                from .fsdp import DTensorParamGroup
                rt = DTensorParamGroup(params, state_keys=keys, master_weights=self.master_weights)
                self._register_runtime(rt, params, keys)
                runtimes.append(rt)
                continue
            rt = FlatParamGroup(
                params, state_keys=keys, process_group=self.process_group, world=self.world_size, rank=self.rank,
                zero_stage=self.zero_stage, bucket_numel=max(1, self.bucket_numel_bytes // itemsize),
                master_weights=self.master_weights, reduce_grads=self.reduce_grads,
                grad_reduce_dtype=self.grad_reduce_dtype, gather_dtype=self.param_gather_dtype,
                overlap=self.overlap)
            runtimes.append(rt)
            self._register_runtime(rt, params, keys)
        return runtimes

    def _place_counters(self, rt: Any) -> None:
        """Device path: the step counters live on the parameters' device, as torch's fused optimizers keep
        ``state['step']`` (then ``state[p]['step']`` is a device tensor; reading it synchronises)."""
        if self._on_device:
            rt.steps = rt.steps.to(rt.device)
            rt.mu_products = rt.mu_products.to(rt.device)

    def _register_runtime(self, rt: Any, params: list[Tensor], keys: tuple[str, ...]) -> None:
        """Expose the runtime's buffers as torch.optim-style ``self.state[p]`` (live views, not copies)."""
        self._place_counters(rt)
        for slot_index, slot in enumerate(rt.layout.slots):
            p = params[slot.index]
            self._locate[id(p)] = (rt, slot_index)
            entry = {"step": rt.steps[slot_index]}
            for key in keys:
                entry[key] = rt.param_state_view(slot_index, key)
            if self.algorithm == "nadam":
                entry["mu_product"] = rt.mu_products[slot_index]
            self.state[p] = entry

    def _all_runtimes(self) -> Iterator[tuple[dict[str, Any], FlatParamGroup]]:
        for group in self.param_groups:
            for rt in self._runtimes.get(id(group), []):
                yield group, rt

    # ---------------------------------------------------------------------------------------- hooks
    def add_report_hook(self, fn: Callable[[StepReport], None]) -> Callable[[], None]:
        """Call ``fn(report)`` after every step (taken or skipped); returns a function that removes the hook."""
        self._report_hooks.append(fn)
        return lambda: self._report_hooks.remove(fn) if fn in self._report_hooks else None

    def add_shard_hook(self, fn: Callable[[FlatParamGroup, dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``fn(runtime, group)`` after each shard's update and before the parameter all-gather (Lookahead)."""
        self._shard_hooks.append(fn)
        return lambda: self._shard_hooks.remove(fn) if fn in self._shard_hooks else None

    def attach_model(self, model: torch.nn.Module) -> None:
        """Let each module of ``model`` wait, in a forward pre-hook, for the all-gather of its own parameters only
        (used with ``overlap_param_gather=True``: the gather of later layers overlaps the forward of earlier ones)."""
        self._ensure_runtimes()
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            targets = [(rt, rt.buckets_of(own)) for _, rt in self._all_runtimes()]
            targets = [(rt, b) for rt, b in targets if b]

            def pre_hook(_module: torch.nn.Module, _inputs: Any, targets=targets) -> None:
                for rt, buckets in targets:
                    rt.wait_params(buckets)
            module.register_forward_pre_hook(pre_hook)
        self._attached = True

    def wait_params(self) -> None:
        """Complete every parameter all-gather still in flight (a no-op unless ``overlap_param_gather``)."""
        for _, rt in self._all_runtimes():
            rt.wait_params()

    # ---------------------------------------------------------------------------------------- gradients
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: inside this context backward does not reduce; the next backward outside does."""
        self._ensure_runtimes()
        runtimes = [rt for _, rt in self._all_runtimes()]
        for rt in runtimes:
            rt.sync_enabled = False
        try:
            yield
        finally:
            for rt in runtimes:
                rt.sync_enabled = True

    def _collect(self) -> dict[int, list[bool]]:
        self._finish_deferred_stats()  # before waiting: the reduce-scatters launched by backward are in flight
        # a statistics step's sums read the flat gradient buffer: gradients are not read in place then
        # (nor with shard hooks: Lookahead reads the flat master right after the update)
        in_place = not (self.stats_interval > 0 and (self.steps_attempted + 1) % self.stats_interval == 0) \
            and not self._shard_hooks
        return {id(rt): rt.collect_grads(in_place) for _, rt in self._all_runtimes()}

    def _finish_deferred_stats(self) -> None:
        """Read back the updated state of the last statistics step (statistics of the parameters and the step
        sizes, :func:`~sharded_optim.kernels.stats._post`).

        Sharded, those sums are only needed at the next step's norm all-reduce, and nothing changes the state in
        between (anything that would, such as loading a checkpoint, calls this first).  Deferred to the start of
        the next step, they run while the main thread would otherwise only wait for the gradient
        reduce-scatters: a 2-rank gloo run spends about 18 ms per step there.
        """
        deferred, self._deferred_post = self._deferred_post, []
        for read_back in deferred:
            read_back()

    def _group_norms(self, has_grad: dict[int, list[bool]]) -> Tensor:
        """Global pre-clip gradient sum of squares per param group (float64), one all-reduce.

        The local statistics sums of the previous statistics step, if any, are packed into the same all-reduce:
        a second collective per statistics step measured 0.5 ms median and up to 4 ms at the 90th percentile on
        gloo, more than the statistics themselves.  The global sums are kept for the next report.

        Before a statistics step the local pass is :func:`~sharded_optim.kernels.stats.pre_sums` over the ranges
        the update will cover (kept in ``_pre_sums``): their ``grad_sumsq`` is the shard's sum of squares, since
        the rest of the shard (bucket padding, parameters without a gradient) holds zeros.
        """
        per_group: dict[Any, list[Tensor | float]] = {}
        devices: dict[Any, torch.device] = {}
        self._local_sumsq_parts = []  # this rank's shard sums, kept for the report's per-rank shard norm
        stats_next = self.stats_interval > 0 and (self.steps_attempted + 1) % self.stats_interval == 0
        self._pre_sums = {} if stats_next else None
        for i, group in enumerate(self.param_groups):
            for rt in self._runtimes.get(id(group), []):
                key = rt.reduce_group if rt.reduce_group is not None else _LOCAL
                acc = per_group.setdefault(key, [0.0] * len(self.param_groups))
                devices.setdefault(key, rt.device)
                if self._pre_sums is None:
                    local = rt.local_grad_sumsq()
                else:  # statistics step: the norm comes out of the statistics pass over the gradient
                    pre = self._pre_pass(group, rt, has_grad[id(rt)], finite=True)
                    self._pre_sums[id(rt)] = pre
                    local = pre[_GRAD_SUMSQ]
                self._local_sumsq_parts.append(local)
                acc[i] = acc[i] + local
        pending, self._pending_stats = self._pending_stats, None
        n = len(self.param_groups)
        if pending is not None and any(v.shape[0] != n for v in pending[1].values()):
            pending = None  # a param group was added since: those sums no longer line up with the groups
        if pending is None and len(per_group) == 1 and _LOCAL in per_group and not self._on_device:
            return torch.tensor([float(x) for x in per_group[_LOCAL]], dtype=torch.float64)  # one process
        # partial sums stay on the parameters' device: NCCL reduces CUDA tensors only (and a float made into a
        # device tensor by a fill, not a copy from the host, which would synchronise)
        packed = {k: torch.stack([x if isinstance(x, Tensor) else
                                  torch.zeros((), dtype=torch.float64, device=devices[k]) for x in v])
                  for k, v in per_group.items()}
        if pending is None:
            return self._reduce_sum(packed, (n,))
        stats_step, partials = pending
        for key, sums in partials.items():
            norms = packed.get(key, torch.zeros(n, dtype=torch.float64, device=sums.device))
            packed[key] = torch.cat([norms, sums.reshape(-1)])
        for key, norms in packed.items():
            if key not in partials:  # every key must send the same length
                packed[key] = torch.cat([norms, norms.new_zeros(n * NUM_FIELDS)])
        total = self._reduce_sum(packed, (n + n * NUM_FIELDS,))
        self._delivered_stats = (stats_step, total[n:].view(n, NUM_FIELDS))
        return total[:n]

    def flush_stats(self) -> tuple[int, Tensor] | None:
        """Make the statistics of the last statistics step global now, instead of with the next step.

        Statistics normally travel with the next step's gradient-norm all-reduce, so the report of step
        ``t + 1`` carries those of step ``t`` (``StepReport.stats_step``).  Call this once training is over
        to get the last ones: ``(step, sums)`` with sums of shape ``(num_groups, NUM_FIELDS)``, or ``None``
        if none are waiting.  A collective when sharded: call it on every rank, as :meth:`step`.
        """
        self._finish_deferred_stats()
        pending, self._pending_stats = self._pending_stats, None
        if pending is None:
            delivered, self._delivered_stats = self._delivered_stats, None
            return delivered
        self._delivered_stats = None
        stats_step, partials = pending
        return stats_step, self._reduce_sum(partials, (len(self.param_groups), NUM_FIELDS)).cpu()

    def _reduce_sum(self, partials: dict[Any, Tensor], shape: tuple[int, ...]) -> Tensor:
        """Sum per-process-group partial sums: one all_reduce per group over which shards are disjoint.

        The partials live on the device of their parameters.  On the host path the result comes back to the host
        (the one host synchronisation of a step: the skip decision and the clip coefficient need the value); on
        the device path (:mod:`.device_step`) it stays on the device of the first partial."""
        total: Tensor | None = None
        for key, value in partials.items():
            if key is not _LOCAL:
                dist.all_reduce(value, group=key)
            if not self._on_device:
                value = value.cpu()
            elif total is not None:
                value = value.to(total.device, non_blocking=True)
            total = value.reshape(shape) if total is None else total + value.reshape(shape)
        return total if total is not None else torch.zeros(shape, dtype=torch.float64)

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

    def _collected_grads(self) -> "_Collected":
        """Stages 1-2 of a step: gradients into the shards, then their global sums of squares per group."""
        if self._collected is not None:
            return self._collected  # clip_grad_norm_ ran them already
        has_grad = self._collect()
        return _Collected(has_grad, self._group_norms(has_grad))

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
        partials: dict[Any, Tensor] | None = {} if self._pre_sums is not None else None  # a statistics step
        if self._on_device:
            decision = self._decide_on_device(collected)
            if partials is not None:  # statistics step: masking non-finite elements needs to know (synchronises)
                decision.finite = bool(torch.isfinite(decision.norm))
        else:
            decision = self._decide_on_host(collected)
        rectification: list[float | None] = []
        if decision.reason is None:
            for gi, group in enumerate(self.param_groups):
                rectification.append(self._update_group(group, gi, collected.has_grad, partials, decision))
            if partials is not None and all(key is _LOCAL for key in partials):  # no collective needed
                self._delivered_stats = (self.steps_attempted,
                                         self._reduce_sum(partials, (len(self.param_groups), NUM_FIELDS)))
            elif partials is not None:  # global with the next gradient-norm all-reduce (or flush_stats)
                self._pending_stats = (self.steps_attempted, partials)
        self._pre_sums = None
        for _, rt in self._all_runtimes():
            rt.end_step()
        if self._report_hooks:  # reads the norm and the decision: a synchronisation on the device path
            total_norm = decision.host_norm()
            reason = decision.reason if decision.keep is None else (None if bool(decision.keep) else "nonfinite")
            if self._on_device and decision.max_norm is None:
                decision.coef = 1.0
            if self._on_device:
                rectification = self._device_rectification()
            delivered, self._delivered_stats = self._delivered_stats, None
            self._report(reason, collected.sumsq.cpu(), total_norm, decision.clipped(), delivered, rectification,
                         time.perf_counter() - start)
        return loss

    def _decide_on_host(self, collected: "_Collected") -> "_Decision":
        """Skip and clip decided from the norm read back to the host (the CPU default)."""
        total_norm = math.sqrt(float(collected.sumsq.sum()))
        reason = self._skip_reason(total_norm)
        if reason is not None:
            self._skipped[reason] += 1
        elif math.isfinite(total_norm):
            self._recent_norms.append(total_norm)
        coef = 1.0
        if collected.max_norm is not None and math.isfinite(total_norm):
            coef = min(1.0, collected.max_norm / (total_norm + 1e-6))
        return _Decision(reason=reason, norm=total_norm, coef=coef, finite=math.isfinite(total_norm))

    def _decide_on_device(self, collected: "_Collected") -> "_Decision":
        """Skip and clip are decided on the device, inside each runtime's scalar kernel (:func:`device_step.prepare`),
        from ``collected.sumsq``: nothing synchronises here.  Lookahead must know whether the step is taken before
        it runs (its slow-weight sync is not gated): with shard hooks the flag is read (a synchronisation)."""
        decision = _Decision(reason=None, norm=collected.total_norm(), coef=1.0, sumsq=collected.sumsq,
                             max_norm=collected.max_norm)
        if self._shard_hooks and self.nonfinite_policy == "skip" and not bool(torch.isfinite(decision.norm)):
            decision.reason = "nonfinite"
            self._skipped["nonfinite"] += 1
        return decision

    def _check_group(self, group: dict[str, Any]) -> None:
        """Re-validate hyperparameters (users and schedulers edit param_groups between steps)."""
        snapshot = tuple((k, v if not isinstance(v, Tensor) else float(v)) for k, v in group.items() if k != "params")
        if self._validated.get(id(group)) == snapshot:
            return  # unchanged since it was last validated
        rules.validate_group(self.algorithm, group)
        self._validated[id(group)] = snapshot
        runtimes = self._runtimes.get(id(group), [])
        if runtimes and tuple(runtimes[0].state) != rules.state_keys(self.algorithm, group):
            raise ValueError("amsgrad of a param group was changed after construction; the state set of a group "
                             "is fixed (create a new optimizer to switch amsgrad on or off)")

    def _skip_reason(self, total_norm: float) -> str | None:
        if not math.isfinite(total_norm) and self.nonfinite_policy != "ignore":
            if self.nonfinite_policy == "raise":
                raise FloatingPointError(f"non-finite gradient norm {total_norm} at step {self.steps_attempted}; "
                                         "parameters and optimizer state were left unchanged")
            return "nonfinite"
        if self.spike_sigma is not None and len(self._recent_norms) >= max(8, self._recent_norms.maxlen // 4):
            mean = sum(self._recent_norms) / len(self._recent_norms)
            std = math.sqrt(sum((x - mean) ** 2 for x in self._recent_norms) / len(self._recent_norms))
            if total_norm > mean + self.spike_sigma * std:
                return "spike"
        return None

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Steps not applied, by reason.  On the device path reading it synchronises (the count is on the device)."""
        if self._skipped_on_device is not None:
            n = int(self._skipped_on_device)
            if n:
                self._skipped["nonfinite"] += n
                self._skipped_on_device.zero_()
        return self._skipped

    def _device_rectification(self) -> list[float | None]:
        """RAdam's r_t per group for the report, from the (synchronised) step counters."""
        out: list[float | None] = []
        for group in self.param_groups:
            runtimes = self._runtimes.get(id(group), [])
            if self.algorithm != "radam" or not runtimes or not len(runtimes[0].steps):
                out.append(None)
                continue
            t = int(runtimes[0].steps.max())
            out.append(rules.host_scalars(self.algorithm, group, max(t, 1), initial_lr=0.0).rectification)
        return out

    def _update_group(self, group: dict[str, Any], gi: int, has_grad: dict[int, list[bool]],
                      partials: dict[Any, Tensor] | None, decision: "_Decision") -> float | None:
        rectification = None
        variant = rules.kernel_variant(self.algorithm, group)
        for rt in self._runtimes.get(id(group), []):
            runs = rt.update_runs(has_grad[id(rt)], uniform_steps=self._on_device and id(rt) not in self._diverged)
            rt.prepare_update()
            stats = None
            if partials is not None:
                key = rt.reduce_group if rt.reduce_group is not None else _LOCAL
                stats = partials.setdefault(
                    key, torch.zeros(len(self.param_groups), NUM_FIELDS, dtype=torch.float64, device=rt.device))[gi]
            keys = tuple(rt.state)
            if stats is not None:
                real = rt.stat_ranges()
                # the norm pass assumed finite gradients; with non-finite ones (nonfinite_policy="ignore") the
                # sums are taken again, masked: the gradient and the state are still those it read
                pre = self._pre_sums.pop(id(rt)) if decision.finite else self._pre_pass(group, rt, has_grad[id(rt)],
                                                                                         finite=False)
                stats_kernels.add_pre_sums(stats, pre)
            post: list[tuple[slice, Tensor]] = []  # statistics step: (range, scalars) still to read back
            if self._on_device:
                scalar_runs = self._device_runs(group, rt, runs, variant, keys, decision)
            else:
                scalar_runs = self._host_runs(group, rt, runs, variant, keys, decision)
            for rng, sc, rect in scalar_runs:
                if stats is not None:  # statistics step: the updated state is read back over real elements
                    post.extend((sub, sc) for sub in _intersect(rng, real))
                rectification = rect
            if post:
                read_back = functools.partial(self._post_stats, rt, variant, keys, post, stats, float(group["lr"]))
                # now if Lookahead is about to rewrite the parameters or one process reports this very step;
                # otherwise they are needed at the next norm all-reduce only: defer (_finish_deferred_stats)
                if self._shard_hooks or rt.reduce_group is None:
                    read_back()
                else:
                    self._deferred_post.append(read_back)
            for fn in self._shard_hooks:
                fn(rt, group)
            rt.gather_params(wait=not self.overlap_param_gather)
        return rectification

    def _host_runs(self, group: dict[str, Any], rt: FlatParamGroup, runs: list[tuple[slice, list[int]]],
                   variant: str, keys: tuple[str, ...], decision: "_Decision") -> Iterator[tuple[slice, Tensor, Any]]:
        """The update with host scalars from host step counters (the clip coefficient in the gradient scale)."""
        steps = rt.steps.tolist()
        mus = rt.mu_products.tolist()
        for rng, slots in runs:
            t = steps[slots[0]] + 1
            hs = rules.host_scalars(self.algorithm, group, t, initial_lr=float(group.get("base_lr", 0.0)),
                                    mu_product=mus[slots[0]])
            hs.values[rules.GSCALE] *= decision.coef
            sc = torch.tensor(hs.values, dtype=rt.compute_dtype, device=rt.device)
            dispatch.run(variant, self.kernel_mode, rt.param_of(rng, slots), rt.grad_of(rng, slots),
                         *(rt.state[k][rng] for k in keys), sc)
            index = _index(slots)
            rt.steps[index] += 1
            if hs.mu_product is not None:
                rt.mu_products[index] = hs.mu_product
            yield rng, sc, hs.rectification

    def _device_runs(self, group: dict[str, Any], rt: FlatParamGroup, runs: list[tuple[slice, list[int]]],
                     variant: str, keys: tuple[str, ...], decision: "_Decision") -> Iterator[tuple[slice, Tensor, Any]]:
        """The gated update with scalars computed on the device from device step counters.

        Usually one scalar kernel per runtime: its counters agree.  After a step that left some parameters out (no
        gradient, one rank) they differ, and each run computes its own (still on the device)."""
        max_norm = math.inf if decision.max_norm is None else decision.max_norm
        h = self._hyper.get(rules.hyperparameters(self.algorithm, group, float(group.get("base_lr", 0.0))) + [max_norm], id(group),
                            rt.device)
        compiled = self.kernel_mode != "eager" and rt.device.type == "cuda"
        diverged = id(rt) in self._diverged
        shared = None if diverged else device_step.prepare(
            self.algorithm, group, self.nonfinite_policy == "skip", decision.sumsq, h, rt.steps[0], rt.mu_products[0],
            rt.compute_dtype, compiled)
        covered = 0
        for rng, slots in runs:
            first = slots[0]
            sc, keep, mu_after = shared or device_step.prepare(
                self.algorithm, group, self.nonfinite_policy == "skip", decision.sumsq, h, rt.steps[first],
                rt.mu_products[first], rt.compute_dtype, compiled)
            dispatch.run(dispatch.GATED_PREFIX + variant, self.kernel_mode, keep, rt.param_of(rng, slots),
                         rt.grad_of(rng, slots), *(rt.state[k][rng] for k in keys), sc)
            covered += len(slots)
            if diverged:
                index = _index(slots, rt.device)
                rt.steps[index] += keep.long()
                if self.algorithm == "nadam":
                    rt.mu_products[index] = torch.where(keep, mu_after, rt.mu_products[index])
            yield rng, sc, None
        if shared is not None:
            sc, keep, mu_after = shared
            if covered == len(rt.layout.slots):   # every counter moves together: one update
                rt.steps.add_(keep.long())
                if self.algorithm == "nadam":
                    rt.mu_products.copy_(torch.where(keep, mu_after, rt.mu_products))
            else:   # some parameters had no gradient: their counters stay, and from now on counters differ
                for _rng, slots in runs:
                    index = torch.tensor(slots, dtype=torch.long)
                    rt.steps[index.to(rt.device)] += keep.long()
                    if self.algorithm == "nadam":
                        rt.mu_products[index.to(rt.device)] = torch.where(keep, mu_after,
                                                                          rt.mu_products[index.to(rt.device)])
                self._diverged.add(id(rt))
        if decision.keep is None:
            decision.keep = shared[1] if shared is not None else keep
            self._count_skip(decision.keep)

    def _count_skip(self, keep: Tensor) -> None:
        if self._skipped_on_device is None or self._skipped_on_device.device != keep.device:
            self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=keep.device)
        self._skipped_on_device += (~keep).long()

    def _pre_pass(self, group: dict[str, Any], rt: FlatParamGroup, has_grad: list[bool], finite: bool) -> Tensor:
        """``PRE_FIELDS`` sums of the gradient and the first moment before the update, over the real elements of
        the ranges the update will cover (:func:`~sharded_optim.kernels.stats.pre_sums`), in float64."""
        gscale = torch.tensor(-1.0 if group.get("maximize", False) else 1.0, dtype=torch.float64, device=rt.device)
        m = rt.state[next(iter(rt.state))]  # every variant's first state tensor is the first moment
        if FRICTION_KEY in rt.state:
            # diffGrad/DiffMod: the update overwrites the previous gradient, and the statistics of its friction
            # need the old one (see kernels.stats._post); a copy on statistics steps only, dropped by _post_stats
            # (sharded: at the start of the next step, after the user's zero_grad, so zero_grad keeps it)
            self._friction_before[id(rt)] = rt.state[FRICTION_KEY].clone()
        real = rt.stat_ranges()
        total = torch.zeros(len(stats_kernels.PRE_FIELDS), dtype=torch.float64, device=rt.device)
        for rng, _ in rt.update_runs(has_grad):
            for sub in _intersect(rng, real):
                total += dispatch.run(dispatch.PRE_SUMS, self.kernel_mode, rt.grad[sub], m[sub], gscale, finite)
        return total

    def _post_stats(self, rt: FlatParamGroup, variant: str, keys: tuple[str, ...], post: list[tuple[slice, Tensor]],
                    stats: Tensor, lr: float) -> None:
        """Statistics of the updated state over the ranges the update covered (reads only)."""
        edges = stats_kernels.edges_for(rt.device)
        before = self._friction_before.pop(id(rt), None)
        if FRICTION_KEY in rt.state and before is None:
            raise RuntimeError("statistics of the diffGrad friction need the previous gradient from before the "
                               "update; the statistics pass did not keep it")
        for sub, sc in post:
            extra = () if before is None else (before[sub],)
            sums = dispatch.run(variant + dispatch.POST_SUFFIX, self.kernel_mode, rt.master[sub],
                                *(rt.state[k][sub] for k in keys), *extra, sc, edges)
            stats_kernels.add_post_sums(stats, sums, lr)

    def _report(self, reason: str | None, sumsq: Tensor, total_norm: float, clipped: bool,
                stats: tuple[int, Tensor] | None, rectification: list[float | None], seconds: float) -> None:
        # Few tensor calls: right after the update kernels each one costs tens of microseconds (cold caches), and
        # this runs on every step (0.25 ms per step in the 2-rank benchmark with float() on each element, 0.15 ms
        # with one tolist()).
        local_sumsq = sum(x.item() for x in self._local_sumsq_parts)  # computed with the global norm
        # counting non-finite elements costs a pass: only when the shard's norm says there are some
        shard_nonfinite = 0 if math.isfinite(local_sumsq) else \
            sum(int((~torch.isfinite(g)).sum()) for _, rt in self._all_runtimes() for g in rt.grad_tensors())
        if self._state_bytes is None:
            self._state_bytes = self.memory_report()["state_bytes"]  # constant once the buffers exist
        report = StepReport(
            step=self.steps_attempted, skipped_reason=reason,
            group_names=[str(g.get("name", f"group{i}")) for i, g in enumerate(self.param_groups)],
            lrs=[float(g["lr"]) for g in self.param_groups], grad_norm=total_norm,
            group_grad_norms=[math.sqrt(x) for x in sumsq.tolist()], clipped=clipped, algorithm=self.algorithm,
            stats=None if stats is None else stats[1], stats_step=None if stats is None else stats[0],
            radam_rectification=rectification, rank=self.rank,
            shard_grad_norm=math.sqrt(local_sumsq) if math.isfinite(local_sumsq) else float("nan"),
            shard_nonfinite=shard_nonfinite, state_bytes=self._state_bytes, step_seconds=seconds)
        for fn in list(self._report_hooks):
            fn(report)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; also drops any reduction still in flight (its gradients are discarded)."""
        for _, rt in self._all_runtimes():
            rt.wait()
            rt.end_step()
        self._collected = None
        self._pre_sums = None
        super().zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------------------------------- introspection
    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state held by this rank, per state tensor, and the unsharded equivalent."""
        self._ensure_runtimes()
        per_key: dict[str, int] = {}
        unsharded = 0
        padding = 0
        for _, rt in self._all_runtimes():
            for key, nbytes in rt.state_bytes().items():
                per_key[key] = per_key.get(key, 0) + nbytes
            real = sum(slot.numel for slot in rt.layout.slots)
            itemsize = torch.empty((), dtype=rt.compute_dtype).element_size()
            unsharded += real * itemsize * len(rt.state)
            padding += rt.layout.local_numel - rt.layout.local_real_numel()
        state_bytes = sum(v for k, v in per_key.items() if k not in ("master", "grad_shard"))
        return {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "by_key": per_key, "state_bytes": state_bytes, "unsharded_state_bytes": unsharded,
                "padding_elements": padding}

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
        return self._full_state_dict()

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
        state_dict = self._full_state_dict()
        self._consolidated = (consolidate.marker(self), state_dict) if self.rank == to else None

    def _rebind_replaced_storage(self) -> None:
        """Follow parameters whose storage was replaced since the last step (see :mod:`sharded_optim.rebind`)."""
        rebind.rebind_replaced_storage(self)

    def _full_state_dict(self) -> dict[str, Any]:
        self._ensure_runtimes()
        self.wait_params()
        for _, rt in self._all_runtimes():
            rt.prepare_update()  # a master copy must reflect parameters written since the last step
        state: dict[int, dict[str, Tensor]] = {}
        groups = []
        index = 0
        gathered: dict[tuple[int, str], Tensor] = {}
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            ids = []
            for p in group["params"]:
                rt, slot_index = self._locate[id(p)]
                slot = rt.layout.slots[slot_index]
                ids.append(index)
                step = int(rt.steps[slot_index])
                if getattr(rt, "keeps_dtensor_state", False):
                    # FSDP2/DTensor parameters: state stays sharded, as DTensors (what DCP expects; see fsdp.py)
                    state[index] = rt.export_entry(slot_index, self.algorithm == "nadam")
                elif step > 0:
                    entry: dict[str, Tensor] = {"step": torch.tensor(step, dtype=torch.int64)}
                    for key in rt.state:
                        full = gathered.get((id(rt), key))
                        if full is None:
                            full = gathered[(id(rt), key)] = self._gather_full(rt, rt.state[key])
                        entry[key] = full[slot.offset: slot.offset + slot.numel].view(slot.shape)
                    if self.algorithm == "nadam":
                        entry["mu_product"] = torch.tensor(float(rt.mu_products[slot_index]), dtype=torch.float64)
                    if rt.has_master_copy:
                        # bf16/fp16 parameters: the fp32 master is state too, or a resume loses precision
                        full = gathered.get((id(rt), MASTER_KEY))
                        if full is None:
                            full = gathered[(id(rt), MASTER_KEY)] = self._gather_full(rt, rt.master)
                        entry[MASTER_KEY] = full[slot.offset: slot.offset + slot.numel].view(slot.shape)
                    state[index] = entry
                index += 1
            packed["params"] = ids
            groups.append(packed)
        return {"state": state, "param_groups": groups, "algorithm": self.algorithm}

    def _gather_full(self, rt: FlatParamGroup, local: Tensor) -> Tensor:
        if self.world_size == 1:
            return local
        full = torch.empty(rt.layout.total_numel, dtype=local.dtype, device=local.device)
        for bucket in rt.layout.buckets:
            all_gather(full[rt.layout.bucket_full_range(bucket)],
                                        local[rt.layout.bucket_local_range(bucket)].contiguous(),
                                        group=self.process_group)
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (any world size) or a torch.optim optimizer of the same algorithm.

        Everything is validated before anything is written: a rejected state dict leaves the optimizer unchanged.
        """
        self._ensure_runtimes()
        self.wait_params()
        self._loads = getattr(self, "_loads", 0) + 1  # a consolidated state_dict is stale from here on
        self._finish_deferred_stats()  # they describe the state about to be replaced
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
        saved_algorithm = state_dict.get("algorithm", self.algorithm)
        if saved_algorithm != self.algorithm:
            raise ValueError(f"state_dict is for algorithm {saved_algorithm!r}, this optimizer runs "
                             f"{self.algorithm!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        new_hparams = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} has {len(saved['params'])} parameters in the state_dict and "
                                 f"{len(group['params'])} in the optimizer")
            spec = rules.SPECS[self.algorithm]
            absent = [k for k in rules.COMMON_HYPERPARAMETERS if k not in saved]
            if absent:
                raise ValueError(f"param group {gi} of the state_dict is missing hyperparameter(s) {absent}")
            foreign = [k for k in rules.OPTION_DEFAULTS if k in saved and k not in spec.options]
            if foreign:
                raise ValueError(f"param group {gi} of the state_dict has option(s) {foreign} that algorithm "
                                 f"{self.algorithm!r} does not use: it was saved by another algorithm")
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for key in ("betas",):
                if isinstance(merged.get(key), list):
                    merged[key] = tuple(merged[key])
            rules.validate_group(self.algorithm, merged)
            if bool(merged.get("amsgrad", False)) != bool(group.get("amsgrad", False)):
                raise ValueError(f"param group {gi}: state_dict has amsgrad={merged.get('amsgrad')} but the "
                                 f"optimizer has amsgrad={group.get('amsgrad')}")
            new_hparams.append({k: v for k, v in merged.items() if k != "params"})
        saved_state = state_dict["state"]
        plan = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            keys = rules.state_keys(self.algorithm, group)
            for saved_id, p in zip(saved["params"], group["params"]):
                entry = saved_state.get(saved_id)
                if entry is None:
                    plan.append((p, None))
                    continue
                required = ("step",) + keys + (("mu_product",) if self.algorithm == "nadam" else ())
                missing = [k for k in required if k not in entry]
                if missing:
                    raise ValueError(f"state of parameter {saved_id} (group {gi}) is missing key(s) {missing}")
                for key in keys:
                    value = entry[key]
                    if not isinstance(value, Tensor):
                        raise TypeError(f"state[{saved_id}][{key!r}] must be a tensor, got {type(value).__name__}")
                    if value.numel() != p.numel() or (value.dim() and tuple(value.shape) != tuple(p.shape)):
                        raise ValueError(f"state[{saved_id}][{key!r}] has shape {tuple(value.shape)}, the "
                                         f"parameter has shape {tuple(p.shape)}")
                if MASTER_KEY in entry and entry[MASTER_KEY].numel() != p.numel():
                    raise ValueError(f"state[{saved_id}][{MASTER_KEY!r}] has {entry[MASTER_KEY].numel()} elements, "
                                     f"the parameter has {p.numel()}")
                step = entry["step"]
                step_value = float(step.item() if isinstance(step, Tensor) else step)
                if not (step_value >= 0 and step_value == int(step_value)):
                    raise ValueError(f"state[{saved_id}]['step'] must be an integer >= 0, got {step_value}")
                plan.append((p, entry))
        if self.sharded or self._on_device:  # both keep one step count per run without reading the counters
            for gi, group in enumerate(self.param_groups):
                steps = {int(float(e["step"])) if e is not None else 0 for p, e in plan if any(p is q for q in group["params"])}
                if len(steps) > 1:
                    raise ValueError(f"param group {gi}: a sharded or device-path (CUDA, capturable) optimizer needs "
                                     "one step count per param group, "
                                     f"the state_dict has {sorted(steps)}")
        # validated: apply
        for group, hparams in zip(self.param_groups, new_hparams):
            group.update(hparams)
        for p, entry in plan:
            rt, slot_index = self._locate[id(p)]
            if getattr(rt, "keeps_dtensor_state", False):
                rt.import_entry(slot_index, entry, self.algorithm == "nadam")  # DTensor state: see fsdp.py
                continue
            for key in rt.state:
                source = None if entry is None else entry[key].detach().reshape(-1)
                self._write_slot(rt, slot_index, rt.state[key], source)
            if rt.has_master_copy and entry is not None and MASTER_KEY in entry:
                master = entry[MASTER_KEY].detach()
                self._write_slot(rt, slot_index, rt.master, master.reshape(-1))
                p.detach().copy_(master.view_as(p))  # the parameters follow their restored master
            rt.steps[slot_index] = 0 if entry is None else int(float(entry["step"]))
            if self.algorithm == "nadam":
                rt.mu_products[slot_index] = 1.0 if entry is None else float(entry["mu_product"])

    @staticmethod
    def _write_slot(rt: FlatParamGroup, slot_index: int, buffer: Tensor, source: Tensor | None) -> None:
        """Write this rank's pieces of parameter ``slot_index`` into ``buffer`` from the flattened full ``source``
        (zeros when ``source`` is None)."""
        for piece in rt.layout.pieces:
            if piece.slot != slot_index:
                continue
            dst = buffer[piece.local_lo: piece.local_lo + piece.hi - piece.lo]
            if source is None:
                dst.zero_()
            else:
                dst.copy_(source[piece.lo: piece.hi])
