r"""Optimizer state stored in bfloat16, updated by the fp32 math of :mod:`.adam_family` in the same fused loop.

A ``bf16`` kernel loads each state tensor, widens it to fp32, runs the variant's update exactly as the fp32
kernel does (the parameter step uses the fp32 values, before any rounding), and stores each state back in
bfloat16.  Compiled, the widened copies never reach memory: one read and one write of every compressed tensor.  On
CPU :func:`.dispatch.run` runs the C kernel of :mod:`.native_bf16` instead, bitwise this one (NaN patterns aside).

How each state is rounded to bfloat16 (8 significant bits, a relative spacing of :math:`2^{-8}` to
:math:`2^{-7}`):

* **stochastic** for the exponential moving averages ``exp_avg`` (m), ``exp_avg_sq`` (v), ``exp_avg_lr`` (s)
  and AdaMax's ``exp_inf`` (u).  A step moves them by a fraction :math:`1-\beta` of the gap to the new value;
  with :math:`\beta_2 = 0.999` that is 0.1%, under half a bfloat16 spacing, so round-to-nearest would return
  the old value and the average would stop moving (measured in ``tests/test_low_precision.py``).  Stochastic
  rounding rounds up with probability equal to the fraction of the spacing, so the stored value is unbiased.
* **nearest** for ``max_exp_avg_sq`` (a running maximum: no small increments to lose) and ``previous_grad``
  (a copy of the gradient, not accumulated).

Bound per stored element and step (the quantizer's documented bound, tested): :math:`|q(x) - x| <
\mathrm{ulp}_{bf16}(x)` for stochastic rounding, :math:`\le \mathrm{ulp}_{bf16}(x)/2` for nearest.

The random bits come from the data, not from a generator: a hash of the fp32 bits of the new value, the
gradient's bits, the step counter and the state's position.  They depend on nothing but the element and the step,
so results are the same on any number of ranks and shard boundaries (a generator's stream would follow the shard
offsets), need no RNG state in checkpoints, and cost a few integer operations per element.  The step counter
matters: without it, a state at a fixed point (constant gradient) would see the same bits every step and round
the same way forever, which is the stall of round-to-nearest again (measured: v stuck 65% below fp32).
"""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import Tensor

from .adam_family import VARIANTS

STATE_PRECISIONS = ("fp32", "bf16", "int8")   # int8: blockwise 8-bit codes, kernels.int8_state
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# per state letter of a variant name (adam_mv, bound_mvxs, adamax_mu, adam_mvg, ...): stochastic rounding?
STOCHASTIC = {"m": True, "v": True, "s": True, "u": True, "x": False, "g": False}

_HALF = 0xFFFF
# multipliers below 2**15: a 16-bit value times one, plus a 16-bit value, stays below 2**31, so the hash never
# overflows int32 (signed overflow is undefined in the C++ that Inductor emits on CPU)
_MIX = (0x6B43, 0x4E6D, 0x5A35, 0x7A4B)


def state_letters(variant: str) -> str:
    """The state set of ``variant`` as letters, in kernel argument order (``"mvxs"`` for ``bound_mvxs``)."""
    return variant.split("_", 1)[1]


def random_bits(x_bits: Tensor, salt_bits: Tensor, position: int) -> Tensor:
    """16 pseudo-random bits per element (int32 in [0, 65536)) from two int32 tensors of fp32 bit patterns and a
    small integer: the four 16-bit halves enter one at a time, each round a multiply (mod 2**16) and an xorshift.

    Everything is int32 and no product reaches 2**31, so the compiled CPU loop stays vectorised (an int64 hash made
    the 8-bit kernel's loop 5x slower) and nothing overflows.  Measured on 2**20 inputs (consecutive values,
    consecutive salts, random): every output byte and the 16-bit value are as uniform as from a random function."""
    a, b = x_bits & _HALF, (x_bits >> 16) & _HALF
    c, d = salt_bits & _HALF, ((salt_bits >> 16) ^ (position * 0x3C6F)) & _HALF
    h = (a * _MIX[0] + c) & _HALF
    h = h ^ (h >> 8)
    h = ((h ^ b) * _MIX[1] + d) & _HALF
    h = h ^ (h >> 7)
    h = ((h ^ c) * _MIX[2] + a) & _HALF
    h = h ^ (h >> 9)
    h = ((h ^ d) * _MIX[3] + b) & _HALF
    h = h ^ (h >> 8)
    h = (h * _MIX[0]) & _HALF
    return h ^ (h >> 7)


def rounding_salt(g: Tensor, step: Tensor) -> Tensor:
    """The per-element salt of the rounding bits: the gradient's fp32 bits mixed with the step counter (int32, for
    :func:`random_bits`)."""
    return g.to(torch.float32).view(torch.int32) ^ ((step & _HALF).to(torch.int32) * 0x2545)


def round_stochastic(x: Tensor, salt_bits: Tensor, position: int = 0) -> Tensor:
    """``x`` (fp32) rounded to bfloat16 stochastically: up to the next bfloat16 with probability equal to the
    fraction of the spacing that ``x`` lies above the one below (in magnitude).

    Adding 16 random bits below the bfloat16 mantissa and truncating is exactly that rule; the sign bit is
    untouched (two's complement addition on the pattern carries only into the exponent, as rounding up should).
    Infinities and NaN stay what they are (their low 16 bits are cleared or already carry no value)."""
    finite = torch.isfinite(x)
    bits = torch.where(finite, x.view(torch.int32), 0)   # a NaN's pattern plus the noise could overflow int32
    rounded = (bits + random_bits(bits, salt_bits, position)) & -65536
    out = rounded.view(torch.float32)
    return torch.where(finite, out, x).to(torch.bfloat16)


def bf16_state(variant: str) -> Callable[..., None]:
    """The update of ``variant`` with every state tensor stored in bfloat16 (rounding as in the module text).

    Signature ``(p, g, *states, sc, step)``: the fp32 kernel's, ``p`` and ``sc`` in fp32 (the master), states
    bfloat16, plus the int64 step counter ``step`` (0-d), which enters the rounding bits."""
    kernel = VARIANTS[variant]
    letters = state_letters(variant)

    def update(p: Tensor, g: Tensor, *rest: Tensor) -> None:
        states, sc, step = rest[:-2], rest[-2], rest[-1]
        wide = [t.to(torch.float32) for t in states]
        kernel(p, g, *wide, sc)
        salt = rounding_salt(g, step)
        for position, (t, w, letter) in enumerate(zip(states, wide, letters)):
            t.copy_(round_stochastic(w, salt, position) if STOCHASTIC[letter] else w.to(torch.bfloat16))
    return distinct(update, f"bf16_{variant}")


def distinct(fn: Callable[..., None], name: str) -> Callable[..., None]:
    """``fn`` with a code object of its own named ``name``.  torch.compile caches per code object: closures of
    one ``def`` share theirs, so nine variants would crowd one cache (and pass its recompile limit)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    out = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__qualname__ = name
    return out


def state_dtype(precision: str) -> torch.dtype:
    """The storage dtype of ``precision`` (``"fp32"`` or ``"bf16"``; int8 codes: :func:`.int8_state.codes_dtype`);
    anything else is a ``ValueError``."""
    if precision not in STATE_DTYPES:
        raise ValueError(f"state_precision must be one of {STATE_PRECISIONS} (int8: per state key), "
                         f"got {precision!r}")
    return STATE_DTYPES[precision]
