"""Choose how a fused update runs: compiled once per variant with ``torch.compile``, or eagerly.

``kernel="auto"`` (the default) compiles and falls back to eager, with one warning, if compilation fails (no C++
compiler on a CPU host, say).  ``kernel="compiled"`` makes such a failure an error; ``kernel="eager"`` never
compiles (fast start, ~3-10x slower steps).  The environment variable ``SHARDED_OPTIM_KERNEL`` overrides
``auto``.  One compiled function per variant, created lazily and shared by every optimizer in the process, with
``dynamic=True`` so that new shard sizes do not recompile (sizes 0 and 1 always specialise; size 0 is skipped).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

from .adam_family import VARIANTS, lookahead_sync
from .fused_stats import POST
from .stats import pre_sums

PRE_SUMS = "pre_sums"  # statistics step, norm pass: sums of the gradient and the state before the update
POST_SUFFIX = "+post"  # statistics step, after the update: the sums of the updated state (reads only)
GATED_PREFIX = "gated:"  # the update applied only where a device flag says so (sharded_optim.device_step)
LOOKAHEAD_SYNC = "lookahead_sync"

KERNEL_MODES = ("auto", "compiled", "eager")
ENV_VAR = "SHARDED_OPTIM_KERNEL"

_broken: set[str] = set()   # variants whose compilation failed in "auto" mode


def resolve_mode(mode: str) -> str:
    """Validate a kernel mode and apply the environment override to ``auto``."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in KERNEL_MODES:
            raise ValueError(f"{ENV_VAR} must be one of {KERNEL_MODES}, got {env!r}")
        mode = env
    return mode


def _function(name: str) -> Callable[..., object]:
    if name == PRE_SUMS:
        return pre_sums
    if name.endswith(POST_SUFFIX):
        return POST[name[: -len(POST_SUFFIX)]]
    if name.startswith(GATED_PREFIX):
        from ..device_step import gated
        return gated(name[len(GATED_PREFIX):])
    if name == LOOKAHEAD_SYNC:
        return lookahead_sync
    if name not in VARIANTS:
        raise KeyError(f"unknown kernel {name!r}; expected one of {sorted(VARIANTS)}, {LOOKAHEAD_SYNC!r}, "
                       f"{PRE_SUMS!r}, a variant + {POST_SUFFIX!r} or {GATED_PREFIX!r} + a variant")
    return VARIANTS[name]


@functools.cache
def _compiled(name: str) -> Callable[..., object]:
    return torch.compile(_function(name), dynamic=True, fullgraph=True)


def run(name: str, mode: str, *tensors: torch.Tensor) -> object:
    """Run kernel ``name`` on ``tensors`` (parameter, gradient, states..., scalars) in place.

    ``PRE_SUMS`` (gradient, first moment, sign, finite flag) returns the statistics sums of the gradient and
    the state before the update (:func:`.stats.pre_sums`), ``name + POST_SUFFIX`` those of the updated state
    (:mod:`.fused_stats`); the other kernels return nothing."""
    first = tensors[1] if name.startswith(GATED_PREFIX) else tensors[0]   # gated kernels take the flag first
    if first.numel() == 0 and name != PRE_SUMS and not name.endswith(POST_SUFFIX):
        return None  # an empty shard (FSDP2 gives some ranks 0 elements); size 0 would also compile apart
    eager = _function(name)
    if mode == "eager" or name in _broken:
        return eager(*tensors)
    try:
        return _compiled(name)(*tensors)
    except Exception as exc:  # compilation problems surface at the first call
        if mode == "compiled":
            raise
        _broken.add(name)
        warnings.warn(f"sharded_optim: compiling kernel {name!r} failed ({type(exc).__name__}: {exc}); "
                      f"using the eager kernel", RuntimeWarning, stacklevel=2)
        return eager(*tensors)
