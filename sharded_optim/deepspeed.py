"""DeepSpeed as a host: ``ShardedOptimizer`` as the client optimizer of ``deepspeed.initialize``.

DeepSpeed owns the distributed part (gradient reduction, ZeRO-1/2 partitioning, the parameter all-gather, loss
scaling, clipping); our optimizer runs as a plain local fused optimizer (``zero_stage=0``) over what DeepSpeed
hands it:

* ZeRO stage 0, fp32: the model's own parameters (DeepSpeed all-reduces the gradients first);
* ZeRO stage 1/2 (and bf16 at stage 0): one flat fp32 partition per param group.  DeepSpeed *replaces*
  ``group["params"]`` with it after construction and calls ``step()`` once per group with ``param_groups``
  narrowed to that group; ``ShardedOptimizer`` rebuilds its flat buffers for a group whose parameters were swapped
  while its state is empty, and counts steps per parameter, so every group sees each step exactly once.

What this module enforces, and why:

* ``nonfinite_policy="ignore"`` and no spike skipping: DeepSpeed decides which steps are skipped (fp16 overflow);
  a skip of our own, decided per group, would update some groups and not others.
* ``"zero_allow_untested_optimizer": true``: DeepSpeed refuses client optimizers under ZeRO otherwise.
* ``"gradient_clipping"`` defaults to ``0.0`` when the config does not set it: DeepSpeed 0.19 otherwise clips to
  global norm 1.0 silently, and a run then differs from the same run without DeepSpeed by that factor.
* ZeRO stage 3 and an ``"optimizer"`` section are refused (untested here; the section would replace ours).

Example::

    from sharded_optim import deepspeed as sod
    engine = sod.initialize(model, "configs/deepspeed_zero2.json", algorithm="adamod", lr=1e-3)
    loss = engine(batch).mean(); engine.backward(loss); engine.step()
"""
from __future__ import annotations

import copy
import json
from os import PathLike
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor, nn

from .optimizer import ShardedOptimizer

SUPPORTED_STAGES = (0, 1, 2)
# DeepSpeed versions tests/test_deepspeed.py passed with (also stated in pyproject.toml's "deepspeed" extra).  The
# adapter calls the private _link_all_hp_params of these wrappers after building our buffers; a DeepSpeed without
# it would leave DeepSpeed's views of the fp32 master and the optimizer state pointing at stale memory.
TESTED_DEEPSPEED = ("0.19.8",)
_LINKED_WRAPPERS = (("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
                    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer"))
_FORCED = {"zero_stage": 0, "nonfinite_policy": "ignore", "spike_sigma": None}


def load_config(config: str | PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A validated copy of a DeepSpeed config (a dict or a JSON file) with what a client optimizer needs.

    Raises ``ValueError`` naming the offending key for a config this adapter cannot honour.
    """
    if isinstance(config, (str, PathLike)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config: DeepSpeed config file {str(path)!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    if "optimizer" in cfg:
        raise ValueError('config: remove the "optimizer" section: ShardedOptimizer is the client optimizer and a '
                         "DeepSpeed optimizer section would replace it")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise ValueError(f'config["zero_optimization"] must be an object, got {zero!r}')
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ValueError(f'config["zero_optimization"]["stage"] must be one of {SUPPORTED_STAGES}, got {stage!r} '
                         "(ZeRO-3 is not supported with ShardedOptimizer as client optimizer)")
    if cfg.get("zero_allow_untested_optimizer") is False:
        raise ValueError('config["zero_allow_untested_optimizer"] must be true: DeepSpeed refuses a client '
                         "optimizer under ZeRO otherwise")
    cfg["zero_allow_untested_optimizer"] = True
    clip = cfg.setdefault("gradient_clipping", 0.0)   # DeepSpeed's own default would be a silent 1.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f'config["gradient_clipping"] must be a number >= 0, got {clip!r}')
    if cfg.get("fp16", {}).get("enabled", False) and cfg.get("bf16", {}).get("enabled", False):
        raise ValueError('config: "fp16" and "bf16" cannot both be enabled')
    return cfg


def client_optimizer(params: Iterable[Tensor] | Iterable[dict[str, Any]], algorithm: str = "adamw",
                     **opt_kwargs: Any) -> ShardedOptimizer:
    """A ``ShardedOptimizer`` set up to be DeepSpeed's client optimizer (local, no skipping of its own).

    ``opt_kwargs`` are ``ShardedOptimizer`` arguments (``lr``, ``betas``, ``weight_decay``, ``amsgrad``,
    ``kernel``, ``stats_interval``...).  ``zero_stage``, ``nonfinite_policy`` and ``spike_sigma`` are fixed here
    and may only be passed with the values DeepSpeed needs.
    """
    for name, value in _FORCED.items():
        if name in opt_kwargs and opt_kwargs[name] != value:
            raise ValueError(f"{name}={opt_kwargs[name]!r} is not possible under DeepSpeed (it must be {value!r}): "
                             "DeepSpeed shards, reduces and skips steps itself")
    for name in ("process_group", "reduce_grads", "overlap", "bucket_mb", "grad_reduce_dtype", "param_gather_dtype"):
        if name in opt_kwargs:
            raise ValueError(f"{name} has no effect under DeepSpeed (it reduces and gathers itself); remove it")
    return ShardedOptimizer(params, algorithm, **{**opt_kwargs, **_FORCED})


def initialize(model: nn.Module, config: str | PathLike[str] | dict[str, Any], algorithm: str = "adamw",
               params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None, **opt_kwargs: Any) -> Any:
    """``deepspeed.initialize`` with a :func:`client_optimizer`; returns the engine.

    ``params`` defaults to ``model.parameters()``; pass param-group dicts for per-group hyperparameters.  Our
    optimizer is :func:`sharded_optimizer` ``(engine)``.
    """
    import deepspeed  # optional dependency: pip install 'sharded-optim[deepspeed]'

    check_deepspeed(deepspeed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = load_config(config)
    optimizer = client_optimizer(model.parameters() if params is None else params, algorithm, **opt_kwargs)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    # DeepSpeed has swapped in its flat fp32 partitions by now.  Build our buffers for every group at once
    # (step() would build each group's lazily, with param_groups narrowed to it) and let DeepSpeed re-link its
    # per-parameter views of the partitions: building re-points a partition's storage into our flat buffer,
    # and DeepSpeed's views (safe_get_full_fp32_param, its checkpoint fragments) must follow it.  DeepSpeed
    # links its views of the optimizer state after the first step, when every group then has state.
    optimizer._ensure_runtimes()
    relink = getattr(engine.optimizer, "_link_all_hp_params", None)   # ZeRO-1/2 and bf16 wrappers: see check_deepspeed
    if engine.optimizer is not optimizer and callable(relink):
        relink()
    return engine


def check_deepspeed(deepspeed: Any) -> None:
    """Refuse a DeepSpeed whose wrappers lack the private ``_link_all_hp_params`` this adapter calls.

    Raises ``RuntimeError`` naming the installed version, the missing method and the tested versions.
    """
    import importlib

    version = getattr(deepspeed, "__version__", "unknown")
    for module_name, class_name in _LINKED_WRAPPERS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            cls = None
        if cls is None or not callable(getattr(cls, "_link_all_hp_params", None)):
            raise RuntimeError(
                f"DeepSpeed {version} is not compatible with sharded_optim.deepspeed: {module_name}.{class_name}"
                "._link_all_hp_params (a private DeepSpeed API the adapter uses to re-link DeepSpeed's views of "
                f"the fp32 master and the optimizer state) is missing. Tested with DeepSpeed "
                f"{', '.join(TESTED_DEEPSPEED)}: pip install 'sharded-optim[deepspeed]'")


def sharded_optimizer(engine: Any) -> ShardedOptimizer:
    """Our optimizer inside a DeepSpeed engine (under the ZeRO / bf16 / fp16 wrapper, if any)."""
    opt = getattr(engine, "optimizer", engine)
    for _ in range(3):   # engine.optimizer -> DeepSpeed wrapper -> ours
        if isinstance(opt, ShardedOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise TypeError("the engine's optimizer is not a ShardedOptimizer (was it built with sharded_optim.deepspeed?)")
