"""The on-disk format of a checkpoint directory, shared by the save and the load side: names and version, the
errors, and where the newest complete checkpoint is (the ``latest`` pointer, else the highest step).

A checkpoint directory ``<root>/<name>`` is complete when it holds ``meta.json`` (written last); ``<root>/latest``
names the newest one.  Nothing here imports torch or the optimizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_NAME = "sharded-optim-checkpoint"
# 2: checksums (integrity, checksum) and model_params in meta.json; 3: 8-bit state saved as codes + block scales
# ("state_format": "int8" per parameter); a checkpoint without such state is still written as version 2
FORMAT_VERSION = 3
META_FILE = "meta.json"
RNG_DIR = "rng"
LATEST_FILE = "latest"
MASTER_KEY = "master"
SLOW_KEY = "slow_param"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model/optimizer (nothing was modified), or a save that
    failed (the previous checkpoint is intact)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint that fails verification: damaged, truncated or missing files, bytes that do not match their
    checksums, non-finite values where none can be.  ``load(..., latest=True)`` falls back past these (and only
    these: a checkpoint that does not fit the model is the caller's error, and an older one would not fit
    either)."""


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

