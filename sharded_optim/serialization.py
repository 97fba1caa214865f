"""``ShardedOptimizer.state_dict()`` / ``load_state_dict()``: torch.optim-style state with full logical tensors.

:func:`full_state_dict` gathers each runtime's shards into full tensors (DTensor runtimes export their sharded
entries as they are); :func:`load_state_dict` validates everything first (:func:`validate_param_groups`,
:func:`validate_entries`) and only then writes this rank's pieces of each tensor.  The methods of
:class:`~sharded_optim.optimizer.ShardedOptimizer` call these; the rendezvous of a sharded ``state_dict()`` is
:mod:`sharded_optim.consolidate`.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from . import rules
from .runtime import DTensorStateRuntime, ParamRuntime
from .zero import all_gather

MASTER_KEY = "master_param"  # fp32 master copy of bf16/fp16 parameters, in state_dict()

Plan = list[tuple[Tensor, "dict[str, Any] | None"]]   # (parameter, its validated saved entry or None)


def full_state_dict(opt: Any) -> dict[str, Any]:
    """``{"state", "param_groups", "algorithm"}`` of ``opt`` with full logical tensors (a collective when
    sharded: every runtime's shards are all-gathered, each state tensor once)."""
    opt._ensure_runtimes()
    opt.wait_params()
    for _, rt in opt._all_runtimes():
        rt.prepare_update()  # a master copy must reflect parameters written since the last step
    state: dict[int, dict[str, Tensor]] = {}
    groups = []
    index = 0
    gathered: dict[tuple[int, str], Tensor] = {}
    for group in opt.param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        ids = []
        for p in group["params"]:
            rt, slot_index = opt._locate[id(p)]
            slot = rt.layout.slots[slot_index]
            ids.append(index)
            step = int(rt.steps[slot_index])
            if rt.keeps_dtensor_state:
                # FSDP2/DTensor parameters: state stays sharded, as DTensors (what DCP expects; see fsdp.py)
                state[index] = cast(DTensorStateRuntime, rt).export_entry(slot_index, opt.algorithm == "nadam")
            elif step > 0:
                entry: dict[str, Tensor] = {"step": torch.tensor(step, dtype=torch.int64)}
                for key in rt.state:
                    full = gathered.get((id(rt), key))
                    if full is None:
                        # low-precision state is exported in the compute dtype, as torch.optim keeps it
                        full = gathered[(id(rt), key)] = gather_full(opt, rt, rt.state_values(key))
                    entry[key] = full[slot.offset: slot.offset + slot.numel].view(slot.shape)
                if opt.algorithm == "nadam":
                    entry["mu_product"] = torch.tensor(float(rt.mu_products[slot_index]), dtype=torch.float64)
                if rt.has_master_copy:
                    # bf16/fp16 parameters: the fp32 master is state too, or a resume loses precision
                    full = gathered.get((id(rt), MASTER_KEY))
                    if full is None:
                        full = gathered[(id(rt), MASTER_KEY)] = gather_full(opt, rt, rt.master)
                    entry[MASTER_KEY] = full[slot.offset: slot.offset + slot.numel].view(slot.shape)
                state[index] = entry
            index += 1
        packed["params"] = ids
        groups.append(packed)
    return {"state": state, "param_groups": groups, "algorithm": opt.algorithm}


def gather_full(opt: Any, rt: ParamRuntime, local: Tensor) -> Tensor:
    """The full flat tensor (``layout.total_numel`` elements) of which ``local`` is this rank's shard, bucket by
    bucket (all-gathered over ``opt.process_group``; ``local`` itself on one rank)."""
    if opt.world_size == 1:
        return local
    full = torch.empty(rt.layout.total_numel, dtype=local.dtype, device=local.device)
    for bucket in rt.layout.buckets:
        all_gather(full[rt.layout.bucket_full_range(bucket)],
                   local[rt.layout.bucket_local_range(bucket)].contiguous(),
                   group=opt.process_group)
    return full


def validate_param_groups(algorithm: str, saved_groups: list[dict[str, Any]],
                          param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hyperparameters each of ``param_groups`` takes from ``saved_groups`` (a state dict's), validated:
    same group and parameter counts, every common hyperparameter present, no option of another algorithm,
    valid for ``algorithm`` (:func:`rules.validate_group`) and the same ``amsgrad`` (it fixes the state set).

    Raises ``ValueError`` (or what :func:`rules.validate_group` raises); writes nothing.
    """
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                         f"{len(param_groups)}")
    new_hparams = []
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} has {len(saved['params'])} parameters in the state_dict and "
                             f"{len(group['params'])} in the optimizer")
        absent = [k for k in rules.COMMON_HYPERPARAMETERS if k not in saved]
        if absent:
            raise ValueError(f"param group {gi} of the state_dict is missing hyperparameter(s) {absent}")
        try:
            hparams = saved_hyperparameters(algorithm, {k: v for k, v in saved.items() if k != "params"}, group)
        except (ValueError, TypeError) as exc:   # same type, with where the group came from
            raise type(exc)(f"param group {gi} of the state_dict: {exc}") from None
        merged = {**group, **hparams}
        if bool(merged.get("amsgrad", False)) != bool(group.get("amsgrad", False)):
            raise ValueError(f"param group {gi}: state_dict has amsgrad={merged.get('amsgrad')} but the "
                             f"optimizer has amsgrad={group.get('amsgrad')}")
        new_hparams.append({k: v for k, v in merged.items() if k != "params"})
    return new_hparams


def saved_hyperparameters(algorithm: str, saved: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a saved param group (``saved``, without ``params``) as live ``group`` takes them.

    Shared by :func:`load_state_dict` and the checkpoint loader (:mod:`sharded_optim.checkpoint.loading`), which
    check their own framing (counts, parameter names, state keys) first.  Refuses options of another algorithm
    (:func:`rules.foreign_options`); converts what serialization changed back to the group's types (a list where
    the group holds a tuple, ``betas`` always; a number where the group holds a tensor, as in capturable groups);
    validates the merged group for ``algorithm`` (:func:`rules.validate_group`).  Raises ``ValueError`` or
    ``TypeError`` whose text the caller prefixes with where the group came from; writes nothing.

    ``state_precision`` is left out: it is how the live optimizer stores its state, not a hyperparameter (state
    saved in one precision loads into any, as it loads at any world size).
    """
    foreign = rules.foreign_options(algorithm, saved)
    if foreign:
        raise ValueError(f"option(s) {foreign} that algorithm {algorithm!r} does not use: it was saved by "
                         "another algorithm")
    hparams = {k: v for k, v in saved.items() if k != "state_precision"}
    for k, v in hparams.items():
        current = group.get(k)
        if isinstance(v, list) and (k == "betas" or isinstance(current, tuple)):
            hparams[k] = tuple(v)
        elif isinstance(current, Tensor) and isinstance(v, (int, float)) and not isinstance(v, bool):
            hparams[k] = torch.tensor(v, dtype=current.dtype, device=current.device)
    rules.validate_group(algorithm, {**{k: v for k, v in group.items() if k != "params"}, **hparams})
    return hparams


def validate_entries(algorithm: str, saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]],
                     saved_state: dict[Any, Any], one_step_count: bool) -> Plan:
    """Pair each parameter with its saved state entry (None: no state saved), validated: every state key of its
    group, tensors of the parameter's shape, an integer ``step`` >= 0; with ``one_step_count`` (sharded or device
    path) one step count per param group.  Raises ``ValueError``/``TypeError``; writes nothing."""
    plan: Plan = []
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        keys = rules.state_keys(algorithm, group)
        for saved_id, p in zip(saved["params"], group["params"]):
            entry = saved_state.get(saved_id)
            if entry is None:
                plan.append((p, None))
                continue
            required = ("step",) + keys + (("mu_product",) if algorithm == "nadam" else ())
            missing = [k for k in required if k not in entry]
            if missing:
                raise ValueError(f"state of parameter {saved_id} (group {gi}) is missing key(s) {missing}")
            for key in keys:
                value = entry[key]
                if not isinstance(value, Tensor):
                    raise TypeError(f"state[{saved_id}][{key!r}] must be a tensor, got {type(value).__name__}")
                if value.numel() != p.numel() or (value.dim() and tuple(value.shape) != tuple(p.shape)):
                    raise ValueError(f"state[{saved_id}][{key!r}] has shape {tuple(value.shape)}, the "
                                     f"parameter has shape {tuple(p.shape)}")
            if MASTER_KEY in entry and entry[MASTER_KEY].numel() != p.numel():
                raise ValueError(f"state[{saved_id}][{MASTER_KEY!r}] has {entry[MASTER_KEY].numel()} elements, "
                                 f"the parameter has {p.numel()}")
            step = entry["step"]
            step_value = float(step.item() if isinstance(step, Tensor) else step)
            if not (step_value >= 0 and step_value == int(step_value)):
                raise ValueError(f"state[{saved_id}]['step'] must be an integer >= 0, got {step_value}")
            plan.append((p, entry))
    if one_step_count:  # both keep one step count per run without reading the counters
        for gi, group in enumerate(param_groups):
            steps = {int(float(e["step"])) if e is not None else 0 for p, e in plan if any(p is q for q in group["params"])}
            if len(steps) > 1:
                raise ValueError(f"param group {gi}: a sharded or device-path (CUDA, capturable) optimizer needs "
                                 "one step count per param group, "
                                 f"the state_dict has {sorted(steps)}")
    return plan


def load_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` into ``opt`` (see :meth:`ShardedOptimizer.load_state_dict`): everything is validated
    before anything is written."""
    opt._ensure_runtimes()
    opt.wait_params()
    opt._loads = getattr(opt, "_loads", 0) + 1  # a consolidated state_dict is stale from here on
    opt._finish_deferred_stats()  # they describe the state about to be replaced
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
    saved_algorithm = state_dict.get("algorithm", opt.algorithm)
    if saved_algorithm != opt.algorithm:
        raise ValueError(f"state_dict is for algorithm {saved_algorithm!r}, this optimizer runs "
                         f"{opt.algorithm!r}")
    saved_groups = state_dict["param_groups"]
    new_hparams = validate_param_groups(opt.algorithm, saved_groups, opt.param_groups)
    plan = validate_entries(opt.algorithm, saved_groups, opt.param_groups, state_dict["state"],
                            opt.sharded or opt._on_device)
    # validated: apply
    for group, hparams in zip(opt.param_groups, new_hparams):
        group.update(hparams)
    values: dict[tuple[int, str], tuple[ParamRuntime, Tensor]] = {}   # low-precision state: written back once
    for p, entry in plan:
        rt, slot_index = opt._locate[id(p)]
        if rt.keeps_dtensor_state:
            cast(DTensorStateRuntime, rt).import_entry(slot_index, entry, opt.algorithm == "nadam")  # see fsdp.py
            continue
        for key in rt.state:
            source = None if entry is None else entry[key].detach().reshape(-1)
            if (id(rt), key) not in values:
                values[(id(rt), key)] = (rt, rt.state_values(key))
            write_slot(rt, slot_index, values[(id(rt), key)][1], source)
        if rt.has_master_copy and entry is not None and MASTER_KEY in entry:
            master = entry[MASTER_KEY].detach()
            write_slot(rt, slot_index, rt.master, master.reshape(-1))
            p.detach().copy_(master.view_as(p))  # the parameters follow their restored master
        rt.steps[slot_index] = 0 if entry is None else int(float(entry["step"]))
        if opt.algorithm == "nadam":
            rt.mu_products[slot_index] = 1.0 if entry is None else float(entry["mu_product"])
    for (_, key), (rt, local) in values.items():
        rt.store_state(key, local)


def write_slot(rt: ParamRuntime, slot_index: int, buffer: Tensor, source: Tensor | None) -> None:
    """Write this rank's pieces of parameter ``slot_index`` into ``buffer`` from the flattened full ``source``
    (zeros when ``source`` is None)."""
    for piece in rt.layout.pieces:
        if piece.slot != slot_index:
            continue
        dst = buffer[piece.local_lo: piece.local_lo + piece.hi - piece.lo]
        if source is None:
            dst.zero_()
        else:
            dst.copy_(source[piece.lo: piece.hi])
