"""The ranks of a sharded :class:`ShardedOptimizer` agree on what they optimize, or refuse.

ZeRO gives each rank a range of one flat buffer per param group and trusts that every rank laid out the same
buffer: the same parameters in the same order with the same shapes and dtypes, the same algorithm, options and
hyperparameters.  Nothing in the collectives notices when they do not (an all-reduce of two equally long
buffers succeeds whatever they hold), so ranks that disagree train silently wrong: parameters swapped between
ranks, a rank's extra parameter ignored, each rank updating its shard with its own ``lr``.

:func:`verify` compares one fingerprint of everything that must agree:

* the algorithm and every setting that changes the layout or the collectives (zero stage, bucket size, master
  weights, reduction and gather dtypes, statistics interval, non-finite policy, spike detection);
* the number of param groups; per group the number of parameters and every hyperparameter and option;
* per parameter its shape, dtype, device type and up to :data:`SAMPLES` of its values at evenly spaced flat
  positions (parameters are replicated before the first step, so equal shapes in a different order are told
  apart by their values; the values are compared bit for bit, no reduction, so thread counts do not matter).

The common case costs one all-reduce of two int64 (max of the 63-bit digest and of its negation: equal on
every rank iff max == min).  Only when the digests differ do the ranks exchange their full fingerprints (an
all-gather of Python objects) to name the first differing item and both ranks' values; every rank raises
:class:`AgreementError` with the same message.

Called at construction, after ``add_param_group``, and by ``checkpoint.save``.  Hyperparameters edited between
steps (schedulers, hand edits) are *not* compared at every step: that would add a collective, and on NCCL a
device-to-host synchronisation, to every step; a scheduler that is a function of the step count gives every
rank the same values by construction.  Code that edits hyperparameters per rank calls :func:`verify` itself.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

SAMPLES = 8


class AgreementError(ValueError):
    """The ranks of a sharded optimizer disagree on what they optimize (raised on every rank)."""


def _plain(value: Any) -> Any:
    """A hyperparameter as comparable plain data (0-d tensors as their Python number)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else tuple(value.flatten().tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _samples(p: Tensor) -> list[Tensor]:
    if hasattr(p, "to_local"):  # a DTensor (FSDP2): each rank holds its own shard, values differ by design
        return []
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return []
    idx = torch.linspace(0, n - 1, min(SAMPLES, n), device=flat.device).round().long()
    return [flat[idx].double()]


def fingerprint(opt: Any) -> list[tuple[str, Any]]:
    """``(item, value)`` pairs in a fixed order: what every rank of ``opt`` must hold identically."""
    items: list[tuple[str, Any]] = [("algorithm", opt.algorithm)]
    for name in ("zero_stage", "bucket_numel_bytes", "master_weights", "reduce_grads", "grad_reduce_dtype",
                 "param_gather_dtype", "stats_interval", "nonfinite_policy", "spike_sigma",
                 "overlap_param_gather", "state_precision"):
        items.append((name, _plain(getattr(opt, name, None))))
    items.append(("spike_window", opt._recent_norms.maxlen))
    items.append(("number of param groups", len(opt.param_groups)))
    params: list[tuple[str, Tensor]] = []
    for gi, group in enumerate(opt.param_groups):
        where = f"param_groups[{gi}]"
        items.append((f"{where}: number of params", len(group["params"])))
        for i, p in enumerate(group["params"]):
            items.append((f"{where}['params'][{i}]: shape, dtype, device",
                          (tuple(p.shape), str(p.dtype).removeprefix("torch."), p.device.type)))
            params.append((f"{where}['params'][{i}]: values at {SAMPLES} positions", p))
        for key in sorted(k for k in group if k != "params"):
            items.append((f"{where}[{key!r}]", _plain(group[key])))
    per_param = [_samples(p) for _, p in params]
    parts = [s for samples in per_param for s in samples]
    values = torch.cat(parts).cpu().tolist() if parts else []  # one device-to-host copy for all samples
    at = 0
    for (label, _p), samples in zip(params, per_param):
        n = sum(s.numel() for s in samples)
        items.append((label, tuple(values[at: at + n])))
        at += n
    return items


def _digest(items: list[tuple[str, Any]]) -> int:
    # repr of floats is exact (shortest round-trip), of NaN always 'nan': equal values give equal text
    text = repr([(k, v) for k, v in items]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1  # 63 bits: -d fits


def _show(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.10g}"
    return repr(value)


def first_difference(mine: list[tuple[str, Any]], theirs: list[tuple[str, Any]]) -> tuple[str, Any, Any] | None:
    """The first item whose label or value differs (None: identical)."""
    for (ka, va), (kb, vb) in zip(mine, theirs):
        if ka != kb:  # only after a differing count, which is reported first
            return f"{ka} / {kb}", va, vb
        if repr(va) != repr(vb):
            return ka, va, vb
    if len(mine) != len(theirs):
        longer = mine if len(mine) > len(theirs) else theirs
        extra = longer[min(len(mine), len(theirs))]
        return (extra[0], extra[1] if longer is mine else "(absent)", extra[1] if longer is theirs else "(absent)")
    return None


def verify(opt: Any) -> None:
    """Raise :class:`AgreementError` on every rank of ``opt.process_group`` unless all ranks hold the same
    fingerprint (a no-op for an optimizer that is not sharded).  Collective: every rank must call it."""
    if not getattr(opt, "sharded", False):
        return
    group = opt.process_group
    items = fingerprint(opt)
    d = _digest(items)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    both = torch.tensor([d, -d], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo = both.tolist()
    if hi == -neg_lo:
        return
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, items, group=group)
    for r in range(1, len(everyone)):
        diff = first_difference(everyone[0], everyone[r])
        if diff is not None:
            label, a, b = diff
            raise AgreementError(f"the ranks of the sharded optimizer disagree on {label}: rank 0 has {_show(a)}, "
                                 f"rank {r} has {_show(b)}; every rank must build the optimizer from the same "
                                 "parameters in the same order with the same settings")
    raise AgreementError("the ranks of the sharded optimizer disagree (fingerprint digests differ) but no "
                         "differing item was found")
