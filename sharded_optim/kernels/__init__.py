"""Fused elementwise kernels: the update math (:mod:`.adam_family`), how it runs (:mod:`.dispatch`), and the
statistics pass on a shard (:mod:`.stats`)."""
from .adam_family import VARIANTS
from .dispatch import KERNEL_MODES, resolve_mode, run

__all__ = ["VARIANTS", "KERNEL_MODES", "resolve_mode", "run"]
