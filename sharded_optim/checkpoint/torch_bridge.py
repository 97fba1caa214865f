"""Bridges between our checkpoints and plain single-file ``torch.optim`` state dicts.

``export_torch_optim`` writes what ``torch.optim.<Algorithm>.load_state_dict`` reads (tensors in a
``torch.save`` file, loadable with ``weights_only=True``): ``state`` keyed by parameter index in param-group
order (entries only for parameters that took a step, ``step`` as a float32 0-d tensor as torch keeps it),
``param_groups`` with our hyperparameters (torch ignores the keys it does not know), plus ``algorithm`` and
``param_names`` at the top level.  Lookahead slow weights and fp32 master copies have no torch.optim
counterpart and are not exported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import rules
from .format import CheckpointError
from .state import _unwrap
from .verify import read_checkpoint


def export_torch_optim(ckpt_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Convert checkpoint ``ckpt_dir`` to a torch.optim-style state dict file ``out_file`` (one process)."""
    meta, tensors = read_checkpoint(ckpt_dir)
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    names: list[str] = []
    index = 0
    for gi, saved in enumerate(meta["param_groups"]):
        group = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                 if k not in ("params", "state_keys")}
        ids = []
        for name in saved["params"]:
            info = meta["params"][name]
            if info["step"] > 0:
                entry = {"step": torch.tensor(float(info["step"]), dtype=torch.float32)}
                for key in saved["state_keys"]:
                    entry[key] = tensors[f"optim.{name}.{key}"].clone()
                if meta["algorithm"] == "nadam":
                    entry["mu_product"] = torch.tensor(float(info["mu_product"]), dtype=torch.float64)
                state[index] = entry
            ids.append(index)
            names.append(name)
            index += 1
        group["params"] = ids
        groups.append(group)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"state": state, "param_groups": groups, "algorithm": meta["algorithm"], "param_names": names},
               tmp)
    os.replace(tmp, out)
    return out


def import_torch_optim(file: str | os.PathLike, model: torch.nn.Module, optimizer: Any) -> None:
    """Load a torch.optim-style state dict file (from ``torch.optim.X.state_dict()`` or
    :func:`export_torch_optim`) into ``optimizer`` at any world size.  Tensors only (``weights_only=True``);
    validated before anything is written (``ShardedOptimizer.load_state_dict``)."""
    opt, _la = _unwrap(optimizer)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except Exception as exc:
        raise CheckpointError(f"{file}: not a loadable tensors-only state dict ({type(exc).__name__}: "
                              f"{str(exc)[:500]})") from None
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError(f"{file}: expected a dict with keys 'state' and 'param_groups'")
    owned = {id(p) for p in model.parameters()}
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in owned:
                raise CheckpointError(f"param group {gi}, parameter {i} of the optimizer is not a parameter of "
                                      "the model given")
    algorithm = sd.get("algorithm")
    if algorithm is not None and algorithm not in rules.SPECS:
        raise CheckpointError(f"{file}: unknown algorithm {algorithm!r}")
    opt.load_state_dict(sd)
