r"""Optimizer state stored in 8 bits per element, blockwise, updated by the fp32 math of :mod:`.adam_family` in
the same fused loop.

Every state tensor is cut into blocks of :data:`BLOCK` = 256 consecutive elements (blocks start at multiples of
256 of each parameter: the flat layout aligns parameters and shard boundaries to 256, so a block never straddles a
parameter or a rank, and the blocks are the same on any number of ranks).  A block stores one fp32 scale, the
power of two at or above its largest magnitude, and 256 one-byte codes.  The code is a tiny float under the block
scale: 8 levels per octave, evenly spaced within the octave,

.. math::  x = \pm\, 2^{e}\,(1 + i/8), \qquad i = 0, \dots, 7, \qquad
           e = e_{\mathrm{scale}} - 1, e_{\mathrm{scale}} - 2, \dots

which is the fp32 bit pattern with its mantissa cut to 3 bits: the code ``c`` (the distance from the scale, in
levels) stands for the float whose bits are ``bits(scale) - c << 20``.  ``c`` runs from 0 (the scale itself) to
``K - 2``; ``c = K - 1`` stands for 0.  Codes are stored as :math:`\pm(K-1-c)`, so code 0 is the value 0 (a zeroed
buffer is a zero state).  Signed states (``exp_avg``, ``previous_grad``) are int8 (a sign and :math:`K = 128`
magnitudes: 15.75 octaves); the non-negative ones (``exp_avg_sq``, ``max_exp_avg_sq``, ``exp_avg_lr``,
``exp_inf``) are uint8 (:math:`K = 256`: 31.75 octaves).  Why this code (``bench/state_codes.py`` measured the
alternatives on a training run: with a linear absmax code for :math:`v` AdamW diverged on every seed, with one for
:math:`m` the update direction was off by 50% on average, against 9% with a logarithmic code):

* a *relative* spacing, 1/16 to 1/8 of the value (a true logarithmic code, :math:`2^{1/8}-1` = 9% everywhere, is
  the same in quality and was 6x slower on CPU: its ``log2``/``exp2`` per element against integer adds and shifts
  here), wherever in the block an element is: a linear absmax code spaces levels ``max/127`` apart, so an element
  100x below its block's largest is held to about +-40% and one 1000x below is 0.  In the denominator
  :math:`\sqrt{v}+\epsilon` that turns into wrong or exploding steps;
* a power-of-two scale puts every block on the same absolute grid, so a value that does not change is stored again
  exactly, whatever happens to its block's largest element (a scale that follows the max would re-round every
  element every step);
* a non-negative state never rounds to 0 (a value below the last level is stored as the last level: a larger
  :math:`v` only shortens the step), while a signed one may (its error is then below the last level).  The last
  level is ``K - 2`` levels below the scale, or higher where that would leave the normal floats.

Rounding is stochastic between the two neighbouring levels, with probability proportional to the distance (to
:math:`2^{-16}` of a spacing), so the stored value is unbiased: the moving averages move by :math:`1-\beta` of the gap
per step, far below one level, and round-to-nearest would stop them (see :mod:`.low_precision`).  In the bit
pattern that is the bfloat16 rule again: add 16 random bits under the kept mantissa and truncate.  The random bits
are the same hash of element, gradient, step and state as in bf16, so results do not depend on the sharding.  A
value on the grid is stored exactly (its dropped bits are 0): dequantize-then-quantize is the identity, which makes
fp32 checkpoints of int8 state exact.  Bound per stored element: :math:`|q(x) - x| <` one level spacing at
:math:`x`, :math:`2^{\lfloor \log_2 |x| \rfloor - 3} \le |x|/8`, above the last level; the last level itself below it.

The kernel works on ``(blocks, 256)`` views (:func:`blocked_calls`): with 1-D arguments reshaped inside the compiled
function, Inductor indexes every element through divisions by the symbolic block count, 8x slower on CPU.  On CPU
:func:`.dispatch.run` runs the C kernel of :mod:`.native_int8` instead, bitwise this one and 2x faster.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .adam_family import VARIANTS
from .low_precision import distinct, random_bits, rounding_salt, state_letters

BLOCK = 256        # elements per scale
LEVELS_PER_OCTAVE = 8
SHIFT = 23 - 3     # fp32 mantissa bits dropped: 3 kept, 2**3 = LEVELS_PER_OCTAVE levels per octave
SMALL_NUMEL = 4096  # tensors below this keep fp32 state (as bitsandbytes and torchao do): too small to matter
# Elements per kernel call on CPU: Inductor keeps the updated fp32 state of a call in temporaries (8 bytes per
# element for two states), and chunks bound them whatever the shard size, at one extra call (~0.2 ms of host
# time) per million elements.  Elsewhere one call per GPU_CHUNK: a launch costs tens of microseconds there, and
# Triton reduces each 256-element row on chip (the bound only keeps element indices small).
CHUNK = 1 << 20
GPU_CHUNK = 1 << 27
_ONE = 0x3F800000      # the bits of 1.0: the scale of an all-zero block
_EXPONENT = 0x7F800000
_MIN_NORMAL = 1 << 23 >> SHIFT   # the grid index of the smallest normal float: lower levels would be subnormal


def effective_precision(precision: str, shape: Sequence[int], row_sharded: bool = False) -> str:
    """The state precision of a parameter of ``shape`` in a param group of state ``precision``: that, except that
    with ``"int8"`` a tensor of fewer than :data:`SMALL_NUMEL` elements keeps fp32 state (biases, norms: a few
    percent of the memory, and the tensors where blockwise scales fit worst; bitsandbytes and torchao do the
    same), and so does a ``row_sharded`` one (FSDP2/DTensor: its shards are whole rows, wherever the world size
    cuts them) whose rows are not a whole number of blocks: its blocks would straddle shards."""
    if precision != "int8":
        return precision
    numel, row = math.prod(shape), math.prod(shape[1:])
    if numel < SMALL_NUMEL or (row_sharded and (len(shape) < 2 or row % BLOCK)):
        return "fp32"
    return precision


def _levels(signed: bool) -> int:
    return 128 if signed else 256


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int32)


def _floats(bits: Tensor) -> Tensor:
    return bits.view(torch.float32)


def block_scales(x: Tensor) -> Tensor:
    """Per block of ``x`` (fp32, ``(blocks, BLOCK)``): the power of two at or above its largest magnitude (1 for an
    all-zero block), shape ``(blocks, 1)``.  Rounding the bits up to the next exponent is that power exactly."""
    amax = x.abs().amax(dim=1, keepdim=True)
    return _floats(torch.where(amax > 0, (_bits(amax) + 0x7FFFFF) & _EXPONENT, _ONE))


def _last(top: Tensor, signed: bool) -> Tensor:
    """The distance (in levels) of the last non-zero level below grid index ``top``."""
    return torch.clamp(top - _MIN_NORMAL, max=_levels(signed) - 2)


def last_level(scales: Tensor, signed: bool) -> Tensor:
    """The smallest non-zero magnitude a block with ``scales`` holds (the bound below it), fp32."""
    top = _bits(scales) >> SHIFT
    return _floats((top - _last(top, signed)) << SHIFT)


def quantize_blocks(x: Tensor, signed: bool, r: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of ``x`` (fp32, finite, ``(blocks, BLOCK)``): stochastic rounding with 16 random bits
    per element ``r`` (int32 in [0, 65536)), nearest with ``r=None``.  Codes are int8 (signed) or uint8, scales
    ``(blocks, 1)`` fp32."""
    kmax = _levels(signed) - 1                       # the code distance of 0
    mag = x.abs()
    scales = block_scales(x)
    top = _bits(scales) >> SHIFT                     # the scale's index on the grid
    last = _last(top, signed)
    floor_bits = (top - last) << SHIFT               # the last level's bits
    xb = _bits(mag)
    noise = (r << (SHIFT - 16)) if r is not None else 1 << (SHIFT - 1)   # random bits under the kept mantissa
    c = top - ((xb + noise) >> SHIFT)
    below = xb < floor_bits
    if signed:   # between 0 and the last level: up with probability |x| / last
        u = (r.to(torch.float32) + 0.5) * (1.0 / 65536) if r is not None else 0.5
        c = torch.where(below, torch.where(u * _floats(floor_bits) < mag, last, kmax), c)
        j = kmax - c
        return torch.where(x < 0, -j, j).to(torch.int8), scales
    c = torch.where(below, torch.where(mag > 0, last, kmax), c)   # never to zero, unless exactly 0
    return (kmax - c).to(torch.uint8), scales


def _decode(codes: Tensor, scales: Tensor) -> Tensor:
    """fp32 values of ``codes`` under ``scales`` (broadcastable to them)."""
    c = codes.to(torch.int32)
    kmax = _levels(codes.dtype == torch.int8) - 1
    k = kmax - c.abs()
    value = torch.where(k >= kmax, 0.0, _floats(((_bits(scales) >> SHIFT) - k) << SHIFT))
    return torch.where(c < 0, -value, value)


def dequantize_blocks(codes: Tensor, scales: Tensor) -> Tensor:
    """fp32 values of ``codes`` (``(blocks, BLOCK)``) with their block ``scales`` (``(blocks, 1)``): the inverse of
    :func:`quantize_blocks` on the grid."""
    return _decode(codes, scales)


def dequantize_range(codes: Tensor, scales: Tensor, first: int) -> Tensor:
    """fp32 values of the 1-D ``codes`` of elements ``first, first + 1, ...`` of one parameter, whose blocks from
    the one holding ``first`` on have the scales ``scales`` (a range that need not start on a block: checkpoints
    load into shards laid out without blocks)."""
    block = (torch.arange(codes.numel(), device=codes.device) + first % BLOCK) // BLOCK
    return _decode(codes, scales[block])


def quantize(x: Tensor, signed: bool, r: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blocks` of a 1-D ``x`` (a whole number of blocks): codes of ``x``'s shape, scales 1-D."""
    codes, scales = quantize_blocks(x.view(-1, BLOCK), signed, None if r is None else r.view(-1, BLOCK))
    return codes.view(x.shape), scales.view(-1)


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """:func:`dequantize_blocks` of 1-D ``codes`` and ``scales``: values of ``codes``' shape."""
    return dequantize_blocks(codes.view(-1, BLOCK), scales.view(-1, 1)).view(codes.shape)


def int8_state(variant: str) -> Callable[..., None]:
    """The update of ``variant`` with every state tensor stored in 8-bit blocks (the module text).

    Signature ``(p, g, *codes, *scales, sc, step)``: the fp32 kernel's ``p``, ``g`` and ``sc``, then one codes tensor
    and one scales tensor per state (in the variant's order), and the int64 step counter ``step`` (0-d).  ``p``,
    ``g`` and the codes are ``(blocks, BLOCK)``, the scales ``(blocks, 1)`` (:func:`blocked_calls`)."""
    kernel = VARIANTS[variant]
    n = len(state_letters(variant))

    def update(p: Tensor, g: Tensor, *rest: Tensor) -> None:
        codes, scales, sc, step = rest[:n], rest[n:2 * n], rest[-2], rest[-1]
        wide = [dequantize_blocks(c, s) for c, s in zip(codes, scales)]
        kernel(p, g, *wide, sc)
        salt = rounding_salt(g, step)
        for position, (c, s, w) in enumerate(zip(codes, scales, wide)):
            # the codes' dtype says the sign (codes_dtype): int8 for a signed state, uint8 for a non-negative one
            new_codes, new_scales = quantize_blocks(w, c.dtype == torch.int8, random_bits(_bits(w), salt, position))
            c.copy_(new_codes)
            s.copy_(new_scales)
    return distinct(update, f"int8_{variant}")


SIGNED_KEYS = ("exp_avg", "previous_grad")   # the states that take both signs; the others are non-negative


def codes_dtype(key: str) -> torch.dtype:
    """The codes' dtype of state ``key``: int8 for a signed state, uint8 for a non-negative one."""
    return torch.int8 if key in SIGNED_KEYS else torch.uint8


def blocked_calls(tensors: tuple[Tensor, ...], first: int, n_state: int) -> list[tuple[Tensor, ...]]:
    """The arguments of an 8-bit kernel call as ``(blocks, BLOCK)`` views (scales ``(blocks, 1)``), cut into calls
    of at most :data:`CHUNK` elements on CPU, :data:`GPU_CHUNK` elsewhere.

    ``tensors[first:]`` are ``p, g, *codes, *scales, sc, step`` with ``n_state`` codes and scales, 1-D and a whole
    number of blocks long (``first`` = 1 for the gated form, whose flag comes first); everything else passes
    whole."""
    numel = tensors[first].numel()
    chunk = CHUNK if tensors[first].device.type == "cpu" else GPU_CHUNK
    elementwise = range(first, first + 2 + n_state)
    blockwise = range(first + 2 + n_state, first + 2 + 2 * n_state)
    out = []
    for lo in range(0, numel, chunk):
        hi = min(numel, lo + chunk)
        out.append(tuple(t[lo:hi].view(-1, BLOCK) if i in elementwise
                         else t[lo // BLOCK: hi // BLOCK].view(-1, 1) if i in blockwise else t
                         for i, t in enumerate(tensors)))
    return out
