r"""The step decided on the device: no host synchronisation between ``backward()`` and the next forward.

On the host path (the CPU default) the optimizer reads the global gradient norm back, decides on the host
whether to skip the step and by how much to clip, and computes the kernel's scalars from host step counters:
each read is a device synchronisation, and on a GPU each one drains the queue (torch's pageable host-to-device
copy of the scalar vector synchronises too).  On this path (the CUDA default, and ``capturable=True`` anywhere)
nothing leaves the device:

* the global norm, the clip coefficient ``min(1, max_norm / (norm + 1e-6))`` and the skip decision
  ``keep = isfinite(norm)`` are 0-d device tensors;
* the step counters live on the device (like torch's fused and capturable optimizers) and the kernel's scalar
  vector is computed there from them, in float64, by the same formulas the host uses
  (:func:`sharded_optim.rules.step_scalars`); the clip coefficient is folded into the gradient scale;
* the update kernel runs gated: a skipped step writes every tensor back unchanged (:func:`gated`), and the step
  counters advance by ``keep``.

Hyperparameters travel as one float64 vector through pinned memory, asynchronously, so schedulers still work.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from . import rules

_F64 = torch.float64


class _DeviceMath:
    """:func:`rules.step_scalars`'s math on float64 tensors."""

    @staticmethod
    def sqrt(x: Tensor | float) -> Tensor | float:
        return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)   # constants stay floats

    where = staticmethod(torch.where)

    @staticmethod
    def pos_sqrt(x: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(x, min=0.0))


def _flags(algorithm: str, group: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The structural options of a group (booleans that pick formulas): the compile-cache key."""
    names = ("decoupled_weight_decay", "bias_correction", "maximize", "degenerated_to_sgd")
    return tuple((n, bool(group[n])) for n in names if n in group)


def _prepare(algorithm: str, flags: tuple[tuple[str, Any], ...], skip_nonfinite: bool, sumsq: Tensor, h: Tensor,
             t_prev: Tensor, mu_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Everything a step decides, from the groups' gradient sums of squares, in one small kernel when compiled:

    ``keep`` (a non-finite global norm skips the step under ``nonfinite_policy="skip"``), the clip coefficient
    ``min(1, max_norm / (norm + 1e-6))`` as torch's ``clip_grad_norm_`` computes it (``max_norm`` is the last
    entry of ``h``, ``inf`` when not clipping; a non-finite norm leaves the gradients unscaled, as on the host
    path), and the kernel's scalar vector for the step after ``t_prev`` with the coefficient in its gradient scale.
    Returns ``(scalars in float64, keep, NAdam's running product after the step)``.
    """
    total = sumsq.sum().sqrt()
    finite = torch.isfinite(total)
    keep = finite if skip_nonfinite else torch.ones_like(finite)
    coef = torch.where(finite, torch.clamp(h[len(rules.HYPER_KEYS)] / (total + 1e-6), max=1.0), 1.0)
    values, _rect, mu_after = rules.step_scalars(algorithm, dict(flags), h, t_prev.to(_F64) + 1.0, mu_prev,
                                                 _DeviceMath)
    sc = torch.stack([v.to(_F64) if isinstance(v, Tensor) else torch.full_like(h[0], v) for v in values])
    sc = torch.cat([sc[:rules.GSCALE], sc[rules.GSCALE:rules.GSCALE + 1] * coef, sc[rules.GSCALE + 1:]])
    return sc, keep, (mu_after if mu_after is not None else mu_prev)


@functools.cache
def _compiled_prepare(algorithm: str, flags: tuple[tuple[str, Any], ...], skip_nonfinite: bool) -> Callable[..., Any]:
    # one small kernel instead of ~40 launches of 0-d ops; no value is compiled in (all are tensor inputs)
    return torch.compile(functools.partial(_prepare, algorithm, flags, skip_nonfinite), dynamic=False,
                         fullgraph=True)


def prepare(algorithm: str, group: Mapping[str, Any], skip_nonfinite: bool, sumsq: Tensor, h: Tensor,
            t_prev: Tensor, mu_prev: Tensor, dtype: torch.dtype, compiled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_prepare` for one run: the scalar tensor in ``dtype``, the keep flag, NAdam's product after it."""
    flags = _flags(algorithm, group)
    fn = _compiled_prepare(algorithm, flags, skip_nonfinite) if compiled else \
        functools.partial(_prepare, algorithm, flags, skip_nonfinite)
    sc, keep, mu_after = fn(sumsq, h, t_prev, mu_prev)
    return sc.to(dtype), keep, mu_after


def total_norm(sumsq: Tensor) -> Tensor:
    """The global norm from the groups' sums of squares (what ``clip_grad_norm_`` returns)."""
    return sumsq.sum().sqrt()


class HyperparameterBuffers:
    """Each param group's hyperparameter vector (``rules.HYPER_KEYS``, float64), kept in one device buffer.

    Uploaded only when a value changed (a scheduler's new lr), into the same buffer, through pinned memory and
    non-blocking: no synchronising copy, and a CUDA graph captured over the step reads the buffer, never a host
    block that the allocator could hand to someone else (the caching host allocator keeps a pinned block alive
    until the copy that reads it has run)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device], tuple[list[float], Tensor]] = {}

    def get(self, values: list[float], group_id: int, device: torch.device) -> Tensor:
        """The float64 device buffer holding ``values`` for param group ``group_id`` on ``device``: the same buffer
        every call, copied into only when ``values`` changed."""
        key = (group_id, torch.device(device))
        cached = self._buffers.get(key)
        if cached is not None and cached[0] == values:
            return cached[1]
        host = torch.tensor(values, dtype=_F64)
        if cached is None:
            buffer = host if key[1].type == "cpu" else torch.empty_like(host, device=device)
        else:
            buffer = cached[1]
        if buffer is not host:
            buffer.copy_(host if key[1].type == "cpu" else host.pin_memory(), non_blocking=True)
        self._buffers[key] = (list(values), buffer)
        return buffer


def _gate(kernel: Callable[..., None], n_state: int) -> Callable[..., None]:
    """``kernel`` applied only where ``keep``: every tensor it writes is written back unchanged otherwise.

    The kernel runs on copies and ``where`` picks per element; compiled, the copies are never materialised (the
    loop reads each tensor once and writes it once, as the ungated kernel does)."""
    def gated(keep: Tensor, p: Tensor, g: Tensor, *rest: Tensor) -> None:
        states, scalars = rest[:n_state], rest[n_state:]   # sc (and a low-precision kernel's step counter)
        new_p = p.clone()
        new_states = [t.clone() for t in states]
        kernel(new_p, g, *new_states, *scalars)
        p.copy_(torch.where(keep, new_p, p))
        for t, new in zip(states, new_states):
            t.copy_(torch.where(keep, new, t))
    gated.__name__ = gated.__qualname__ = f"gated_{kernel.__name__}"
    return gated


@functools.cache
def gated(name: str, precision: str = "fp32") -> Callable[..., None]:
    """The gated form of update variant ``name`` with its state in ``precision`` (one distinct function per
    variant and precision: its own compile cache entry)."""
    from .kernels.adam_family import VARIANTS
    from .kernels.int8_state import int8_state
    from .kernels.low_precision import bf16_state, distinct
    kernel = VARIANTS[name]
    n_state = kernel.__code__.co_argcount - 3   # (p, g, *states, sc)
    if precision == "bf16":
        kernel = bf16_state(name)
    elif precision == "int8":
        kernel, n_state = int8_state(name), 2 * n_state   # codes and block scales are both written
    return distinct(_gate(kernel, n_state), f"gated_{precision}_{name}")
