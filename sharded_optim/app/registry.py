"""Named entries registered at import time: the ``sharded-optim`` subcommands and the experiments."""
from __future__ import annotations

from typing import Any, TypeVar

Entry = TypeVar("Entry")


class Registry(dict[str, Any]):
    """``name -> entry`` for entries with a ``name``; registering a *different* entry under a taken name raises
    (the same one again is a no-op: a module imported twice registers twice)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, entry: Entry) -> Entry:
        """Register ``entry`` under ``entry.name`` and return it; a different entry under a taken name raises
        ``ValueError``."""
        name = entry.name  # type: ignore[attr-defined]
        existing = self.get(name)
        if existing is not None and existing != entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry
