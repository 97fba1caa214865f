"""Sharding-agnostic checkpoints of a model and its :class:`ShardedOptimizer` (or :class:`Lookahead`).

``save(path, model, optimizer, step=...)`` is collective: every rank writes only its own shard of the optimizer
state through ``torch.distributed.checkpoint`` (DCP), described with the parameters' logical shapes (see
:mod:`sharded_optim.ckpt_io`), so ``load`` works at any world size (N -> M), on one process without a process
group, and into FSDP2 DTensor state.  A checkpoint directory holds

* DCP files (``.metadata``, ``__<rank>_0.distcp``): the model's ``state_dict()`` as ``model.<key>``, each
  state tensor as ``optim.<param name>.<key>`` (every key the algorithm uses, the fp32 master copy of
  low-precision parameters as ``master``), Lookahead slow weights as ``lookahead.<param name>.slow_param``;
* ``meta.json``: format name and version, algorithm, step, ``extra`` (any JSON), per-parameter logical shape,
  dtype, int64 step and NAdam ``mu_product``, hyperparameters of every param group, counters, Lookahead k/alpha;
* ``rng/rank_<r>.json``: each rank's RNG states (torch, CUDA, python ``random``, numpy);
* in ``meta.json`` (format version 2) a CRC-32C of every tensor chunk, of ``.metadata`` and of every RNG file,
  and a checksum of ``meta.json`` itself (:mod:`sharded_optim.ckpt_integrity`).

Writes are atomic: everything goes into ``.<name>.partial`` and is renamed to ``<name>`` only after every rank
finished (the next save removes partial directories a crash left behind), then ``latest`` (a text file naming
the newest checkpoint) is replaced atomically and all but the newest ``keep_last`` checkpoints are removed.  ``load`` validates everything (format version, algorithm, param
names and shapes, hyperparameters, file integrity) and reads into scratch buffers before writing anything: a
refused load leaves model, optimizer and RNG bitwise unchanged.  A checkpoint whose bytes do not match their
checksums, or whose state holds non-finite values, raises :class:`CheckpointCorruptError`; ``load(directory,
..., latest=True)`` then falls back to the newest checkpoint that verifies.

A failed save (disk full, quota, permissions) raises :class:`CheckpointError` naming the path, the cause, the
bytes needed, and that the previous checkpoint is intact; its ``.partial`` directory is removed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from . import agreement, ckpt_diagnose, ckpt_integrity, ckpt_io, rules
from .lookahead import Lookahead
from .optimizer import ShardedOptimizer
from .zero import FlatParamGroup

FORMAT_NAME = "sharded-optim-checkpoint"
FORMAT_VERSION = 2  # 2: checksums (integrity, checksum) and model_params in meta.json
META_FILE = "meta.json"
RNG_DIR = "rng"
LATEST_FILE = "latest"
MASTER_KEY = "master"
SLOW_KEY = "slow_param"

__all__ = ["CheckpointCorruptError", "CheckpointError", "FORMAT_VERSION", "candidates", "export_torch_optim",
           "import_torch_optim", "latest", "load",
           "read_checkpoint", "save"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model/optimizer (nothing was modified), or a save that
    failed (the previous checkpoint is intact)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint that fails verification: damaged, truncated or missing files, bytes that do not match their
    checksums, non-finite values where none can be.  ``load(..., latest=True)`` falls back past these (and only
    these: a checkpoint that does not fit the model is the caller's error, and an older one would not fit
    either)."""


# ------------------------------------------------------------------------------------------------ plumbing
def _unwrap(optimizer: Any) -> tuple[ShardedOptimizer, Lookahead | None]:
    if isinstance(optimizer, Lookahead):
        return optimizer.optimizer, optimizer
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer, None
    raise TypeError(f"optimizer must be a ShardedOptimizer or a Lookahead around one, got "
                    f"{type(optimizer).__name__}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (so that all ranks apply a load, or none does).

    The ranks exchange their errors (one small all-gather), so a rank that did not fail raises the failing
    rank's message, and of the same class: every rank then takes the same decision (fall back, or stop).
    """
    if _distributed():
        mine = None if error is None else (isinstance(error, CheckpointCorruptError), str(error))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
        if failed and error is None:
            r, (corrupt, message) = failed[0]
            raise (CheckpointCorruptError if corrupt else CheckpointError)(f"{what}: failed on rank {r}: "
                                                                            f"{message}")
    if error is not None:
        raise error


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class _Param:
    """One optimizer parameter: its name, group, runtime and how its state is sharded."""

    def __init__(self, name: str, gi: int, p: Tensor, opt: ShardedOptimizer):
        self.name, self.gi, self.p = name, gi, p
        self.rt, self.slot = opt._locate[id(p)]
        self.flat = isinstance(self.rt, FlatParamGroup)
        group = opt.process_group if opt.sharded else None
        self.sharding = ckpt_io.SlotSharding(self.rt, self.slot, group) if self.flat else None
        self.has_master = self.flat and self.rt.master is not self.rt.full and self.rt.compute_dtype != self.rt.dtype


def _params(model: torch.nn.Module, opt: ShardedOptimizer) -> list[_Param]:
    opt._ensure_runtimes()
    opt.wait_params()  # an overlapped all-gather still in flight would race with reading or loading the weights
    if opt.sharded and opt.process_group is not dist.group.WORLD and \
            dist.get_world_size(opt.process_group) != dist.get_world_size():
        raise NotImplementedError("checkpoints of an optimizer sharded over a sub-group of the world are not "
                                  "supported; shard over the world group")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            out.append(_Param(names.get(id(p), f"group{gi}.param{i}"), gi, p, opt))
    seen = set()
    for entry in out:
        if entry.name in seen:
            raise ValueError(f"parameter name {entry.name!r} appears twice among the optimizer's parameters")
        seen.add(entry.name)
    return out


def _slot_counters(opt: ShardedOptimizer, params: list[_Param]) -> dict[int, tuple[int, float]]:
    """Global (step, mu_product) per parameter.  A rank only advances the counters of parameters it holds a
    piece of, so each value is taken from the rank that holds the parameter's first element."""
    out: dict[int, tuple[int, float]] = {}
    by_rt: dict[int, list[_Param]] = {}
    for entry in params:
        by_rt.setdefault(id(entry.rt), []).append(entry)
    for entries in by_rt.values():
        rt = entries[0].rt
        steps = rt.steps.clone()
        mus = rt.mu_products.clone()
        if entries[0].flat and opt.sharded:
            owner = torch.zeros(len(rt.layout.slots), dtype=torch.bool)
            for piece in rt.layout.pieces:
                owner[piece.slot] |= piece.lo == 0
            empty = torch.tensor([s.numel == 0 for s in rt.layout.slots], dtype=torch.bool)
            owner &= ~empty
            steps = torch.where(owner, steps, torch.zeros_like(steps)).to(_comm_device())
            mus = torch.where(owner, mus, torch.zeros_like(mus)).to(_comm_device())
            dist.all_reduce(steps, group=opt.process_group)
            dist.all_reduce(mus, group=opt.process_group)
            steps = torch.where(empty, rt.steps, steps.cpu())
            mus = torch.where(empty, rt.mu_products, mus.cpu())
        for entry in entries:
            out[id(entry.p)] = (int(steps[entry.slot]), float(mus[entry.slot]))
    return out


def _state_keys(opt: ShardedOptimizer, entry: _Param) -> tuple[str, ...]:
    return rules.state_keys(opt.algorithm, opt.param_groups[entry.gi])


def _tensor_map(opt: ShardedOptimizer, la: Lookahead | None, params: list[_Param],
                buffer_of: Any) -> dict[str, Tensor]:
    """DCP entries of the optimizer state; ``buffer_of(entry, key, live)`` gives the rank-local flat buffer
    (the live one when saving, a scratch one when loading) or, for non-flat runtimes, the tensor itself."""
    out: dict[str, Tensor] = {}
    for entry in params:
        keys = list(_state_keys(opt, entry)) + ([MASTER_KEY] if entry.has_master else [])
        for key in keys:
            live = entry.rt.master if key == MASTER_KEY else (entry.rt.state[key] if entry.flat
                                                              else opt.state[entry.p][key])
            out[f"optim.{entry.name}.{key}"] = _describe(entry, buffer_of(entry, key, live))
        if la is not None:
            if not entry.flat:
                raise NotImplementedError("Lookahead checkpoints need flat (non-DTensor) parameters")
            out[f"lookahead.{entry.name}.{SLOW_KEY}"] = _describe(entry, buffer_of(entry, SLOW_KEY,
                                                                                   la._slow[id(entry.rt)]))
    return out


def _describe(entry: _Param, tensor: Tensor) -> Tensor:
    if entry.flat:
        return entry.sharding.sharded(tensor)
    if tuple(tensor.shape) != tuple(entry.p.shape):
        raise NotImplementedError(f"state of parameter {entry.name!r} has shape {tuple(tensor.shape)}, not the "
                                  f"parameter's logical shape {tuple(entry.p.shape)}: cannot checkpoint it")
    return tensor


# -------------------------------------------------------------------------------------------------- save
def save(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any, *, step: int,
         extra: Any = None, keep_last: int | None = None) -> Path:
    """Write a checkpoint to directory ``path`` (collective: every rank calls it with the same arguments).

    Args:
        step: the training step (an int >= 0), returned by :func:`load`.
        extra: any JSON-serialisable data (loss curves, data-loader position), returned by :func:`load`.
        keep_last: afterwards keep only the newest ``keep_last`` checkpoints in ``path``'s parent (None: all).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an integer >= 1, got {keep_last!r}")
    try:
        json.dumps(extra, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable (dicts, lists, numbers, strings), got "
                        f"{type(extra).__name__}: {exc}") from None
    opt, la = _unwrap(optimizer)
    path = Path(path)
    if path.name in ("", ".", "..") or path.name.startswith("."):
        raise ValueError(f"path must name a checkpoint directory (not hidden), got {str(path)!r}")
    params = _params(model, opt)
    agreement.verify(opt)  # a checkpoint of ranks that disagree would record one rank's view as everyone's
    meta = _build_meta(model, opt, la, params, step, extra)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update(_tensor_map(opt, la, params, lambda entry, key, live: live))
    rank = _rank()
    tmp = path.parent / f".{path.name}.partial"
    needed = _bytes_to_write(state)
    error: BaseException | None = None
    if rank == 0:
        try:
            for stale in path.parent.glob(".*.partial"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)
            free = shutil.disk_usage(tmp).free
            if free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({free} bytes free)")
        except OSError as exc:
            error = _save_failed(path, tmp, exc, needed)
    try:
        _agree(error, f"save {path}")
        writer = ckpt_integrity.ChecksumWriter(str(tmp))
        try:
            with ckpt_io.single_process_quiet():
                dcp.save(state, storage_writer=writer, no_dist=not _distributed())
        except (Exception, CheckpointException) as exc:  # DCP loses errno (a full disk: "unexpected pos")
            error = _save_failed(path, tmp, exc, needed)
        _agree(error, f"save {path}")
        try:
            ckpt_io.write_json(tmp / RNG_DIR / f"rank_{rank:05d}.json", ckpt_io.capture_rng())
        except OSError as exc:
            error = _save_failed(path, tmp, exc, needed)
        _agree(error, f"save {path}")  # every rank finished writing before the checksums and the rename
        if rank == 0:
            try:
                meta["integrity"] = {"hash": ckpt_integrity.HASH, "chunks": writer.checksums, "files": {
                    name: ckpt_integrity.file_entry(tmp / name) for name in
                    [".metadata", *sorted(f"{RNG_DIR}/{f.name}" for f in (tmp / RNG_DIR).iterdir())]}}
                # last: a directory without meta.json is incomplete
                ckpt_io.write_json(tmp / META_FILE, ckpt_integrity.seal(meta))
                _commit(tmp, path)
            except OSError as exc:
                error = _save_failed(path, tmp, exc, needed)
        _agree(error, f"save {path}")
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # every rank has left the collective: nobody writes there
        raise
    if rank == 0:
        _point_latest(path.parent, path.name)
        if keep_last is not None:
            _prune(path.parent, keep_last, keep=path.name)
    _barrier()  # on return the checkpoint is visible to every rank
    return path


def _bytes_to_write(state: dict[str, Any]) -> int:
    """Bytes of tensor data in the whole checkpoint, every rank's part counted once."""
    total = ckpt_diagnose.local_tensor_bytes(state)
    if _distributed():
        t = torch.tensor([total], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t)
        total = int(t.item())
    return total


def _save_failed(path: Path, tmp: Path, exc: BaseException, needed: int) -> CheckpointError:
    return CheckpointError(ckpt_diagnose.save_failure(path, tmp, exc, needed, latest(path.parent)))


def _build_meta(model: torch.nn.Module, opt: ShardedOptimizer, la: Lookahead | None, params: list[_Param],
                step: int, extra: Any) -> dict[str, Any]:
    counters = _slot_counters(opt, params)
    groups = []
    for gi, group in enumerate(opt.param_groups):
        hp = {k: ckpt_io.to_json_value(v, f"param_groups[{gi}][{k!r}]") for k, v in group.items() if k != "params"}
        hp["params"] = [e.name for e in params if e.gi == gi]
        hp["state_keys"] = list(rules.state_keys(opt.algorithm, group))
        groups.append(hp)
    info = {}
    for entry in params:
        st, mu = counters[id(entry.p)]
        state_dtype = entry.rt.compute_dtype if entry.flat else opt.state[entry.p][_state_keys(opt, entry)[0]].dtype
        info[entry.name] = {"shape": list(entry.p.shape), "dtype": str(entry.p.dtype).removeprefix("torch."),
                            "state_dtype": str(state_dtype).removeprefix("torch."), "group": entry.gi,
                            "step": st, "mu_product": mu if opt.algorithm == "nadam" else None,
                            "master": entry.has_master}
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "algorithm": opt.algorithm, "step": step,
        "extra": extra, "world_size": dist.get_world_size() if _distributed() else 1,
        "zero_stage": opt.zero_stage, "param_groups": groups, "params": info,
        "model_keys": {k: list(v.shape) for k, v in model.state_dict().items()},
        # which model entries are parameters (never legitimately non-finite; buffers such as masks may be)
        "model_params": sorted({n for n, _ in model.named_parameters(remove_duplicate=False)}
                               & set(model.state_dict())),
        "counters": {"steps_attempted": opt.steps_attempted, "skipped_steps": dict(opt.skipped_steps),
                     "recent_norms": list(opt._recent_norms)},
        "lookahead": None if la is None else {"k": la.k, "alpha": la.alpha, "inner_steps": la.inner_steps},
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """Make the finished ``tmp`` the checkpoint ``path`` (replacing an older one of the same name)."""
    old = path.parent / f".{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)  # atomic: readers see the old pointer or the new one
    _fsync_dir(root)


def _complete(root: Path) -> list[tuple[int, str]]:
    """(step, name) of the complete checkpoints directly under ``root``."""
    out = []
    if not root.is_dir():
        return out
    for child in root.iterdir():
        if child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        try:
            step = int(json.loads((child / META_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append((step, child.name))
    return sorted(out)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    for _step, name in _complete(root)[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory``: the one ``latest`` names if it is complete, else
    the complete checkpoint with the highest step; None when there is none."""
    root = Path(directory)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and "/" not in name and (root / name / META_FILE).is_file():
            return root / name
    found = _complete(root)
    return root / found[-1][1] if found else None


def candidates(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints under ``directory`` to try when resuming, newest first: the one ``latest`` names, then every
    other directory holding a ``meta.json`` by descending step (those whose ``meta.json`` cannot be read last,
    so that loading them reports why)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    first = latest(root)
    readable = [root / name for _step, name in reversed(_complete(root))]
    unreadable = sorted((c for c in root.iterdir() if not c.name.startswith(".") and (c / META_FILE).is_file()
                         and c not in readable), reverse=True)
    out: list[Path] = []
    for c in [first, *readable, *unreadable]:
        if c is not None and c not in out:
            out.append(c)
    return out


# -------------------------------------------------------------------------------------------------- load
from .ckpt_load import load  # noqa: E402  (the load side lives in its own module)
from .ckpt_verify import read_checkpoint  # noqa: E402
from .ckpt_torch import export_torch_optim, import_torch_optim  # noqa: E402
