"""Validation of :class:`~sharded_optim.optimizer.ShardedOptimizer`'s arguments and of the param groups it is given.

Every check runs before anything is stored, so a rejected argument or group leaves the optimizer as it was.
The hyperparameters themselves are :func:`sharded_optim.rules.validate_group`'s business.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from . import rules
from .kernels.int8_state import effective_precision
from .kernels.low_precision import STATE_PRECISIONS

NONFINITE_POLICIES = ("skip", "raise", "ignore")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def as_dtype(name: str, value: Any) -> torch.dtype | None:
    """``value`` (None, a ``torch.dtype`` or one of :data:`DTYPES`' names) as a ``torch.dtype`` or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{name} must be a torch.dtype or one of {sorted(DTYPES)}, got {value!r}")


def resolve_defaults(algorithm: Any, lr: float | Tensor | None, betas: tuple[float, float], eps: float,
                     weight_decay: float | None, algorithm_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The algorithm's lower-case name and the validated param-group defaults (the algorithm's ``lr`` and
    ``weight_decay`` where None, its option defaults where not given)."""
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a string, one of {', '.join(rules.ALGORITHMS)}; got {algorithm!r}")
    algorithm = algorithm.lower()
    options = rules.resolve_options(algorithm, algorithm_options)
    spec = rules.SPECS[algorithm]
    defaults = dict(lr=spec.lr if lr is None else lr, betas=betas, eps=eps,
                    weight_decay=spec.weight_decay if weight_decay is None else weight_decay, **options)
    rules.validate_group(algorithm, defaults)
    return algorithm, defaults


def check_arguments(*, zero_stage: Any, bucket_mb: Any, nonfinite_policy: Any, spike_sigma: Any,
                    spike_window: Any, stats_interval: Any, capturable: Any, state_precision: Any = "fp32") -> None:
    """Raise ``ValueError``/``TypeError`` for a constructor argument out of its range (see the class docstring)."""
    if state_precision not in STATE_PRECISIONS:
        raise ValueError(f"state_precision must be one of {STATE_PRECISIONS}, got {state_precision!r}")
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


def resolve_group(process_group: Any, zero_stage: int) -> tuple[Any, int, int]:
    """``(process group, world size, rank)`` to shard over: ``(None, 1, 0)`` unsharded or without
    ``torch.distributed``, else ``process_group`` or the world group."""
    if zero_stage == 0 or not dist.is_available() or not dist.is_initialized():
        if process_group is not None and zero_stage > 0 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        return None, 1, 0
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def check_params(param_group: Any) -> tuple[list[Tensor], set[str]]:
    """The parameters of a new param group and their device types, checked: real floating point, dense, each
    once, one device type."""
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
    return params, devices


def check_backend(process_group: Any, device: torch.device) -> None:
    """Refuse parameters on a device the process group's backend cannot reduce (nccl: CUDA; gloo: CPU)."""
    backend = dist.get_backend(process_group)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses the nccl backend but parameters are on {device.type}; "
                         "use a gloo group for CPU parameters")
    if backend == "gloo" and device.type not in ("cpu",):
        raise ValueError(f"the process group uses the gloo backend but parameters are on {device.type}; "
                         "use an nccl group for CUDA parameters")


def complete_param_group(algorithm: str, defaults: dict[str, Any], param_group: dict[str, Any],
                         index: int) -> None:
    """Validate a new param group's hyperparameters (over ``defaults``) and complete it in place: DiffMod's
    ``len_memory`` becomes ``beta3`` (:math:`\\beta_3 = 1 - 1/\\text{len\\_memory}`), AdaBound gets ``base_lr``
    (its bounds scale by :math:`\\text{lr}/\\text{base\\_lr}`), every group a ``name`` (``group{index}``)."""
    if "len_memory" in param_group:  # DiffMod's other spelling of beta3: the group stores beta3 only
        converted = rules.len_memory_to_beta3(algorithm, param_group)
        param_group.pop("len_memory")
        param_group.update(converted)
    merged = {**defaults, **{k: v for k, v in param_group.items() if k != "params"}}
    foreign = rules.foreign_options(algorithm, param_group)
    if foreign:
        raise ValueError(f"option {foreign[0]!r} in a param group does not apply to algorithm {algorithm!r}")
    rules.validate_group(algorithm, merged)
    if merged.get("state_precision", "fp32") not in STATE_PRECISIONS:
        raise ValueError(f"param group {index}: state_precision must be one of {STATE_PRECISIONS}, got "
                         f"{merged['state_precision']!r}")
    if algorithm == "adabound":
        param_group.setdefault("base_lr", float(merged["lr"]))  # AdaBound scales its bounds by lr/base_lr
    param_group.setdefault("name", f"group{index}")


def revalidate_group(algorithm: str, group: dict[str, Any], validated: dict[int, tuple],
                     runtimes: list[Any]) -> None:
    """Re-validate ``group``'s hyperparameters unless unchanged since the snapshot kept in ``validated``; the state
    set (``amsgrad``) of a group with ``runtimes`` cannot change."""
    # with each value's type: 0j == 0.0 == False in Python, and an edit to one of those must still be validated
    snapshot = tuple((k, type(v), v if not isinstance(v, Tensor) else float(v)) for k, v in group.items()
                     if k != "params")
    if validated.get(id(group)) == snapshot:
        return  # unchanged since it was last validated
    rules.validate_group(algorithm, group)
    validated[id(group)] = snapshot
    if runtimes and tuple(runtimes[0].state) != rules.state_keys(algorithm, group):
        raise ValueError("amsgrad of a param group was changed after construction; the state set of a group "
                         "is fixed (create a new optimizer to switch amsgrad on or off)")
    if any(rt.state_precision != effective_precision(group["state_precision"], rt.params[0].shape,
                                                     rt.keeps_dtensor_state) for rt in runtimes):
        raise ValueError(f"state_precision of param group {group['name']!r} was changed after construction to "
                         f"{group['state_precision']!r}; the storage of a group is fixed (create a new optimizer, "
                         "and load its state_dict, to change it)")


def config_kwargs(init: Callable[..., Any], config: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Keyword arguments for ``init`` from the fields of dataclass ``config``: ``None`` fields are left out (the
    constructor's default, "the algorithm's default"), ``exclude`` names fields that are not arguments; any other
    field that ``init`` neither names nor takes as an algorithm option raises ``TypeError`` naming it."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance (e.g. an OptimizerConfig), got {type(config).__name__}")
    named = set(inspect.signature(init).parameters) - {"self", "params"}
    accepted = named | set(rules.OPTION_DEFAULTS) | {"decoupled_weight_decay", "len_memory"}
    skip = set(exclude)
    fields = [f.name for f in dataclasses.fields(config) if f.name not in skip]
    unknown = [name for name in fields if name not in accepted]
    if unknown:
        raise TypeError(f"{type(config).__name__} fields {unknown} are not ShardedOptimizer arguments or algorithm "
                        "options (pass exclude=... for fields of your own)")
    return {name: getattr(config, name) for name in fields if getattr(config, name) is not None}

