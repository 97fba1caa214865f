"""Why a checkpoint save failed, in words: the OS reason, the bytes needed and free, what is intact.

DCP reports a full disk as ``[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598`` (the
``torch.save`` writer loses the errno), so when the error itself carries no OS reason, a small probe write next
to the data (the same filesystem, the same quota, the same permissions) asks the OS directly.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def local_tensor_bytes(state: dict[str, Any]) -> int:
    """Bytes of tensor data this rank writes for ``state`` (DTensors count their local boxes only; a lower bound
    of the file size: DCP adds a small header per chunk)."""
    total = 0
    for value in state.values():
        local = value.to_local() if hasattr(value, "to_local") else value
        views = getattr(local, "_views", None)
        for t in (views if views is not None else [local]):
            total += t.numel() * t.element_size()
    return total


def probe_reason(directory: Path) -> str | None:
    """The OS error a 1 MiB write (with fsync) in ``directory`` gives now (None: it succeeds)."""
    probe = directory / ".write-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 2**20)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def save_failure(path: Path, tmp: Path, exc: BaseException, needed: int, previous: Path | None) -> str:
    """The message of a failed save of checkpoint ``path`` (being written in ``tmp``)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
    if reason is None:
        reason = probe_reason(tmp if tmp.is_dir() else path.parent)
    try:
        free = f", {shutil.disk_usage(path.parent).free} bytes free"
    except OSError:
        free = ""
    intact = f"the previous checkpoint {previous} is intact" if previous is not None else \
        "no earlier checkpoint exists there"
    cause = reason or f"{type(exc).__name__}: {str(exc)[:500]}"
    return (f"cannot save checkpoint {path}: {cause} (about {needed} bytes of tensors to write{free}); {intact}; "
            f"the partial directory {tmp.name} is removed")
