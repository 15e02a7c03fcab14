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

__all__ = ["INIT_ATTR", "parameters_on_meta", "bounded_build", "MIN_PARAMETERS", "MAX_INIT_BYTES"]

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
    if kept is None or param is None:
        return None
    bound = getattr(_BUILDING, "bound", None)
    if bound is not None:
        bound.parameter(module, name, param)
    if param.is_meta:
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
    if bound is not None:
        bound.seen[id(meta)] = meta  # registered again (a tied weight): one tensor, counted once
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


# ---------------------------------------------------------------------------------- bounds

# Bounds on building a model whose sizes a file sets (a config.json): the model that wrote a file holds
# about as many tensors as the file (a few more: ties, buffers left out), and its __init__ computes small
# buffers (position ids, rotary frequencies, causal masks), not gigabytes.
MIN_PARAMETERS = 4096
MAX_INIT_BYTES = 1 << 30

class _Bound(TorchFunctionMode):
    """Counts what a build registers and computes; raises :class:`~ckptfit.errors.ResourceLimitExceeded` past its bounds.

    Parameters are counted as they are registered (:func:`_parameter_to_meta`). Every torch call
    that would make real tensors (a factory such as ``arange``/``ones``, or an op on real tensors:
    ``tril``, ``outer``, ``repeat`` ...) is first run on the meta device to learn the size of what it
    returns, and refused before it runs for real when that is too large: a buffer of ``config.json``'s
    ``max_position_embeddings`` squared never reaches memory. Calls on meta tensors cost nothing and
    are not counted; ``empty`` (memory never touched until written) neither.
    """

    _LAZY = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
    # calls that make no new tensor memory (a property such as ``.data``/``.T``/``.shape``, grad mode,
    # sizes), made for every parameter registered: not measured, which would cost more than the build
    _FREE = frozenset({"__get__", "_set_grad_enabled", "numel", "element_size", "size", "dim", "stride"})

    def __init__(self, max_parameters: int, max_bytes: int, what: str, max_parameter_bytes: int | None = None) -> None:
        super().__init__()
        self.max_parameters, self.max_bytes, self.what = max_parameters, max_bytes, what
        self.max_parameter_bytes = max_parameter_bytes
        self.parameters = 0
        self.bytes = 0
        self.parameter_bytes = 0
        # meta parameters counted, by id, kept alive here (they cost no memory): a freed tensor's id may be
        # given to the next one, which would then go uncounted. A real parameter is counted as it arrives and
        # dropped for its meta twin, which is the one recorded (a tie registers the twin again).
        self.seen: dict[int, torch.Tensor] = {}

    def parameter(self, module: nn.Module, name: str, param: torch.Tensor) -> None:
        from ..errors import ResourceLimitExceeded

        self.parameters += 1
        if self.parameters > self.max_parameters:
            raise ResourceLimitExceeded(f"{self.what} has more than {self.max_parameters} parameters (stopped "
                                        f"at parameter {self.max_parameters + 1}: {type(module).__name__}.{name}); "
                                        f"not built")
        if id(param) in self.seen:
            return
        if param.is_meta:
            self.seen[id(param)] = param
        self.parameter_bytes += param.numel() * param.element_size()
        if self.max_parameter_bytes is not None and self.parameter_bytes > self.max_parameter_bytes:
            raise ResourceLimitExceeded(
                f"{self.what} has more than {_size(self.max_parameter_bytes)} of parameters (reached at "
                f"{type(module).__name__}.{name}, shape {list(param.shape)}: {_size(self.parameter_bytes)} so far); "
                f"not built")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in self._LAZY and name not in self._FREE:
            size = self._real_size(func, args, kwargs)
            if size:
                self.bytes += size
                if size > self.max_bytes or self.bytes > self.max_bytes:
                    from ..errors import ResourceLimitExceeded

                    raise ResourceLimitExceeded(
                        f"{self.what} would compute {self.bytes / 2**20:.0f} MiB of real tensors in its __init__ "
                        f"(torch.{name} alone: {size / 2**20:.0f} MiB; at most {self.max_bytes >> 20} MiB); not built")
        return func(*args, **kwargs)

    @staticmethod
    def _real_size(func: Any, args: tuple, kwargs: dict) -> int:
        """Bytes of real tensors ``func`` would return (0: none, meta ones, or unknown)."""
        from torch.utils._pytree import tree_flatten, tree_map

        if _on_meta_only(args, kwargs):  # the common call while building on meta: settled without a pytree walk
            return 0
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if tensors and all(t.is_meta for t in tensors):
            return 0
        if not tensors and str(kwargs.get("device", "")) == "meta":
            return 0
        try:
            with torch._C.DisableTorchFunction():
                meta_args, meta_kwargs = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a,
                                                  (args, kwargs))
                if not tensors:
                    meta_kwargs = {**meta_kwargs, "device": "meta"}
                out = func(*meta_args, **meta_kwargs)
                inputs = {id(a) for a in tree_flatten((meta_args, meta_kwargs))[0] if isinstance(a, torch.Tensor)}
                # new memory: a result that is neither a view (expand, transpose) nor an input written in place
                # (fill_, which commits the pages of an ``empty``)
                return sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor) and (id(t) in inputs or not t._is_view()))
        except Exception:  # noqa: BLE001 - no meta kernel, or not a tensor function: run as it is
            return 0


_SCALARS = (int, float, bool, str, type(None), torch.dtype)


def _on_meta_only(args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments are meta tensors and plain scalars only, with no ``device=``: its results
    are meta tensors (or it fails: a meta tensor cannot be copied to a device named by a string), never
    real memory. Anything else (a list, a device) says False."""
    some = False
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if not a.is_meta:
                return False
            some = True
        elif not isinstance(a, _SCALARS):
            return False
    return some and "device" not in kwargs


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def bounded_build(*, max_parameters: int, max_bytes: int, what: str,
                  max_parameter_bytes: int | None = None) -> Iterator[None]:
    """Inside :func:`parameters_on_meta`: refuse a build beyond ``max_parameters`` parameters,
    ``max_parameter_bytes`` of them (as the model would hold them once filled; None: any), or
    ``max_bytes`` of real tensors computed in ``__init__`` (a model described by a file, whose sizes
    the file sets). Raises :class:`~ckptfit.errors.ResourceLimitExceeded` as the limit is crossed,
    before the memory is taken; this thread only.
    """
    bound = _Bound(max_parameters, max_bytes, what, max_parameter_bytes)
    outer = getattr(_BUILDING, "bound", None)
    _BUILDING.bound = bound
    try:
        with bound:
            yield
    finally:
        _BUILDING.bound = outer
