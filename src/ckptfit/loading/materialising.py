"""Meta tensors made real: loaded ones assigned (private memory, or a view of the file under
``build(mmap=True)``), the ones nothing loads given memory and their module's own init."""
from __future__ import annotations

import contextvars
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..lazy import MappedFile, Record
from .meta import INIT_ATTR
from .planning import Target

if TYPE_CHECKING:
    from .copying import Rollback
    from .streaming import Streamer

__all__ = ["ZERO_COPY", "assign", "device_for", "holders_of", "materialize_unloaded"]

# Set by build(mmap=True): parameters may be views of the memory-mapped file instead of copies.
ZERO_COPY: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptfit_zero_copy", default=False)


def holders_of(target: Target) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """``id(tensor) -> every (module, name, is_parameter) holding it`` (ties: several)."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for k, (mod, name, is_param) in target.owner.items():
        t = target.tensors.get(k)
        if t is not None:
            out.setdefault(id(t), []).append((mod, name, is_param))
    return out


def device_for(device: Any) -> torch.device:
    """Where meta tensors are materialised: ``device``, else the CPU (a bare ``cuda`` gets its index)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _zero_copy_ok(src: torch.Tensor) -> bool:
    """A tensor a parameter may alias: no element is stored twice (an expanded view is not)."""
    if src.is_contiguous():
        return True
    for n, st in zip(src.shape, src.stride()):
        if st == 0 and n > 1:
            return False
    return True


def assign(target: Target, key: str, dst: torch.Tensor, src: torch.Tensor, loc: tuple[MappedFile, int, int] | None,
            holders: Mapping[int, list[tuple[nn.Module, str, bool]]], streamer: Streamer, shared: dict[int, int],
            dev: torch.device, dtype: torch.dtype | None, record: Record | None = None) -> None:
    """Replace a meta tensor by the loaded one, in every module holding it (ties stay tied).

    By default the new tensor is private memory of the model's dtype (or ``dtype``) on
    ``device``, read from the file (CRC-checked against ``record`` as it is read): nothing done
    to the file later can change it. Where dtype and device already match, the new tensor *is*
    the source for a state dict in memory (the caller's tensor, as
    ``load_state_dict(assign=True)``), and, under ``build(mmap=True)``, for a file too: a
    copy-on-write view of the memory-mapped file.
    """
    _mod, _name, is_param = target.owner[key]
    want = dtype if dtype is not None and (dst.is_floating_point() or dst.is_complex()) else dst.dtype
    reuse = (src.device == dev and src.dtype == want and _zero_copy_ok(src)
             and (loc is None or ZERO_COPY.get())  # a view of the file only when asked for
             and shared.get(src.data_ptr(), id(dst)) == id(dst))  # two untied tensors never share memory
    if reuse:
        if record is not None and loc is not None:  # nothing copies it: read it once to check it
            streamer.run(lambda: loc[0].check_record(record, tensor=key), None, record.size)
        value = src
        if src.numel():
            shared[src.data_ptr()] = id(dst)
    else:
        value = torch.empty(tuple(dst.shape), dtype=want, device=dev)
        streamer.copy(value, src, loc, record, key)
    if is_param:
        cls = type(dst) if isinstance(dst, nn.Parameter) else nn.Parameter
        new: torch.Tensor = cls(value, requires_grad=dst.requires_grad)
    else:
        new = value
    for mod, name, isp in holders.get(id(dst)) or [target.owner[key]]:
        (mod._parameters if isp else mod._buffers)[name] = new


def materialize_unloaded(target: Target, loaded: Collection[str], device: Any = None,
                          dtype: torch.dtype | None = None, rollback: Rollback | None = None) -> None:
    """Give meta tensors that nothing loads real memory and their modules' own init.

    Every meta tensor of a module that holds an unloaded one is made real (on ``device``, in
    the model's dtype or ``dtype``) in every module holding it, so ties stay tied; then the
    module is initialised as its authors wrote it: ``reset_parameters`` (or
    ``_reset_parameters``), else the model's ``_init_weights(module)`` (Hugging Face), else
    the value ``__init__`` gave a small parameter (kept by :func:`parameters_on_meta`), else
    zeros. Tensors of those modules that the checkpoint does fill are then copied into.
    """
    loaded_ids = {id(target.tensors[k]) for k in loaded}
    pending = {id(t) for t in target.tensors.values() if t.is_meta and id(t) not in loaded_ids}
    if not pending:
        return
    model = target.model
    all_modules = list(model.modules())
    modules = [m for m in all_modules
               if any(t is not None and id(t) in pending for t in (*m._parameters.values(), *m._buffers.values()))]
    if not modules:
        return
    dev = device_for(device)
    made: dict[int, torch.Tensor] = {}
    inits: dict[int, torch.Tensor] = {}
    for mod in modules:
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is None or not t.is_meta or id(t) in made:
                    continue
                want = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
                data = torch.empty(tuple(t.shape), dtype=want, device=dev)
                made[id(t)] = type(t)(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                init = getattr(t, INIT_ATTR, None)
                if init is not None:
                    inits[id(made[id(t)])] = init
    for mod in all_modules:  # every holder, including modules that only share a tied tensor
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in made:
                    store[name] = made[id(t)]
    made_ids = {id(v) for v in made.values()}
    with torch.no_grad():
        if rollback is not None:  # an init may also reset the module's real tensors (BatchNorm's running stats)
            for mod in modules:
                for t in (*mod._parameters.values(), *mod._buffers.values()):
                    if t is not None and id(t) not in made_ids:
                        rollback.keep(t)
        for mod in modules:
            reset = getattr(mod, "reset_parameters", None)
            if not callable(reset):
                reset = getattr(mod, "_reset_parameters", None)
            init_weights = getattr(model, "_init_weights", None)
            if callable(reset):
                reset()
            elif callable(init_weights) and mod is not model:
                init_weights(mod)
            else:
                for store in (mod._parameters, mod._buffers):
                    for t in store.values():
                        if t is None or id(t) not in made_ids:
                            continue
                        init = inits.get(id(t))
                        if init is not None:
                            t.copy_(init)
                        elif t.is_floating_point() or t.is_complex():
                            t.zero_()
    # refresh the targets that were meta so the copy pass sees the real tensors
    fresh = Target(model)
    target.tensors.update({k: v for k, v in fresh.tensors.items() if k in target.tensors and target.tensors[k].is_meta})
