"""The loader: choose the container, plan, then apply the plan to a module, all or nothing.

:func:`plan` decides everything from names, shapes and dtypes (no tensor bytes read).
:func:`load` applies a plan: every source tensor is first obtained as a view of the
memory-mapped file (so a failure leaves the model untouched), then copied into the model's
own tensors in place (parameter identity, ``requires_grad`` and device kept), or assigned
zero-copy into parameters that live on the meta device (:func:`build`).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, StateDictCandidate, select_candidate
from .errors import CheckpointError, LoadError
from .formats import open_checkpoint
from .lazy import LazyTensor
from .matching import match
from .plan import Plan, TensorSpec
from .report import LoadReport

__all__ = ["open", "plan", "load", "build", "Source"]

Source = "str | os.PathLike[str] | Checkpoint | Mapping[str, torch.Tensor]"


def open(source: str | os.PathLike[str], *, trust: bool = False) -> Checkpoint:  # noqa: A001 - public verb
    """Open a checkpoint file or directory lazily; no tensor bytes are read.

    The format is recognised by content, not by extension: torch zip archives (``.pt``,
    ``.pth``, ``.ckpt``, ``.bin``), legacy torch files, safetensors, TorchScript archives,
    Hugging Face folders (sharded or not) and torch.distributed checkpoint folders.

    Args:
        source: path to the file or directory.
        trust: allow real unpickling (runs code from the file). Only for files you made.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        NotACheckpoint: the input is not a checkpoint (empty, HTML page, LFS pointer ...).
        CorruptCheckpoint: truncated or damaged.
        UnsafeCheckpoint: its pickles reference code that would run.

    Example:
        >>> ckpt = ckptfit.open("resnet18.pth")                  # doctest: +SKIP
        >>> ckpt.format, ckpt.num_tensors                        # doctest: +SKIP
        ('torch-zip', 122)
    """
    return open_checkpoint(source, trust=trust)


def _as_checkpoint(source: Any, trust: bool) -> tuple[Checkpoint, bool]:
    """(checkpoint, opened_here)."""
    if isinstance(source, Checkpoint):
        return source, False
    if isinstance(source, str | os.PathLike):
        return open_checkpoint(source, trust=trust), True
    if isinstance(source, Mapping):
        from .formats.torch_zip import wrap_real

        return Checkpoint(path="<state dict>", format="in-memory", tree=wrap_real(dict(source))), False
    if isinstance(source, nn.Module):
        return Checkpoint(path=f"<{type(source).__name__}>", format="in-memory",
                          tree={k: LazyTensor.of(v) for k, v in source.state_dict().items()}), False
    raise TypeError(f"source must be a path, a Checkpoint or a state dict, not {type(source).__name__}")


# ---------------------------------------------------------------------------------- target

class _Target:
    """The model's tensors: specs in state_dict order, ties, owners."""

    def __init__(self, model: nn.Module):
        self.model = model
        sd = model.state_dict(keep_vars=True)
        self.tensors: dict[str, torch.Tensor] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in self.tensors.items()]
        self.tied: dict[str, str] = {}
        first: dict[int, str] = {}
        for k, v in self.tensors.items():
            if id(v) in first:
                self.tied[k] = first[id(v)]
            else:
                first[id(v)] = k
        self.owner: dict[str, tuple[nn.Module, str, bool]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mname}." if mname else ""
            for pname, p in mod._parameters.items():
                if p is not None:
                    self.owner.setdefault(prefix + pname, (mod, pname, True))
            for bname, b in mod._buffers.items():
                if b is not None:
                    self.owner.setdefault(prefix + bname, (mod, bname, False))


# ---------------------------------------------------------------------------------- plan

def _specs_of(cand: StateDictCandidate) -> list[TensorSpec]:
    return [TensorSpec(k, t.shape, t.dtype) for k, t in cand.tensors.items()]


def _plan_for(target: _Target, cand: StateDictCandidate, *, partial: bool, rename, include, exclude) -> Plan:
    return match(target.specs, _specs_of(cand), partial=partial, rename=rename, include=include, exclude=exclude,
                 tied=target.tied)


def _choose(target: _Target, ckpt: Checkpoint, *, use: str | None, partial: bool, rename, include,
            exclude) -> tuple[StateDictCandidate, Plan, str]:
    cands = ckpt.state_dicts()
    if not cands:
        raise CheckpointError("the checkpoint holds no tensors that could be model weights", path=ckpt.path,
                              hint="run `ckptfit inspect` on it to see what it contains")
    opts = dict(partial=partial, rename=rename, include=include, exclude=exclude)
    if use is not None:
        c = select_candidate(cands, use, path=ckpt.path)
        return c, _plan_for(target, c, **opts), f"chosen with use={use!r}"
    default = next(c for c in cands if c.default)
    if len(cands) == 1:
        return default, _plan_for(target, default, **opts), default.reason
    # Several candidates: the default unless another (non-EMA, non-optimizer) one fits the model clearly better.
    scored = []
    for c in cands:
        if c.kind in ("ema", "optimizer") and c is not default:
            continue
        p = _plan_for(target, c, **opts)
        scored.append((p.ok, len(p.loads), c is default, c, p))
    scored.sort(key=lambda s: (s[0], s[1], s[2]), reverse=True)
    ok, n, is_default, c, p = scored[0]
    if is_default:
        return c, p, default.reason
    dp = next(s for s in scored if s[2])
    return c, p, (f"it fits the model ({n} tensors) better than the default {default.name!r} "
                  f"({len(dp[4].loads)} tensors)")


def plan(model: nn.Module, source: Any, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False) -> Plan:
    """Decide what :func:`load` would do, from names, shapes and dtypes only (a dry run).

    Takes the same arguments as :func:`load`; reads no tensor bytes and changes nothing.

    Returns:
        The :class:`Plan`; ``plan.ok`` tells whether :func:`load` would succeed, and
        ``plan.problems`` / ``plan.suggestions`` say why not and what to do.

    Example:
        >>> p = ckptfit.plan(model, "dp_model.pth")              # doctest: +SKIP
        >>> p.ok, p.transforms                                    # doctest: +SKIP
        (True, ("strip 'module.'",))
    """
    ckpt, opened = _as_checkpoint(source, trust)
    try:
        return _plan(_Target(model), ckpt, partial=partial, use=use, rename=rename, include=include,
                     exclude=exclude)[1]
    finally:
        if opened:
            ckpt.close()


def _plan(target: _Target, ckpt: Checkpoint, **opts) -> tuple[StateDictCandidate, Plan]:
    cand, p, why = _choose(target, ckpt, **opts)
    p = replace(p, container=cand.name, containers=tuple(c.name for c in ckpt.state_dicts()),
                container_reason=why, format=ckpt.format, path=ckpt.path)
    return cand, p


# ---------------------------------------------------------------------------------- load

def load(model: nn.Module, source: Any, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False) -> LoadReport:
    """Put a checkpoint into ``model`` in place, loading only what provably belongs, and report it.

    The state dict inside the file is found (the model's own weights over EMA and optimizer
    state), names are reconciled (``module.``, ``_orig_mod.``, ``model.`` ... prefixes learned
    from both key sets, your ``rename`` rules, structural alignment when names differ
    entirely), and shapes are checked: a tensor whose shape differs is never loaded. Unless
    ``partial=True``, every model tensor must come from the checkpoint (harmless differences
    such as a missing ``num_batches_tracked`` or a tied ``lm_head.weight`` aside); otherwise
    one :class:`LoadError` lists every problem and the model is left untouched.

    Args:
        model: the module to fill (in place, like ``load_state_dict``).
        source: a path (file or directory), an opened :class:`Checkpoint`, or a state dict.
        partial: allow model tensors to stay at their init (transfer learning: new head).
        use: which state dict in the file: ``"ema"``, or a key path such as ``"model.ema"``.
        rename: ``[(regex, replacement), ...]`` applied to checkpoint keys before matching.
        include: glob patterns; only matching tensors are loaded.
        exclude: glob patterns; matching tensors are not loaded (kept at init).
        device: move the model to this device and load there (default: where it is).
        dtype: cast the model's floating tensors to this dtype (default: keep the model's).
        trust: allow real unpickling; runs code from the file. Never needed for weights.

    Returns:
        A :class:`LoadReport`; ``print(report)`` for a summary.

    Raises:
        LoadError: names or shapes do not reconcile (all problems listed, model untouched).
        CheckpointError: the file cannot be read (see :func:`open`).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)  # doctest: +SKIP
        >>> report = ckptfit.load(model, "resnet18_imagenet.pth", partial=True)  # doctest: +SKIP
        >>> print(report)                                         # doctest: +SKIP
        Loaded 120/122 tensors from resnet18_imagenet.pth (torch-zip, container 'state_dict')
          left at init, shape differs (2): fc.{weight,bias} ...
    """
    start = time.perf_counter()
    ckpt, opened = _as_checkpoint(source, trust)
    try:
        target = _Target(model)
        cand, p = _plan(target, ckpt, partial=partial, use=use, rename=rename, include=include, exclude=exclude)
        if not p.ok:
            raise _load_error(p, model)
        if device is not None or dtype is not None:
            _move_model(model, device, dtype)
            target = _Target(model)
        nbytes = _apply(target, cand, p, device=device, dtype=dtype)
        dev = str(device) if device is not None else _device_of(model)
        return LoadReport.from_plan(p, device=dev, dtype=dtype, seconds=time.perf_counter() - start,
                                    bytes_read=nbytes)
    finally:
        if opened:
            ckpt.close()


def _device_of(model: nn.Module) -> str | None:
    for t in model.parameters():
        return str(t.device)
    for t in model.buffers():
        return str(t.device)
    return None


def _move_model(model: nn.Module, device: Any, dtype: torch.dtype | None) -> None:
    has_meta = any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())
    if has_meta:
        return  # built on meta: tensors are placed as they are assigned
    if device is not None:
        model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)


def _load_error(p: Plan, model: nn.Module) -> LoadError:
    from .report import render_plan

    name = type(model).__name__
    head = f"Error(s) in loading the checkpoint into {name}: {len(p.problems)} problem(s); the model was not changed"
    body = render_plan(p)
    hint = "; ".join(p.suggestions) if p.suggestions else "run `ckptfit plan` to see every decision"
    return LoadError(f"{head}\n{body}", path=p.path, hint=hint, problems=p.problems, plan=p)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _apply(target: _Target, cand: StateDictCandidate, p: Plan, *, device: Any = None,
           dtype: torch.dtype | None = None) -> int:
    """Copy or assign every planned tensor. Returns bytes read from the checkpoint."""
    loads = [(d.target, d.source, cand.tensors[d.source]) for d in p.loads if d.source is not None]
    # Phase 1: obtain every source as a CPU view (mmap, no copy) so a read failure changes nothing.
    views: list[tuple[str, torch.Tensor]] = [(t, lazy.load()) for t, _s, lazy in loads]
    nbytes = sum(lazy.nbytes for _t, _s, lazy in loads)
    meta_params = {k for k, v in target.tensors.items() if v.is_meta}
    if meta_params:
        _materialize_unloaded(target, {t for t, _ in views})
    replaced: dict[int, nn.Parameter | torch.Tensor] = {}
    with _no_grad():
        for key, src in views:
            dst = target.tensors[key]
            if dst.is_meta:
                _assign(target, key, dst, src, replaced, device, dtype)
            else:
                if src.dtype.is_floating_point != dst.dtype.is_floating_point and not dst.dtype.is_floating_point:
                    dst.copy_(src.to(dst.dtype))
                else:
                    dst.copy_(src)
    return nbytes


def _assign(target: _Target, key: str, dst: torch.Tensor, src: torch.Tensor, replaced: dict, device: Any,
            dtype: torch.dtype | None) -> None:
    """Replace a meta tensor by the loaded one (zero-copy when dtype and device already match)."""
    mod, name, is_param = target.owner[key]
    want = dtype if dtype is not None and dst.is_floating_point() else dst.dtype
    value = src.to(device=device if device is not None else "cpu", dtype=want)
    new: torch.Tensor = nn.Parameter(value, requires_grad=dst.requires_grad) if is_param else value
    if is_param and type(dst) is not nn.Parameter and isinstance(dst, nn.Parameter):
        new = type(dst)(value, requires_grad=dst.requires_grad)
    replaced[id(dst)] = new
    # every module holding this very tensor (ties) gets the new one
    for k, (m, n, isp) in target.owner.items():
        if target.tensors.get(k) is dst:
            (m._parameters if isp else m._buffers)[n] = new


def _materialize_unloaded(target: _Target, loaded: Collection[str]) -> None:
    """Give meta tensors that nothing loads real memory and their modules' own init."""
    loaded_ids = {id(target.tensors[k]) for k in loaded}
    for k in list(target.tied):
        if id(target.tensors[k]) in loaded_ids:
            loaded_ids.add(id(target.tensors[k]))
    modules: dict[int, nn.Module] = {}
    for key, t in target.tensors.items():
        if t.is_meta and id(t) not in loaded_ids:
            mod, name, is_param = target.owner[key]
            modules[id(mod)] = mod
    for mod in modules.values():
        for store in (mod._parameters, mod._buffers):
            for n, t in list(store.items()):
                if t is not None and t.is_meta:
                    new = torch.empty_like(t, device="cpu")
                    store[n] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        reset = getattr(mod, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            for store in (mod._parameters, mod._buffers):
                for t in store.values():
                    if t is not None and t.is_floating_point():
                        with torch.no_grad():
                            t.zero_()
    # refresh views of the model for the assignment pass
    fresh = _Target(target.model)
    target.tensors.update({k: v for k, v in fresh.tensors.items() if k in target.tensors and target.tensors[k].is_meta})


# ---------------------------------------------------------------------------------- build

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no random init); buffers stay real.

    Buffers are often computed in ``__init__`` (position ids, rotary frequencies) and are not
    always in a checkpoint, so they are built for real; they are small.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad) \
                if type(param) is not nn.Parameter else nn.Parameter(param.detach().to("meta"),
                                                                      requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build(factory: Callable[[], nn.Module] | str, source: Any, **load_options: Any) -> tuple[nn.Module, LoadReport]:
    """Construct a model without random init and fill it straight from the checkpoint.

    The model is built with its parameters on the meta device (no memory, no init), then each
    parameter is materialised from the checkpoint: zero-copy from the memory map where dtype
    and device already match, one copy where they do not. Parameters the checkpoint lacks
    (``partial=True``) get their module's own ``reset_parameters`` init.

    Args:
        factory: a zero-argument callable returning the model, or a model SPEC string
            (``"torchvision:resnet18"``, ``"timm:resnet50"``, ``"package.module:factory"``).
        source: as for :func:`load`.
        **load_options: as for :func:`load` (``partial``, ``use``, ``rename``, ``device``, ``dtype`` ...).

    Returns:
        ``(model, report)``.

    Example:
        >>> model, report = ckptfit.build(lambda: torchvision.models.resnet50(), "r50.safetensors")  # doctest: +SKIP
    """
    if isinstance(factory, str):
        from .specs import model_factory

        factory = model_factory(factory)
    with _parameters_on_meta():
        model = factory()
    report = load(model, source, **load_options)
    device = load_options.get("device")
    if device is not None:
        model.to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LoadError(f"after loading, {len(leftover)} tensor(s) are still on the meta device: "
                        f"{', '.join(leftover[:5])}", hint="pass partial=True or check the checkpoint")
    return model, report
