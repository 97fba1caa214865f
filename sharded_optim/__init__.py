"""sharded-optim: ZeRO-style sharded Adam-family optimizers for PyTorch, with optimizer-health telemetry.

Public entry points: :class:`ShardedOptimizer`, :class:`Lookahead`, :data:`ALGORITHMS` (adam, adamw, adamax,
nadam, radam, adamod, adabound, diffgrad, diffmod).
"""
from .lookahead import Lookahead
from .optimizer import ShardedOptimizer
from .rules import ALGORITHMS

__all__ = ["ALGORITHMS", "Lookahead", "ShardedOptimizer"]
__version__ = "0.1.0"
