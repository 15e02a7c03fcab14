"""Building a LightningModule from its checkpoint's ``hyper_parameters``, as ``load_from_checkpoint`` does.

A Lightning checkpoint records the arguments ``save_hyperparameters()`` saw (``hyper_parameters``,
and ``hparams_name`` when they came as one object). When the user names the class
(``ckptfit.build(LitModel, "last.ckpt")``, CLI ``--model pkg.mod:LitModel``), or the file records
its class path and ``trust=True`` allows importing it (:mod:`ckptfit.auto`), the module is built
with those arguments the way ``LightningModule.load_from_checkpoint`` builds it:

1. the saved arguments (the old ``hparams`` / ``module_arguments`` keys first, then
   ``hyper_parameters``); under ``hparams_name`` when the constructor takes that one argument;
2. the user's own arguments (``--model-arg``) over them;
3. only the constructor's own parameter names, unless it takes ``**kwargs``.

Then it is filled through the same plan as any other load. Lightning is not imported to
recognise the class (its MRO is looked at), and nothing from the file runs: values the
restricted reader keeps as inert placeholders (objects of classes not known to be safe) are
refused unless ``trust=True``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .errors import CheckpointError

__all__ = ["is_lightning_class", "lightning_kwargs", "lightning_target", "build_lightning"]

_PAST_KEYS = ("hparams", "module_arguments")  # Lightning's CHECKPOINT_PAST_HPARAMS_KEYS
_NOT_ARGS = ("_class_path", "class_path", "_instantiator")


def is_lightning_class(obj: Any) -> bool:
    """Whether ``obj`` is a ``LightningModule`` subclass (found by its MRO; Lightning is not imported)."""
    if not isinstance(obj, type):
        return False
    return any(k.__name__ == "LightningModule" and k.__module__.split(".")[0] in ("pytorch_lightning", "lightning")
               for k in obj.__mro__)


def lightning_target(factory: Any) -> tuple[type, dict[str, Any]] | None:
    """``(class, the user's own arguments)`` when ``factory`` is a LightningModule class, or a model
    SPEC factory (:func:`ckptfit.specs.model_factory`) that calls one; else None."""
    if is_lightning_class(factory):
        return factory, {}
    builder = getattr(factory, "ckptfit_builder", None)
    if is_lightning_class(builder):
        return builder, dict(getattr(factory, "ckptfit_kwargs", {}) or {})
    return None


def _placeholders(obj: Any, depth: int = 0) -> list[str]:
    from .safety import Placeholder

    if isinstance(obj, Placeholder):
        return [obj.qualname]
    if depth > 20:
        return []
    if isinstance(obj, Mapping):
        return [q for v in obj.values() for q in _placeholders(v, depth + 1)]
    if isinstance(obj, list | tuple):
        return [q for v in obj for q in _placeholders(v, depth + 1)]
    return []


def lightning_kwargs(cls: type, tree: Any, new: Mapping[str, Any] | None = None, *,
                     path: str | None = None) -> tuple[dict[str, Any], str]:
    """The constructor arguments ``load_from_checkpoint`` would pass to ``cls``, and where they came from.

    Raises:
        CheckpointError: the saved arguments hold objects ckptfit keeps inert (not rebuilt without trust).

    Example:
        >>> class Lit:  # any class; its constructor's parameter names filter the saved arguments
        ...     def __init__(self, hidden=8): ...
        >>> lightning_kwargs(Lit, {"hyper_parameters": {"hidden": 6, "lr": 0.1}})
        ({'hidden': 6}, 'hyper_parameters recorded in the checkpoint (hidden=6), as load_from_checkpoint')
    """
    saved: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for key in (*_PAST_KEYS, "hyper_parameters"):
            v = tree.get(key)
            if isinstance(v, Mapping):
                saved.update(v)
    for key in _NOT_ARGS:  # LightningCLI's bookkeeping, not constructor arguments
        saved.pop(key, None)
    inert = sorted(set(_placeholders(saved)))
    if inert:
        raise CheckpointError(f"the checkpoint's hyper_parameters hold objects of {', '.join(inert[:3])}, which "
                              f"ckptfit keeps inert (rebuilding them would run their code)", path=path,
                              hint=f"pass trust=True (CLI: --trust) if you trust that code, or build the module "
                                   f"yourself: ckptfit.build(lambda: {cls.__name__}(...), path)")
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    names = [n for i, (n, p) in enumerate(params.items())
             if i > 0 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    varkw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    hname = tree.get("hparams_name") if isinstance(tree, Mapping) else None
    kwargs: dict[str, Any] = {hname: saved} if isinstance(hname, str) and hname in names else dict(saved)
    kwargs.update(new or {})
    if not varkw:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return kwargs, f"hyper_parameters recorded in the checkpoint ({shown}), as load_from_checkpoint"


def build_lightning(cls: type, new: Mapping[str, Any], source: Any, build: Callable[..., Any], *,
                    mmap: bool = False, **load_options: Any) -> tuple[nn.Module, Any]:
    """``build`` a LightningModule ``cls`` with the file's hyper_parameters; the report's ``model`` says so."""
    from .checkpoint import as_checkpoint

    ckpt, opened = as_checkpoint(source, bool(load_options.get("trust")))
    try:
        kwargs, why = lightning_kwargs(cls, ckpt.tree, new, path=ckpt.path)

        def make() -> nn.Module:
            return cls(**kwargs)

        model, report = build(make, ckpt, mmap=mmap, **load_options)
    finally:
        if opened:
            ckpt.close()
    return model, replace(report, model=f"{cls.__module__}.{cls.__qualname__} ({why})")
