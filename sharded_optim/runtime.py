"""What :class:`~sharded_optim.optimizer.ShardedOptimizer` needs from a runtime, and how it builds them.

A *runtime* holds the flat buffers of one (param group, dtype, device) and runs its communication.  Two classes
implement it: :class:`sharded_optim.zero.FlatParamGroup` (plain tensors, ZeRO-sharded by us) and
:class:`sharded_optim.fsdp.DTensorParamGroup` (FSDP2/DTensor parameters, sharded already).  :class:`ParamRuntime`
declares the interface the optimizer, its statistics and its serialization use.  :func:`build_runtimes` picks the
implementation per (param group, dtype, device) and exposes the buffers as torch.optim-style ``optimizer.state``;
``fsdp`` (and with it ``torch.distributed.tensor``) is imported only once DTensor parameters show up.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor

from . import rules
from .flat import FlatLayout, Run
from .kernels import int8_state, native_cpu
from .zero import FlatParamGroup



class ParamRuntime(Protocol):
    """The runtime interface (see the module docstring).  Buffers are 1-D, ``layout.local_numel`` elements."""

    params: list[Tensor]
    layout: FlatLayout
    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype
    master: Tensor                 # this rank's shard of the parameters, in ``compute_dtype``
    grad: Tensor                   # this rank's (averaged) gradient shard
    state: dict[str, Tensor]       # per-element optimizer state, in kernel argument order
    state_precision: str           # how ``state`` is stored: "fp32" (the compute dtype), "bf16" or "int8"
    steps: Tensor                  # per-slot step counters (int64)
    mu_products: Tensor            # per-slot NAdam momentum products (float64)
    reduce_group: Any              # the process group partial sums are summed over; None: nothing to reduce
    sync_enabled: bool             # False inside ``no_sync()``
    keeps_dtensor_state: bool      # state_dict entries are DTensors (:class:`DTensorStateRuntime`), not gathered
    native: bool                   # updates run the CPU multi-tensor kernel (:mod:`.kernels.native_cpu`)

    @property
    def has_master_copy(self) -> bool:
        """Whether ``master`` is a separate higher-precision copy worth saving."""
        ...

    def param_state_view(self, slot_index: int, key: str) -> Tensor:
        """A live view of state ``key`` of parameter ``slot_index`` (for ``optimizer.state[p]``)."""
        ...

    def state_values(self, key: str) -> Tensor:
        """This rank's shard of state ``key`` as compute-dtype values (a copy unless stored so)."""
        ...

    def store_state(self, key: str, values: Tensor) -> None:
        """Store ``values`` (this rank's shard of state ``key``) in the state's precision."""
        ...

    def state_args(self, keys: tuple[str, ...], rng: slice) -> tuple[Tensor, ...]:
        """The state arguments of an update kernel over run ``rng`` (8-bit state: codes, then block scales)."""
        ...

    def collect_grads(self, in_place: bool = True) -> list[bool]:
        """Gather this step's gradients into ``grad``; return which parameters had one."""
        ...

    def wait(self) -> None:
        """Complete every gradient reduction in flight."""
        ...

    def end_step(self) -> None:
        """Forget this step's reductions and in-place gradients."""
        ...

    def update_runs(self, has_grad: list[bool], uniform_steps: bool = False) -> list[Run]:
        """The runs of this step's update (see :func:`merge_runs`)."""
        ...

    def ensure_full_buffers(self) -> None:
        """Make ``master`` and ``grad`` cover every parameter (an FSDP2 runtime keeps only what its common path
        copies through them); for callers that read ``master`` whole."""
        ...

    def prepare_update(self) -> None:
        """Make ``master`` reflect parameters written from outside since the last step."""
        ...

    def gather_params(self, wait: bool = True) -> None:
        """Write the updated ``master`` back into the parameters (an all-gather when sharded)."""
        ...

    def wait_params(self, buckets: Iterable[int] | None = None) -> None:
        """Complete parameter all-gathers in flight."""
        ...

    def buckets_of(self, params: Iterable[Tensor]) -> set[int]:
        """The all-gather buckets holding ``params``."""
        ...

    def grad_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The gradient the update of run ``rng`` reads."""
        ...

    def grad_table(self, rng: slice, slots: list[int]) -> tuple[Tensor, int] | None:
        """The run's gradient segments for the CPU multi-tensor kernel (:mod:`.kernels.native_cpu`) and the base
        of their state offsets, or None."""
        ...

    def param_of(self, rng: slice, slots: list[int]) -> Tensor:
        """The parameter values the update of run ``rng`` writes."""
        ...

    def grad_tensors(self) -> list[Tensor]:
        """Every tensor holding this step's gradient elements."""
        ...

    def local_grad_sumsq(self) -> Tensor:
        r"""This rank's :math:`\sum_i g_i^2` in float64 (summed over ``reduce_group`` by the caller)."""
        ...

    def stat_ranges(self) -> list[slice]:
        """Ranges of the local shard that hold parameter elements (padding excluded)."""
        ...

    def state_bytes(self) -> dict[str, int]:
        """Bytes held per buffer."""
        ...

    def rebind_replaced_storage(self, describe: Callable[[int], str] | None = None) -> bool:
        """Follow parameters whose storage was replaced; True if the caller must rebuild the runtime."""
        ...

    def remove_hooks(self) -> None:
        """Remove the gradient hooks this runtime registered."""
        ...


class DTensorStateRuntime(ParamRuntime, Protocol):
    """A runtime whose ``state_dict()`` entries stay sharded DTensors (``keeps_dtensor_state`` is True)."""

    def export_entry(self, slot_index: int, with_mu_product: bool) -> dict[str, Tensor]:
        """``state_dict()``'s entry for one parameter."""
        ...

    def import_entry(self, slot_index: int, entry: dict[str, Any] | None, with_mu_product: bool) -> None:
        """Load one parameter's validated entry; ``None`` resets it."""
        ...


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2) parameter, or a ``Parameter`` wrapping one.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so this imports nothing: plain models
    never load the DTensor machinery (and builds without ``torch.distributed`` never try).
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    if dtensor is None:
        return False
    return isinstance(t, dtensor) or (isinstance(t, torch.nn.Parameter) and
                                      isinstance(getattr(t, "data", None), dtensor))


def ensure_runtimes(opt: Any) -> None:
    """Build flat buffers for param groups of ``opt`` that have none (or whose parameters were swapped while the
    state is still empty, as DeepSpeed does when it hands the optimizer its flat fp32 partitions)."""
    for group in opt.param_groups:
        runtimes = opt._runtimes.get(id(group))
        if runtimes is not None:
            current = [p for rt in runtimes for p in rt.params]
            if len(current) == len(group["params"]) and all(
                    id(p) in opt._locate for p in group["params"]):
                continue
            if any(int(rt.steps.max()) > 0 for rt in runtimes if len(rt.steps)):
                raise RuntimeError("the parameters of a param group changed after the optimizer took steps")
            for rt in runtimes:
                rt.remove_hooks()
        opt._runtimes[id(group)] = build_runtimes(opt, group)
        opt._state_bytes = None


def build_runtimes(opt: Any, group: dict[str, Any]) -> list[ParamRuntime]:
    """One runtime per (dtype, device) of ``group``'s parameters, registered in ``opt.state``: a
    :class:`~sharded_optim.fsdp.DTensorParamGroup` for DTensor parameters, else a :class:`FlatParamGroup`."""
    by_kind: dict[tuple[torch.dtype, torch.device, str], list[Tensor]] = {}
    for p in group["params"]:
        precision = int8_state.effective_precision(group["state_precision"], p.shape, is_dtensor(p))
        by_kind.setdefault((p.dtype, p.device, precision), []).append(p)
    keys = rules.state_keys(opt.algorithm, group)
    runtimes: list[ParamRuntime] = []
    for (dtype, _device, precision), params in by_kind.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        if is_dtensor(params[0]):
            # FSDP2 / DTensor parameters are sharded already: never shard twice (see fsdp.py)
            from .fsdp import DTensorParamGroup
            rt: ParamRuntime = DTensorParamGroup(params, state_keys=keys, master_weights=opt.master_weights,
                                                 state_precision=precision, native=native_cpu_allowed(opt, group))
            register_runtime(opt, rt, keys)
            runtimes.append(rt)
            continue
        rt = FlatParamGroup(
            params, state_keys=keys, process_group=opt.process_group, world=opt.world_size, rank=opt.rank,
            zero_stage=opt.zero_stage, bucket_numel=max(1, opt.bucket_numel_bytes // itemsize),
            master_weights=opt.master_weights, reduce_grads=opt.reduce_grads,
            grad_reduce_dtype=opt.grad_reduce_dtype, gather_dtype=opt.param_gather_dtype,
            overlap=opt.overlap, state_precision=precision, tag_base=_next_tag_base(opt),
            native=native_cpu_allowed(opt, group))
        runtimes.append(rt)
        register_runtime(opt, rt, keys)
    return runtimes


def native_cpu_allowed(opt: Any, group: dict[str, Any]) -> bool:
    """Whether a one-rank CPU runtime of ``group`` may use the multi-tensor kernel: compiled kernels, host
    scalars (the device path's gated kernels read flat gradients) and a variant the kernel implements."""
    return (opt.kernel_mode != "eager" and not opt._on_device
            and rules.kernel_variant(opt.algorithm, group) in native_cpu.VARIANT_IDS)


def _next_tag_base(opt: Any) -> int:
    """A tag range of its own for each flat runtime an optimizer builds (2**16 buckets each): every rank builds
    them in the same order (``agreement`` checks the layouts), so the numbers agree across ranks."""
    opt._runtimes_built = getattr(opt, "_runtimes_built", 0) + 1
    return opt._runtimes_built << 16


def register_runtime(opt: Any, rt: ParamRuntime, keys: tuple[str, ...]) -> None:
    """Expose the runtime's buffers as torch.optim-style ``opt.state[p]`` (live views, not copies), for each
    parameter in the runtime's own order (an FSDP2 runtime puts its large shards last).

    Device path: the step counters move to the parameters' device first, as torch's fused optimizers keep
    ``state['step']`` (then ``state[p]['step']`` is a device tensor; reading it synchronises)."""
    if opt._on_device:
        rt.steps = rt.steps.to(rt.device)
        rt.mu_products = rt.mu_products.to(rt.device)
    for slot_index, slot in enumerate(rt.layout.slots):
        p = rt.params[slot.index]
        opt._locate[id(p)] = (rt, slot_index)
        entry = {"step": rt.steps[slot_index]}
        for key in keys:
            entry[key] = rt.param_state_view(slot_index, key)
        if opt.algorithm == "nadam":
            entry["mu_product"] = rt.mu_products[slot_index]
        opt.state[p] = entry


def attach_model(opt: Any, model: torch.nn.Module) -> None:
    """Register on each module of ``model`` a forward pre-hook that waits for the all-gather of the buckets
    holding its own parameters only (``ShardedOptimizer.attach_model``)."""
    opt._ensure_runtimes()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        targets = [(rt, rt.buckets_of(own)) for _, rt in opt._all_runtimes()]
        targets = [(rt, b) for rt, b in targets if b]

        def pre_hook(_module: torch.nn.Module, _inputs: Any, targets=targets) -> None:
            for rt, buckets in targets:
                rt.wait_params(buckets)
        module.register_forward_pre_hook(pre_hook)


def memory_report(opt: Any) -> dict[str, Any]:
    """Bytes of optimizer state held by this rank of ``opt``, per state tensor, and the unsharded equivalent
    (every parameter element times the itemsize times the number of state tensors)."""
    opt._ensure_runtimes()
    per_key: dict[str, int] = {}
    unsharded = 0
    padding = 0
    for _, rt in opt._all_runtimes():
        held = rt.state_bytes()
        for key, nbytes in held.items():
            per_key[key] = per_key.get(key, 0) + nbytes
        real = sum(slot.numel for slot in rt.layout.slots)
        # bytes per element of each state buffer (8-bit state: the code and its share of a block scale)
        per_element = sum(n for k, n in held.items() if k in rt.state) / max(1, rt.layout.local_numel)
        unsharded += round(real * per_element)
        padding += rt.layout.local_numel - rt.layout.local_real_numel()
    state_bytes = sum(v for k, v in per_key.items() if k not in ("master", "grad_shard"))
    return {"rank": opt.rank, "world_size": opt.world_size, "zero_stage": opt.zero_stage,
            "by_key": per_key, "state_bytes": state_bytes, "unsharded_state_bytes": unsharded,
            "padding_elements": padding}


@contextlib.contextmanager
def no_sync(opt: Any) -> Iterator[None]:
    """``opt.no_sync()``: gradient hooks do not reduce inside the context (gradients accumulate in ``p.grad``);
    the next backward outside it reduces the accumulated sum."""
    opt._ensure_runtimes()
    runtimes = [rt for _, rt in opt._all_runtimes()]
    for rt in runtimes:
        rt.sync_enabled = False
    try:
        yield
    finally:
        for rt in runtimes:
            rt.sync_enabled = True

