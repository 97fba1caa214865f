"""Choose how a fused update runs: compiled once per kernel with ``torch.compile``, or eagerly.

``kernel="auto"`` (the default) compiles and falls back to eager, with one warning, if compilation fails (no C++
compiler on a CPU host, say).  ``kernel="compiled"`` makes such a failure an error; ``kernel="eager"`` never
compiles (fast start, ~3-10x slower steps).  The environment variable ``SHARDED_OPTIM_KERNEL`` overrides
``auto``.

The registry is typed: a :class:`Kernel` is a :class:`Role` plus, for per-variant roles, a variant, validated when
it is made, so an unknown name fails where it is written and nothing falls back to another kernel.  One compiled
function per kernel, created lazily and shared by every optimizer in the process, with
``dynamic=True`` so that new shard sizes do not recompile (sizes 0 and 1 always specialise; size 0 is skipped).
"""
from __future__ import annotations

import enum
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .adam_family import VARIANTS, lookahead_sync
from .fused_stats import POST
from . import int8_state, native_bf16, native_int8
from .low_precision import STATE_PRECISIONS, bf16_state
from .stats import pre_sums

KERNEL_MODES = ("auto", "compiled", "eager")
ENV_VAR = "SHARDED_OPTIM_KERNEL"


class Role(enum.Enum):
    """What a kernel does; with a variant (a state set of :data:`.adam_family.VARIANTS`) it names one function."""

    UPDATE = "update"                   # the fused update of one state set
    GATED = "gated"                     # the update applied only where a device flag says so (device_step)
    POST_SUMS = "post_sums"             # statistics step, after the update: sums of the updated state (reads only)
    PRE_SUMS = "pre_sums"               # statistics step, norm pass: sums of the gradient and state before it
    LOOKAHEAD_SYNC = "lookahead_sync"   # Lookahead's slow-weight synchronisation

    @property
    def per_variant(self) -> bool:
        """Whether kernels of this role exist once per update variant."""
        return self in (Role.UPDATE, Role.GATED, Role.POST_SUMS)


@dataclass(frozen=True)
class Kernel:
    """One entry of the kernel registry: a role and, for per-variant roles, the variant.

    Construction validates: an unknown variant, a variant on a role that takes none, or none where one is needed
    raise at once, so no call can reach a kernel it did not name.  Instances are hashable (the compile cache is
    keyed by them); use :func:`update`, :func:`gated`, :func:`post_sums`, :data:`PRE_SUMS`, :data:`LOOKAHEAD_SYNC`.
    """

    role: Role
    variant: str | None = None
    precision: str = "fp32"   # how the state is stored (:mod:`.low_precision`, :mod:`.int8_state`); update roles only

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise TypeError(f"Kernel.role must be a Role, got {type(self.role).__name__} {self.role!r}")
        if self.role.per_variant and self.variant not in VARIANTS:
            raise KeyError(f"unknown kernel variant {self.variant!r} for role {self.role.value!r}; expected one "
                           f"of {sorted(VARIANTS)}")
        if not self.role.per_variant and self.variant is not None:
            raise ValueError(f"kernel role {self.role.value!r} takes no variant, got {self.variant!r}")
        if self.precision not in STATE_PRECISIONS:
            raise ValueError(f"state precision must be one of {STATE_PRECISIONS}, got {self.precision!r}")
        if self.precision != "fp32" and self.role not in (Role.UPDATE, Role.GATED):
            raise ValueError(f"kernel role {self.role.value!r} has no {self.precision} form")

    def __str__(self) -> str:
        name = self.role.value if self.variant is None else f"{self.role.value}:{self.variant}"
        return name if self.precision == "fp32" else f"{name}:{self.precision}"

    def function(self) -> Callable[..., object]:
        """The eager function of this kernel."""
        if self.role is Role.UPDATE:
            return VARIANTS[self.variant] if self.precision == "fp32" else _LOW[self.precision](self.variant)
        if self.role is Role.GATED:
            from ..device_step import gated as gated_form
            return gated_form(self.variant, self.precision)
        if self.role is Role.POST_SUMS:
            return POST[self.variant]
        if self.role is Role.PRE_SUMS:
            return pre_sums
        return lookahead_sync

    @property
    def returns_sums(self) -> bool:
        """Statistics kernels return sums (and run on empty shards); the others return nothing."""
        return self.role in (Role.PRE_SUMS, Role.POST_SUMS)


# one function (one compile cache entry) per variant and precision
_LOW = {"bf16": functools.cache(bf16_state), "int8": functools.cache(int8_state.int8_state)}
_NATIVE_LOW = {"bf16": native_bf16, "int8": native_int8}   # the CPU kernels of each low precision


@functools.cache
def update(variant: str, precision: str = "fp32") -> Kernel:
    """The fused update of ``variant`` with its state stored in ``precision`` (interned: one object each)."""
    return Kernel(Role.UPDATE, variant, precision)


@functools.cache
def gated(variant: str, precision: str = "fp32") -> Kernel:
    """The device-gated update of ``variant``: takes a boolean flag first (:mod:`sharded_optim.device_step`)."""
    return Kernel(Role.GATED, variant, precision)


@functools.cache
def post_sums(variant: str) -> Kernel:
    """The statistics of the state ``variant`` just updated (:mod:`.fused_stats`)."""
    return Kernel(Role.POST_SUMS, variant)


PRE_SUMS = Kernel(Role.PRE_SUMS)
LOOKAHEAD_SYNC = Kernel(Role.LOOKAHEAD_SYNC)

_broken: set[Kernel] = set()   # kernels whose compilation failed in "auto" mode


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


@functools.cache
def _compiled(kernel: Kernel) -> Callable[..., object]:
    return torch.compile(kernel.function(), dynamic=True, fullgraph=True)


def run(kernel: Kernel, mode: str, *tensors: torch.Tensor) -> object:
    """Run ``kernel`` on ``tensors`` (parameter, gradient, states..., scalars) in place.

    :data:`PRE_SUMS` (gradient, first moment, sign, finite flag) returns the statistics sums of the gradient and
    the state before the update (:func:`.stats.pre_sums`), :func:`post_sums` kernels those of the updated state
    (:mod:`.fused_stats`); the other kernels return nothing.  Anything but a :class:`Kernel` is a ``TypeError``.
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a sharded_optim.kernels.dispatch.Kernel (update(variant), gated(variant), "
                        f"post_sums(variant), PRE_SUMS, LOOKAHEAD_SYNC), got {type(kernel).__name__} {kernel!r}")
    first = tensors[1] if kernel.role is Role.GATED else tensors[0]   # gated kernels take the flag first
    if first.numel() == 0 and not kernel.returns_sums:
        return None  # an empty shard (FSDP2 gives some ranks 0 elements); size 0 would also compile apart
    native = _NATIVE_LOW.get(kernel.precision) if kernel.role is Role.UPDATE and mode != "eager" else None
    if native is not None and native.accepts(kernel.variant, tensors):   # CPU: bitwise the compiled kernel, faster
        return native.update(kernel.variant, *tensors)
    if kernel.precision == "int8" and first.dim() == 1:   # as (blocks, 256) views, in chunks: int8_state
        offset = 1 if kernel.role is Role.GATED else 0
        n_state = (len(tensors) - offset - 4) // 2   # (p, g, *codes, *scales, sc, step)
        for part in int8_state.blocked_calls(tensors, offset, n_state):
            run(kernel, mode, *part)
        return None
    if mode == "eager" or kernel in _broken:
        return kernel.function()(*tensors)
    try:
        return _compiled(kernel)(*tensors)
    except Exception as exc:  # compilation problems surface at the first call
        if mode == "compiled":
            raise
        _broken.add(kernel)
        warnings.warn(f"sharded_optim: compiling kernel {str(kernel)!r} failed ({type(exc).__name__}: {exc}); "
                      f"using the eager kernel", RuntimeWarning, stacklevel=2)
        return kernel.function()(*tensors)
