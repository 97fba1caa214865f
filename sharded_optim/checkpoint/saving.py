"""Saving a checkpoint (collective): every rank writes its shard through DCP into ``.<name>.partial``, rank 0
adds the checksums and ``meta.json`` (last), renames the directory into place, points ``latest`` at it and prunes
all but the newest ``keep_last``.  See :mod:`sharded_optim.checkpoint` for the format.
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
from torch.distributed.checkpoint.api import CheckpointException

from .. import agreement, rules
from ..lookahead import Lookahead
from ..optimizer import ShardedOptimizer
from . import diagnose as ckpt_diagnose
from . import integrity as ckpt_integrity
from . import io as ckpt_io
from .format import FORMAT_NAME, FORMAT_VERSION, LATEST_FILE, META_FILE, RNG_DIR, CheckpointError, _complete, latest
from .state import (_agree, _barrier, _comm_device, _distributed, _Param, _params, _rank, _state_keys, _tensor_map,
                    compressed_params,
                    _unwrap)


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
    compressed = compressed_params(params)   # 8-bit state saved as codes and block scales
    meta = _build_meta(model, opt, la, params, step, extra, compressed)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update(_tensor_map(opt, la, params, lambda entry, key, live: live, compressed))
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
                step: int, extra: Any, compressed: set[str]) -> dict[str, Any]:
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
                            "master": entry.has_master,
                            "state_format": "int8" if entry.name in compressed else "values"}
    return {
        # version 2 unless some state is 8-bit codes: readers of version 2 then refuse instead of misreading them
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION if compressed else FORMAT_VERSION - 1,
        "algorithm": opt.algorithm, "step": step,
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


def _prune(root: Path, keep_last: int, keep: str) -> None:
    for _step, name in _complete(root)[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


