"""The experiment registry: name -> :class:`Experiment`, filled when the experiment modules are imported."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..registry import Registry

if TYPE_CHECKING:
    from .common import Context

# One module per experiment; each calls :func:`register` at import time.
EXPERIMENT_MODULES: tuple[str, ...] = (
    "reddi", "lr_sensitivity", "warmup", "weight_decay", "one_cycle", "bias_correction", "state_precision",
)


@dataclass(frozen=True)
class Experiment:
    """A named experiment; ``run(ctx)`` returns the JSON-able results (rank 0 writes them out)."""

    name: str
    help: str
    run: Callable[["Context"], dict[str, Any]]


_REGISTRY = Registry("experiment")  # name -> Experiment


def register(experiment: Experiment) -> Experiment:
    """Add an experiment; registering a different one under a taken name raises."""
    return _REGISTRY.add(experiment)


def experiments() -> dict[str, Experiment]:
    """Every registered experiment, by name (imports the experiment modules on first use)."""
    for module in EXPERIMENT_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return dict(_REGISTRY)


def get(name: str) -> Experiment:
    """The experiment registered as ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    found = experiments()
    if name not in found:
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(sorted(found))}")
    return found[name]
