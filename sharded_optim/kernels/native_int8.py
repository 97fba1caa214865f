"""The CPU update with 8-bit blockwise state (``native_int8.c``), bitwise the compiled kernel of :mod:`.int8_state`.

On CPU the compiled 8-bit kernel ran at a third of the fp32 kernel's speed: the work is compute-bound there (per
state and element a decode, a 16-bit hash and an encode), and Inductor's code passed over each chunk several times
(update into fp32 temporaries, a loop per block maximum, encoding, single-threaded scale loops).  The C kernel keeps
one block's decoded and updated state in L1 and takes the block maxima in the update's own loop.
:func:`.dispatch.run` calls it for every 8-bit update on a CPU whose variant it implements (the seven exp-free ones,
as :mod:`.native_cpu`), unless the kernel mode is ``"eager"`` or ``SHARDED_OPTIM_NATIVE_CPU=0``; it is built into
the same library as :mod:`.native_cpu`.

Bitwise means every parameter, scale and code, except the code of an element whose new state is NaN (a NaN
gradient): a NaN encodes no number, and which NaN bit pattern an operation returns is each compiler's choice.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import native_cpu
from .int8_state import BLOCK


def accepts(variant: str, tensors: tuple[Tensor, ...]) -> bool:
    """Whether the C kernel runs the 8-bit update of ``variant`` on ``tensors`` (``p, g, *codes, *scales, sc,
    step``, 1-D): every tensor on the CPU, parameter and gradient contiguous float32 of whole blocks, the library
    built and enabled.  Anything else stays with the compiled kernel."""
    p, g = tensors[0], tensors[1]
    return (variant in native_cpu.VARIANT_IDS and p.device.type == "cpu" and p.dim() == 1
            and p.dtype == g.dtype == torch.float32
            and all(t.is_cpu and t.is_contiguous() for t in tensors) and p.numel() % BLOCK == 0
            and native_cpu.enabled())


def update(variant: str, p: Tensor, g: Tensor, *rest: Tensor) -> None:
    """The 8-bit update of ``variant`` in place: ``rest`` is ``*codes, *scales, sc, step`` as the compiled kernel
    of :func:`.int8_state.int8_state` takes them, 1-D (``sc`` the host scalars, ``step`` the int64 counter)."""
    n_state = (len(rest) - 2) // 2
    codes, scales, sc, step = rest[:n_state], rest[n_state:2 * n_state], rest[-2], rest[-1]
    blocks = p.numel() // BLOCK
    dtypes = [torch.int8] + [torch.uint8] * (n_state - 1)   # exp_avg (signed) comes first in every variant here
    if g.numel() != p.numel() or [(c.numel(), c.dtype) for c in codes] != [(p.numel(), d) for d in dtypes] or any(
            s.numel() != blocks or s.dtype != torch.float32 for s in scales):
        raise ValueError(f"native_int8: {variant} takes codes of {p.numel()} elements ({dtypes}) and float32 scales "
                         f"of {blocks} blocks, got codes {[(c.numel(), c.dtype) for c in codes]}, scales "
                         f"{[(s.numel(), s.dtype) for s in scales]}, gradient {g.numel()}")
    lib = native_cpu.library()
    code_ptrs = (ctypes.c_void_p * n_state)(*(c.data_ptr() for c in codes))
    scale_ptrs = (ctypes.c_void_p * n_state)(*(s.data_ptr() for s in scales))
    scalars = sc.to(torch.float32).contiguous()
    rc = lib.sharded_optim_update_int8(native_cpu.VARIANT_IDS[variant], blocks, p.data_ptr(), g.data_ptr(),
                                       code_ptrs, scale_ptrs, scalars.data_ptr(), int(step), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"native_int8: variant {variant!r} is not in the C kernel")
