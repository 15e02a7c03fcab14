"""Building a model with its parameters on the meta device: no memory, no random init, in the
calling thread only, with nothing of torch patched (see :func:`parameters_on_meta`)."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["INIT_ATTR", "parameters_on_meta"]

# ---------------------------------------------------------------------------------- build

# The value ``__init__`` gave a small parameter before it was moved to the meta device is kept
# on the meta parameter (attribute below), for modules without ``reset_parameters`` (a custom
# norm's ``ones``) that a partial load leaves at init. Large ones are not kept: they would cost
# the memory build() saves.
INIT_ATTR = "_ckptfit_init_value"
_INIT_MAX_NUMEL = 1 << 16
_INIT_MAX_TOTAL = 1 << 24  # elements kept per build, at most


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no random init); buffers stay real.

    Buffers are often computed in ``__init__`` (position ids, rotary frequencies) and are not
    always in a checkpoint, so they are built for real; they are small. Small parameters keep
    the value ``__init__`` gave them on the side, for a partial load to fall back on. Meanwhile
    ``torch.nn.init``'s in-place initialisers return at once when handed a meta tensor, which
    they could not fill anyway (``reset_parameters`` of every layer calls them).

    Only the calling thread is affected: parameters move to meta through torch's parameter
    registration hook, which does nothing outside a thread inside this context, and init is
    skipped by a :class:`~torch.overrides.TorchFunctionMode`, which is per thread. Nothing of
    ``torch`` is patched, so another thread building modules meanwhile gets real, initialised
    parameters, and two threads may build at once.
    """
    _install_registration_hook()
    outer = getattr(_BUILDING, "kept", None)
    if outer is None:
        _BUILDING.kept = [0]  # elements kept so far, shared by nested uses
    try:
        with _SkipInitOnMeta():
            yield
    finally:
        if outer is None:
            _BUILDING.kept = None


_BUILDING = threading.local()  # .kept is set while this thread builds on meta (see parameters_on_meta)
_HOOK_LOCK = threading.Lock()
_hook_installed = False


def _install_registration_hook() -> None:
    """Register :func:`_parameter_to_meta` with torch once; it stays, and acts only in a building thread.

    Installed once and never removed: removing a global hook while another thread iterates
    torch's hook table would break that thread's ``register_parameter``.
    """
    global _hook_installed
    if _hook_installed:
        return
    with _HOOK_LOCK:
        if not _hook_installed:
            from torch.nn.modules.module import register_module_parameter_registration_hook

            register_module_parameter_registration_hook(_parameter_to_meta)
            _hook_installed = True


def _parameter_to_meta(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
    """In a thread inside :func:`parameters_on_meta`: the meta twin of ``param`` (else None: unchanged)."""
    kept = getattr(_BUILDING, "kept", None)
    if kept is None or param is None or param.is_meta:
        return None
    with torch._C.DisableTorchFunction():  # plain tensor work: past _SkipInitOnMeta, at full speed
        cls = type(param) if isinstance(param, nn.Parameter) else nn.Parameter
        meta = cls(param.detach().to("meta"), requires_grad=param.requires_grad)
        n = param.numel()
        if (n <= _INIT_MAX_NUMEL and kept[0] + n <= _INIT_MAX_TOTAL and param.device.type == "cpu"
                and not callable(getattr(module, "reset_parameters", None))
                and not callable(getattr(module, "_reset_parameters", None))):
            setattr(meta, INIT_ATTR, param.detach().clone())
            kept[0] += n
    return meta


# ``torch.nn.init`` functions that fill a tensor in place. On a meta parameter (every parameter
# registered under parameters_on_meta) they compute nothing, yet go through torch's Python
# decompositions: ~20 us each, half the time of building a model of 10,000 small layers.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


class _SkipInitOnMeta(TorchFunctionMode):
    """``torch.nn.init``'s in-place initialisers return a plain meta tensor as it is (no values to fill).

    A torch function mode is active in the thread that entered it only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inits = {fn for fn in (getattr(nn.init, n, None) for n in _INIT_FUNCTIONS) if callable(fn)}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._inits:
            t = args[0] if args else kwargs.get("tensor")
            if type(t) in (torch.Tensor, nn.Parameter) and t.is_meta:
                return t
        return func(*args, **kwargs)
