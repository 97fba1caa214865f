"""Parameters whose storage a client replaced after the optimizer was built: re-bound, rebuilt, or refused.

The parameters of a :class:`~sharded_optim.zero.FlatParamGroup` are views into its flat buffer (as Megatron's
parameter buffer and apex's contiguous parameters are): the update and the all-gather then write them in place.
Clients replace that storage behind the optimizer's back: ``model.to(device)`` and ``model.half()`` set
``param.data``, ``load_state_dict(assign=True)`` under ``torch.__future__.set_swap_module_params_on_conversion``
swaps the tensors, user code assigns ``p.data = t``.  :func:`rebind_replaced_storage` runs at the start of
``step()``, ``clip_grad_norm_()`` and ``state_dict()``; what it does per runtime is
:meth:`FlatParamGroup.rebind_replaced_storage <sharded_optim.zero.FlatParamGroup.rebind_replaced_storage>`.
"""
from __future__ import annotations

from typing import Any


def describe(group: dict[str, Any], group_index: int, rt: Any, index: int) -> str:
    """``param_groups[g]['params'][j]`` (group name, shape) of the runtime's parameter ``index``."""
    p = rt.params[index]
    j = next((j for j, q in enumerate(group["params"]) if q is p), index)
    return (f"param_groups[{group_index}]['params'][{j}] (group {group.get('name', group_index)!r}, "
            f"shape {tuple(rt.layout.slots[rt.layout.slot_of_index[index]].shape)})")


def rebind_replaced_storage(opt: Any) -> None:
    """Re-bind every parameter of ``opt`` whose storage was replaced; rebuild the buffers of a param group whose
    parameters changed device or dtype before its first step (its state is all zeros, nothing is lost)."""
    rebuild = []
    for gi, group in enumerate(opt.param_groups):
        runtimes = opt._runtimes.get(id(group), [])
        needs = False
        for rt in runtimes:
            needs = rt.rebind_replaced_storage(lambda i, rt=rt: describe(group, gi, rt, i)) or needs
        if needs:
            rebuild.append((gi, group, runtimes))
    if rebuild and not opt._on_device and opt.nonfinite_policy != "raise" and opt.spike_sigma is None and all(
            p.device.type == "cuda" for g in opt.param_groups for p in g["params"]):
        opt._on_device = True   # the model moved to CUDA before any step: take the no-sync path (device_step)
    for gi, group, runtimes in rebuild:
        where = f"param group {gi} ({group.get('name', gi)!r})"
        if any(int(rt.steps.max()) > 0 for rt in runtimes if len(rt.steps)):
            raise RuntimeError(f"parameters of {where} moved to another device or dtype while others of the group "
                               "had taken steps; build a new optimizer after moving the model")
        if opt._collected is not None:
            raise RuntimeError(f"parameters of {where} moved to another device or dtype between clip_grad_norm_() "
                               "and step(); move the model before the backward pass")
        if opt._attached:
            raise RuntimeError(f"parameters of {where} moved to another device or dtype after attach_model(); "
                               "move the model before building the optimizer")
        for rt in runtimes:
            rt.remove_hooks()
        opt._runtimes[id(group)] = opt._build_runtimes(group)
        opt._state_bytes = None
