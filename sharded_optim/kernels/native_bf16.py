"""The CPU update with bfloat16 state (``native_bf16.c``), bitwise the compiled kernel of
:func:`.low_precision.bf16_state`.

On CPU the compiled bf16 kernel ran at 0.27-0.47x of the fp32 kernel's speed, compute-bound on the rounding hash.
The C kernel hashes and rounds in 16-bit lanes and keeps each tile's widened state in L1.  :func:`.dispatch.run`
calls it for every bf16 update on a CPU whose variant it implements (the seven exp-free ones, as
:mod:`.native_cpu`), unless the kernel mode is ``"eager"`` or ``SHARDED_OPTIM_NATIVE_CPU=0``; it is built into the
same library as :mod:`.native_cpu`.

Bitwise means every parameter and stored state, except the pattern stored for a NaN: which NaN a conversion to
bfloat16 returns is each implementation's choice (here: the upper half with the quiet bit set).
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native_cpu


def accepts(variant: str, tensors: tuple[Tensor, ...]) -> bool:
    """Whether the C kernel runs the bf16 update of ``variant`` on ``tensors`` (``p, g, *states, sc, step``):
    every tensor on the CPU and contiguous, parameter and gradient float32, the states bfloat16, the library built
    and enabled.  Anything else stays with the compiled kernel."""
    p, g, states = tensors[0], tensors[1], tensors[2:-2]
    return (variant in native_cpu.VARIANT_IDS and p.device.type == "cpu" and p.dtype == g.dtype == torch.float32
            and all(s.dtype == torch.bfloat16 for s in states)
            and all(t.is_cpu and t.is_contiguous() for t in tensors) and native_cpu.enabled())


def update(variant: str, p: Tensor, g: Tensor, *rest: Tensor) -> None:
    """The bf16 update of ``variant`` in place: ``rest`` is ``*states, sc, step`` as the compiled kernel of
    :func:`.low_precision.bf16_state` takes them (``sc`` the host scalars, ``step`` the int64 counter)."""
    states, sc, step = rest[:-2], rest[-2], rest[-1]
    if g.numel() != p.numel() or any(s.numel() != p.numel() or s.dtype != torch.bfloat16 for s in states):
        raise ValueError(f"native_bf16: {variant} takes a gradient and bfloat16 states of {p.numel()} elements, "
                         f"got gradient {g.numel()}, states {[(s.numel(), s.dtype) for s in states]}")
    state_ptrs = (ctypes.c_void_p * len(states))(*(s.data_ptr() for s in states))
    scalars = sc.to(torch.float32).contiguous()
    rc = native_cpu.library().sharded_optim_update_bf16(native_cpu.VARIANT_IDS[variant], p.numel(), p.data_ptr(),
                                                        g.data_ptr(), state_ptrs, scalars.data_ptr(), int(step),
                                                        torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"native_bf16: variant {variant!r} is not in the C kernel")
