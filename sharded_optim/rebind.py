"""Parameters whose storage a client replaced after the optimizer was built: re-bound, rebuilt, or refused.

The parameters of a :class:`~sharded_optim.zero.FlatParamGroup` are views into its flat buffer (as Megatron's
parameter buffer and apex's contiguous parameters are): the update and the all-gather then write them in place.
Clients replace that storage behind the optimizer's back: ``model.to(device)`` and ``model.half()`` set
``param.data``, ``load_state_dict(assign=True)`` under ``torch.__future__.set_swap_module_params_on_conversion``
swaps the tensors, user code assigns ``p.data = t``.  :func:`rebind_replaced_storage` runs at the start of
``step()``, ``clip_grad_norm_()`` and ``state_dict()``; what it does per runtime is
:func:`rebind_flat_group` (and, for FSDP2's DTensor runtime, ``DTensorParamGroup.rebind_replaced_storage``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .flat import bound_views, refresh_master_pieces

if TYPE_CHECKING:
    from .zero import FlatParamGroup


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


def rebind_flat_group(flat: FlatParamGroup, name_of: Callable[[int], str] | None = None) -> bool:
    """Re-bind parameters whose storage a client replaced (``model.to()``, ``p.data = t``, ``swap_tensors``);
    True if the caller must rebuild this group (docs/ARCHITECTURE.md, "Parameters stay views").

    Common path: compare each parameter's ``data_ptr`` and shape with its view's (no per-element work; a new
    allocation cannot share an address of our live buffer, so the pointer stands for device and dtype too).
    Same shape/device/dtype: the new values become the master and the parameter is re-pointed into ``full``.
    Device or dtype changed before any step: True.  Otherwise ``RuntimeError`` naming ``name_of(index)``.
    """
    current = bound_views(flat.params)
    if current == flat._bound:
        return False
    flat.wait_params()  # an in-flight all-gather still targets the flat buffer
    rebuild = False
    ptrs, shapes = flat._bound
    for s, slot in enumerate(flat.layout.slots):
        if (current[0][slot.index], current[1][slot.index]) == (ptrs[slot.index], shapes[slot.index]):
            continue
        p = flat.params[slot.index]
        name = name_of(slot.index) if name_of is not None else f"parameter {slot.index} of its group"
        if p.shape != slot.shape:
            raise RuntimeError(f"{name} changed shape from {tuple(slot.shape)} to {tuple(p.shape)} after the "
                               "optimizer was built; its optimizer state has the old shape: build a new optimizer")
        if p.device != flat.device or p.dtype != flat.dtype:
            taken = int(flat.steps.max()) if len(flat.steps) else 0
            if taken > 0 or any(flat._reduced) or flat._pending:
                when = f"after {taken} step(s)" if taken else "after backward reduced its gradients"
                raise RuntimeError(f"{name} moved from {flat.device}/{flat.dtype} to {p.device}/{p.dtype} {when}; "
                                   f"its optimizer state stays on {flat.device}/{flat.dtype}. Move or cast the "
                                   "model before building the optimizer, or build a new optimizer")
            rebuild = True
            continue
        value = p.detach().reshape(-1)
        view = flat.full[slot.offset: slot.offset + slot.numel]
        view.copy_(value)
        if flat.master is not flat.full:
            refresh_master_pieces(flat.layout, flat.master, s, value)
        p.data = view.view(slot.shape)
        ptrs[slot.index], shapes[slot.index] = p.data_ptr(), p.shape
        flat._versions[slot.index] = p._version
        flat.rebinds += 1
    return rebuild
