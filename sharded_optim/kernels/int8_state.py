r"""Optimizer state stored in 8 bits per element, blockwise, updated by the fp32 math of :mod:`.adam_family` in
the same fused loop.

Every state tensor is cut into blocks of :data:`BLOCK` = 256 consecutive elements (blocks start at multiples of
256 of each parameter: the flat layout aligns parameters and shard boundaries to 256, so a block never straddles a
parameter or a rank, and the blocks are the same on any number of ranks).  A block stores one fp32 scale and 256
one-byte codes.  The code is logarithmic: a code ``k`` stands for

.. math::  x = \pm\, \mathrm{scale}\cdot 2^{-k/S}, \qquad k = 0, 1, \dots, K-2, \qquad k = K-1 \text{ stands for } 0,

with the scale the power of two at or above the block's largest magnitude, stored as :math:`\pm(K-1-k)` so that
code 0 is the value 0 (a zeroed buffer is a zero state).  Signed states (``exp_avg``, ``previous_grad``) are int8
(a sign and :math:`K = 128` magnitudes); the non-negative ones (``exp_avg_sq``, ``max_exp_avg_sq``,
``exp_avg_lr``, ``exp_inf``) are uint8 (:math:`K = 256`).  Why this code (``bench/state_codes.py`` measured the
alternatives on a training run: with a linear absmax code for :math:`v` AdamW diverged on every seed, with one for
:math:`m` the update direction was off by 50% on average against 9% with this one):

* a *relative* spacing, :math:`2^{1/S} - 1` (9% at :math:`S = 8`), wherever in the block an element is: a linear
  absmax code spaces levels ``max/127`` apart, so an element 100x below its block's largest is held to about
  +-40% and one 1000x below is 0.  In the denominator :math:`\sqrt{v}+\epsilon` that turns into wrong or exploding
  steps;
* a power-of-two scale puts every block on the same absolute grid :math:`2^{j/S}`, so a value that does not change
  is stored again exactly, whatever happens to its block's largest element (a scale that follows the max would
  re-round every element every step);
* a non-negative state never rounds to 0 (a value below the last level is stored as the last level: a larger
  :math:`v` only shortens the step), while a signed one may (its error is then below :math:`2^{-(K-2)/S}` of the
  scale).

Rounding is stochastic between the two neighbouring levels, with probability proportional to the distance, so the
stored value is unbiased: the moving averages move by :math:`1-\beta` of the gap per step, far below one level,
and round-to-nearest would stop them (see :mod:`.low_precision`).  The random bits are the same hash of element,
gradient, step and state as in bf16, so results do not depend on the sharding.  A value on the grid is stored
exactly (probability 0 or 1): dequantize-then-quantize is the identity, which makes fp32 checkpoints of int8 state
exact.  Bound per stored element: :math:`|q(x) - x| <` one level spacing at :math:`x`, i.e.
:math:`(2^{1/S}-1)|x|` above the last level and the last level itself below it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .adam_family import VARIANTS
from .low_precision import _MASK32, distinct, random_bits, rounding_salt, state_letters

BLOCK = 256        # elements per scale
LEVELS_PER_OCTAVE = 8
SMALL_NUMEL = 4096  # tensors below this keep fp32 state (as bitsandbytes and torchao do): too small to matter
# Elements per kernel call.  Inductor does not fuse the block reduction with the update into one loop, so a call
# holds fp32 temporaries of ~50 bytes per element (measured: bench/state_precision_bench.py); chunks bound that to
# ~50 MiB whatever the shard size, at one extra call (~0.2 ms of host time on CPU) per million elements.
CHUNK = 1 << 20


def _levels(signed: bool) -> int:
    return 128 if signed else 256


def level(k: Tensor) -> Tensor:
    r"""The magnitude :math:`2^{-k/S}` of code ``k`` relative to its block's scale (the last code is 0)."""
    return torch.exp2(k.to(torch.float32) * (-1.0 / LEVELS_PER_OCTAVE))


def block_scales(x: Tensor) -> Tensor:
    """Per block of ``x`` (fp32, a multiple of :data:`BLOCK` long): the power of two at or above its largest
    magnitude (1 for an all-zero block), shape ``(numel // BLOCK,)``."""
    amax = x.view(-1, BLOCK).abs().amax(dim=1)
    scale = torch.exp2(torch.ceil(torch.log2(torch.where(amax > 0, amax, 1.0))))
    return torch.where(amax > scale, scale * 2, scale)   # log2 rounded down across a power of two


def quantize(x: Tensor, signed: bool, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of ``x`` (fp32, finite): stochastic rounding with uniforms ``u`` in (0, 1), nearest
    with ``u=None``.  Codes are int8 (signed) or uint8."""
    kmax = _levels(signed) - 1                       # the code of 0
    scales = block_scales(x)
    r = (x.view(-1, BLOCK).abs() / scales[:, None]).view(-1)   # in [0, 1]
    t = torch.log2(r) * -LEVELS_PER_OCTAVE
    k0 = torch.clamp(torch.nan_to_num(torch.floor(t), posinf=kmax - 1), 0, kmax - 1).to(torch.int32)
    k0 = torch.where((r > level(k0)) & (k0 > 0), k0 - 1, k0)   # log2 rounded across a level
    above = level(k0)                                 # the level at or above r
    below = torch.where(k0 + 1 >= kmax, 0.0, level(k0 + 1))
    p_up = torch.clamp((r - below) / (above - below), 0.0, 1.0)
    k = torch.where((u if u is not None else 0.5) < p_up, k0, k0 + 1)
    if not signed:   # never to zero: the last level, unless the value is exactly 0
        k = torch.where(r > 0, torch.clamp(k, max=kmax - 1), kmax)
    j = kmax - k     # stored as the distance from the code of 0, so a zeroed buffer holds zeros
    if signed:
        return torch.where(x < 0, -j, j).to(torch.int8), scales
    return j.to(torch.uint8), scales


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """fp32 values of ``codes`` with their block ``scales`` (the inverse of :func:`quantize` on the grid)."""
    c = codes.to(torch.int32)
    kmax = _levels(codes.dtype == torch.int8) - 1
    k = kmax - c.abs()
    mag = torch.where(k >= kmax, 0.0, level(k))
    value = (mag.view(-1, BLOCK) * scales[:, None]).view(-1)
    return torch.where(c < 0, -value, value)


def uniforms(x: Tensor, salt: Tensor, position: int) -> Tensor:
    """Uniforms in (0, 1), 16 bits, from the same element/gradient/step hash as bf16's stochastic rounding."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    return (random_bits(bits, salt, position).to(torch.float32) + 0.5) * (1.0 / 65536)


def int8_state(variant: str) -> Callable[..., None]:
    """The update of ``variant`` with every state tensor stored in 8-bit blocks (the module text).

    Signature ``(p, g, *codes, *scales, sc, step)``: the fp32 kernel's ``p``, ``g`` and ``sc``, then one codes tensor
    and one scales tensor per state (in the variant's order), and the int64 step counter ``step`` (0-d).  ``p``,
    ``g`` and the codes are a whole number of blocks long."""
    kernel = VARIANTS[variant]
    n = len(state_letters(variant))

    def update(p: Tensor, g: Tensor, *rest: Tensor) -> None:
        codes, scales, sc, step = rest[:n], rest[n:2 * n], rest[-2], rest[-1]
        wide = [dequantize(c, s) for c, s in zip(codes, scales)]
        kernel(p, g, *wide, sc)
        salt = rounding_salt(g, step)
        for position, (c, s, w) in enumerate(zip(codes, scales, wide)):
            # the codes' dtype says the sign (codes_dtype): int8 for a signed state, uint8 for a non-negative one
            new_codes, new_scales = quantize(w, c.dtype == torch.int8, uniforms(w, salt, position))
            c.copy_(new_codes)
            s.copy_(new_scales)
    return distinct(update, f"int8_{variant}")


SIGNED_KEYS = ("exp_avg", "previous_grad")   # the states that take both signs; the others are non-negative


def codes_dtype(key: str) -> torch.dtype:
    """The codes' dtype of state ``key``: int8 for a signed state, uint8 for a non-negative one."""
    return torch.int8 if key in SIGNED_KEYS else torch.uint8


def chunks(tensors: tuple[Tensor, ...], first: int, n_state: int) -> list[tuple[Tensor, ...]]:
    """The arguments of one 8-bit kernel call cut into calls of at most :data:`CHUNK` elements.

    ``tensors[first:]`` are ``p, g, *codes, *scales, sc, step`` with ``n_state`` codes and scales (``first`` = 1
    for the gated form, whose flag comes first); everything else passes whole."""
    numel = tensors[first].numel()
    if numel <= CHUNK:
        return [tensors]
    out = []
    elementwise = range(first, first + 2 + n_state)
    blockwise = range(first + 2 + n_state, first + 2 + 2 * n_state)
    for lo in range(0, numel, CHUNK):
        hi = min(numel, lo + CHUNK)
        out.append(tuple(t[lo:hi] if i in elementwise else t[lo // BLOCK: hi // BLOCK] if i in blockwise else t
                         for i, t in enumerate(tensors)))
    return out
