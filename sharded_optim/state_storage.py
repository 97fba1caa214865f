"""How a runtime stores its per-element optimizer state: in the compute dtype, in bfloat16, or in 8-bit blocks.

One :class:`StateStorage` per runtime (:class:`~sharded_optim.zero.FlatParamGroup` and
:class:`~sharded_optim.fsdp.DTensorParamGroup` alike) owns the state buffers (``state``, one flat tensor per key in
kernel argument order) and, for 8-bit state, their block scales (``scales``).  The update kernels read and write
the buffers themselves (:meth:`StateStorage.args`); everything else (serialization, checkpoints, statistics) goes
through values in the compute dtype: :meth:`StateStorage.values` and :meth:`StateStorage.store`, or their per-range
forms.  8-bit state needs its layout cut on block boundaries (:func:`layout_options`): every parameter and every
shard starts a block, so a block never straddles a parameter or a rank (:mod:`.kernels.int8_state`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kernels import int8_state, low_precision

BLOCK = int8_state.BLOCK


def layout_options(precision: str) -> dict[str, int]:
    """The :class:`~sharded_optim.flat.FlatLayout` alignment that state stored in ``precision`` needs."""
    return {"align": BLOCK, "slot_align": BLOCK} if precision == "int8" else {}


class StateStorage:
    """The state buffers of one runtime, ``numel`` elements each, stored in ``precision``."""

    def __init__(self, numel: int, keys: tuple[str, ...], precision: str, compute_dtype: torch.dtype,
                 device: torch.device):
        self.precision = precision
        self.compute_dtype = compute_dtype
        self.state: dict[str, Tensor] = {key: torch.zeros(numel, dtype=self._dtype(key), device=device)
                                         for key in keys}
        # (views of one spare element more: torch.compile guards on a view's base, and a base as long as a whole
        # shard's block count would be duck-sized equal to the blocks of a one-call update and recompile for chunks)
        self.scales: dict[str, Tensor] = {} if precision != "int8" else {
            key: torch.ones(numel // BLOCK + 1, device=device)[:-1] for key in keys}

    def _dtype(self, key: str) -> torch.dtype:
        if self.precision == "int8":
            return int8_state.codes_dtype(key)
        return self.compute_dtype if self.precision == "fp32" else low_precision.state_dtype(self.precision)

    def values(self, key: str) -> Tensor:
        """State ``key`` as compute-dtype values: the buffer itself when it is stored so, else a widened or
        dequantized copy (for serialization, checkpoints and statistics; never for updates)."""
        return self.range_values(key, slice(0, self.state[key].numel()))

    def range_values(self, key: str, rng: slice) -> Tensor:
        """The values of ``rng`` of state ``key`` (a view when stored in the compute dtype, else a copy); for
        8-bit state ``rng`` starts on a block and spans whole blocks."""
        buffer = self.state[key][rng]
        if self.precision == "int8":
            return int8_state.dequantize(buffer, self.scales[key][rng.start // BLOCK: -(-rng.stop // BLOCK)])
        return buffer if buffer.dtype == self.compute_dtype else buffer.to(self.compute_dtype)

    def store(self, key: str, values: Tensor) -> None:
        """Store ``values`` (the whole buffer's worth of state ``key``), rounding to nearest (values already on
        the 8-bit grid, as :meth:`values` returns them, are stored exactly)."""
        if values is not self.state[key]:
            self.store_range(key, slice(0, self.state[key].numel()), values)

    def store_range(self, key: str, rng: slice, values: Tensor) -> None:
        """Store ``values`` into ``rng`` of state ``key`` (whole blocks for 8-bit state), rounding to nearest."""
        if self.precision != "int8":
            self.state[key][rng].copy_(values)
            return
        signed = self.state[key].dtype == torch.int8   # as the kernel reads it (int8_state.codes_dtype)
        codes, scales = int8_state.quantize(values.to(torch.float32), signed, None)
        self.state[key][rng].copy_(codes)
        self.scales[key][rng.start // BLOCK: -(-rng.stop // BLOCK)].copy_(scales)

    def args(self, keys: tuple[str, ...], rng: slice) -> tuple[Tensor, ...]:
        """The state arguments of an update kernel over run ``rng``: the state slices, then for 8-bit state the
        slices of their block scales (``rng`` on block boundaries: :meth:`whole_blocks`)."""
        states = tuple(self.state[k][rng] for k in keys)
        if self.precision != "int8":
            return states
        return states + tuple(self.scales[k][rng.start // BLOCK: rng.stop // BLOCK] for k in keys)

    def whole_blocks(self, runs: list[tuple[slice, Any]]) -> list[tuple[slice, Any]]:
        """Update runs extended to whole blocks for 8-bit state: a run's last block continues into zero padding
        (runs start on blocks: every parameter does)."""
        if self.precision != "int8":
            return runs
        return [(slice(rng.start, -(-rng.stop // BLOCK) * BLOCK), slots) for rng, slots in runs]

    def bytes(self) -> dict[str, int]:
        """Bytes held per state key (8-bit state: its block scales included)."""
        out = {key: t.numel() * t.element_size() for key, t in self.state.items()}
        for key, scales in self.scales.items():
            out[key] += scales.numel() * scales.element_size()
        return out
