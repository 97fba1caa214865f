"""Offline tools on one process: read a whole checkpoint (export, inspect), verify one (``inspect --verify``).

Checks, and reports every problem rather than the first: ``meta.json`` against its own checksum; every file the
checksums name (``.metadata``, the RNG files) against its recorded CRC; every tensor chunk the DCP metadata
lists against its recorded CRC (and that no recorded chunk is missing); that every chunk deserialises with
``weights_only=True`` into the dtype and size the metadata promises; that optimizer state, Lookahead slow
weights and model parameters hold finite values only.  A version-1 checkpoint (written before checksums) gets
every check but the CRCs.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from ..kernels import int8_state
from . import integrity as ckpt_integrity
from . import io as ckpt_io
from .format import CheckpointCorruptError, CheckpointError
from .integrity import IntegrityError
from .loading import _chunks, _files, _read_failure, _read_meta, finite
from .state import SCALES_SUFFIX


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "format_version", "checksums" (bool), "chunks", "bytes", "files", "problems": [str]}``."""
    path = Path(path)
    out: dict[str, Any] = {"path": str(path), "format_version": None, "checksums": False, "chunks": 0,
                           "bytes": 0, "files": 0, "problems": []}
    problems: list[str] = out["problems"]
    try:
        meta = _read_meta(path)
    except CheckpointError as exc:
        problems.append(str(exc))
        return out
    out["format_version"] = meta["format_version"]
    files, chunks = _files(meta), _chunks(meta)
    out["checksums"] = files is not None
    for name in sorted(files or {}):
        try:
            ckpt_integrity.check_file(path, name, files)
            out["files"] += 1
        except IntegrityError as exc:
            problems.append(str(exc))
    try:
        metadata = ckpt_io.read_dcp_metadata(path, files)
    except ValueError as exc:
        problems.append(str(exc))
        return out
    model_params = {f"model.{n}" for n in meta.get("model_params", [])}
    seen = set()
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: ckpt_integrity.chunk_key(kv[0])):
        key = ckpt_integrity.chunk_key(index)
        seen.add(key)
        where = f"checkpoint {path}: {info.relative_path} bytes {info.offset}..{info.offset + info.length} " \
                f"(tensor chunk {key})"
        try:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as exc:
            problems.append(f"{where}: cannot be read ({exc.strerror or exc})")
            continue
        try:
            if chunks is not None:
                if key not in chunks:
                    raise IntegrityError(f"{where}: no checksum recorded")
                ckpt_integrity.check_bytes(data, chunks[key], where)
            elif len(data) != info.length:
                raise IntegrityError(f"{where}: {len(data)} bytes where {info.length} were written (truncated)")
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:  # a version-1 chunk that does not deserialise
            problems.append(f"{where}: does not deserialise ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        out["chunks"] += 1
        out["bytes"] += len(data)
        # optimizer state, slow weights and model parameters cannot hold NaN/inf; buffers (masks) may
        if index.fqn.startswith(("optim.", "lookahead.")) or index.fqn in model_params:
            if not finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                problems.append(f"{where}: {bad} non-finite value(s) in state that cannot hold them")
    for key in sorted(set(chunks or {}) - seen):
        problems.append(f"checkpoint {path}: tensor chunk {key} has a checksum but is not in the DCP metadata")
    return out


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a whole checkpoint on one process (no process group needed): ``(meta, {DCP key: full tensor})``.

    Every byte is checked against its checksum (format version 2) on the way.  The optimizer tensors come back
    with their logical shapes.  For offline tools (export, inspect).
    """
    path = Path(path)
    meta = _read_meta(path)
    try:
        metadata = ckpt_io.read_dcp_metadata(path, _files(meta))
    except ValueError as exc:
        raise CheckpointCorruptError(str(exc)) from None
    tensors = {fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for fqn, md in metadata.state_dict_metadata.items()}
    try:
        with ckpt_io.single_process_quiet():
            dcp.load(tensors, storage_reader=ckpt_io.reader(path, _chunks(meta)), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise CheckpointCorruptError(f"checkpoint {path}: reading the tensors failed: {_read_failure(exc)}") \
            from None
    for fqn in list(tensors):
        kind, _, rest = fqn.partition(".")
        name = rest.rpartition(".")[0]  # parameter names may contain dots, state keys do not
        if kind in ("optim", "lookahead") and name in meta["params"] and not fqn.endswith(SCALES_SUFFIX):
            tensors[fqn] = tensors[fqn].view(tuple(meta["params"][name]["shape"]))
    _decode_codes(meta, tensors)
    return meta, tensors


def _decode_codes(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """8-bit state (format version 3) as the values it stands for: the offline tools see values either way."""
    for group in meta["param_groups"]:
        for name in group["params"]:
            if meta["params"][name].get("state_format") != "int8":
                continue
            for key in group["state_keys"]:
                codes = tensors[f"optim.{name}.{key}"]
                scales = tensors.pop(f"optim.{name}.{key}{SCALES_SUFFIX}")
                tensors[f"optim.{name}.{key}"] = int8_state.dequantize_range(codes.reshape(-1), scales, 0).view(
                    codes.shape)
