"""From a checkpoint file to a ready model in one call, when the architecture is known.

:func:`from_checkpoint` finds the architecture, in this order:

1. **recorded by the file**: a Hugging Face folder's ``config.json`` (built with transformers'
   config class, no weights fetched); a Lightning checkpoint's ``hyper_parameters`` plus the
   LightningModule class path it records (``_class_path``, as LightningCLI writes it), which is
   imported only with ``trust=True`` because importing and constructing it runs its code;
2. **identified** from names and shapes (:func:`ckptfit.identification.identify`), only when the best
   candidate is clearly right; otherwise it refuses and lists the candidates.

The model is then built through :func:`ckptfit.build`: on the meta device, no random init,
filled straight from the file, returned in eval mode (``train=True`` keeps training mode).
The report's ``model`` field says what was chosen and why.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .checkpoint import Checkpoint
from .errors import CheckpointError
from .report import LoadReport

__all__ = ["from_checkpoint", "choose_architecture", "hf_factory", "identified_factory"]

_CLASS_PATH_KEYS = ("_class_path", "class_path")
_NOT_ARGS = {"_class_path", "class_path", "_instantiator", "init_args"}


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def hf_factory(path: str, config: Mapping[str, Any]) -> tuple[Callable[[], nn.Module], str]:
    from .specs import model_factory

    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    model_type = config.get("model_type")
    if arch is not None:
        _check_model_class(arch, path)
    if not isinstance(model_type, str):
        raise CheckpointError(f"config.json has a model_type of type {type(model_type).__name__}, not a name",
                              path=path, hint="pass the model yourself with --model SPEC")
    name = f"transformers.{arch}" if arch else f"transformers.AutoModel[{model_type}]"
    inner = model_factory(f"hf:{path}")

    def make() -> nn.Module:
        try:
            return inner()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers parsing a config.json from the file: any error
            raise CheckpointError(f"cannot build the model config.json describes ({name}): "
                                  f"{type(e).__name__}: {str(e)[:300]}", path=path,
                                  hint="check config.json, or pass the model yourself with --model SPEC") from e

    return make, f"{name} (recorded in config.json)"


def _check_model_class(arch: Any, path: str) -> None:
    """Only a transformers model class (a ``PreTrainedModel`` subclass) may be built from a name the
    file gives: ``architectures: ["pipeline"]`` must not call ``transformers.pipeline(config)``."""
    import transformers

    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        shown = arch if isinstance(arch, str) and len(arch) <= 80 else f"a {type(arch).__name__}"
        raise CheckpointError(f"config.json names the architecture {shown!r}, which is not a transformers model "
                              f"class", path=path, hint="fix \"architectures\" in config.json, or pass the model "
                                                        "yourself with --model SPEC")


def _lightning_class(tree: Any) -> tuple[str, dict[str, Any]] | None:
    """``(class_path, init_args)`` a Lightning checkpoint records, or None."""
    if not isinstance(tree, dict):
        return None
    hp = tree.get("hyper_parameters")
    if not isinstance(hp, dict):
        return None
    for key in _CLASS_PATH_KEYS:
        path = hp.get(key)
        if isinstance(path, str) and path:
            args = hp.get("init_args") if isinstance(hp.get("init_args"), dict) else \
                {k: v for k, v in hp.items() if k not in _NOT_ARGS}
            return path, dict(args)
    return None


def _import_class(path: str, where: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"the checkpoint's LightningModule class {path!r} cannot be imported: {e}", path=where,
                              hint="install or put on PYTHONPATH the package that defines it, or pass the model "
                                   "yourself with ckptfit.build(factory, path)") from e
    obj = getattr(obj, attr, None)
    if not callable(obj):
        raise CheckpointError(f"the checkpoint's LightningModule class {path!r} does not exist", path=where)
    return obj


def _recorded_class(ckpt: Checkpoint) -> str | None:
    """The class a whole pickled model (``torch.save(model)``) or a TorchScript archive names,
    when it is not one of torch's own; None otherwise. Nothing is imported."""
    from .safety import Placeholder

    name = None
    if isinstance(ckpt.tree, Placeholder):
        name = ckpt.tree.qualname
    elif isinstance(ckpt.metadata.get("torchscript_class"), str):
        parts = ckpt.metadata["torchscript_class"].removeprefix("__torch__.").split(".")
        name = ".".join(p for p in parts if not p.startswith("___torch_mangle_"))
    if not name or "." not in name or name.startswith("torch."):
        return None
    return name


def identified_factory(ckpt: Checkpoint, use: str | None, families: Any) -> tuple[Callable[[], nn.Module], str]:
    from .identification import identify
    from .specs import model_factory

    result = identify(ckpt, use=use, families=families)
    best = result.best
    if best is None:
        lines = "\n".join(f"  {c.score:.3f} {c.architecture}({_kwargs_text(c.kwargs)}): {c.explained}"
                          for c in result.candidates[:5] if c.score > 0) or "  (nothing comparable)"
        hint = ("pass the model yourself: ckptfit load PATH --model SPEC (or ckptfit.build(factory, path)); "
                "`ckptfit identify PATH` shows what differs")
        recorded = _recorded_class(ckpt)
        if recorded is None:
            what = "the file does not record its architecture"
        else:
            kind = "TorchScript model" if ckpt.format == "torchscript" else "whole pickled model"
            what = (f"the file is a {kind} of class {recorded!r}, which ckptfit does not import (that would run "
                    "code from wherever the file says)")
            module, _, name = recorded.rpartition(".")
            if module == "__main__":
                hint = (f"{name} was defined in the training script itself: build it there and pass it, "
                        f"ckptfit.build({name}, path) or ckptfit.load({name}(...), path)")
            else:
                hint = (f"pass the model yourself: ckptfit load PATH --model {module}:{name} (add --model-arg "
                        f"for its constructor arguments), or ckptfit.build({name}, path)")
        raise CheckpointError(f"{what}, and no known architecture fits it completely; nearest candidates:\n{lines}",
                              path=ckpt.path, hint=hint)
    how = f"identified from names and shapes, score {best.score:.3f}"
    if best.equivalent:
        how += f"; same signature as {', '.join(best.equivalent[:3])}"
    chosen = f"{best.architecture}({_kwargs_text(best.kwargs)}) ({how})"
    if best.architecture.startswith("transformers."):
        kwargs = dict(best.kwargs)
        model_type = kwargs.pop("model_type")
        cls_name = best.architecture.split(".", 1)[1]

        def make() -> nn.Module:
            import transformers

            config = transformers.AutoConfig.for_model(model_type, **kwargs)
            return getattr(transformers, cls_name)(config)

        return make, chosen
    if not best.spec:
        raise CheckpointError(f"{best.architecture} was identified but cannot be built automatically", path=ckpt.path,
                              hint="pass the model yourself with --model SPEC")
    return model_factory(best.spec, dict(best.kwargs)), chosen


def choose_architecture(ckpt: Checkpoint, *, trust: bool = False, use: str | None = None,
                        families: Any = None) -> tuple[Callable[[], nn.Module], str]:
    """The model factory for an opened checkpoint, and a line saying what was chosen and why.

    Raises:
        CheckpointError: the file records a LightningModule class but ``trust`` is False, or
            nothing fits clearly (the candidates are listed).
    """
    config = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
    if isinstance(config, dict) and config.get("model_type"):
        factory, chosen = hf_factory(ckpt.path, config)
        # its sizes come from config.json: build() bounds it by the checkpoint (ckptfit.specs.bounded_by_file)
        factory.ckptfit_config_dir = ckpt.path  # type: ignore[attr-defined]
        return factory, chosen
    found = _lightning_class(ckpt.tree)
    if found is not None:
        class_path, args = found
        if not trust:
            raise CheckpointError(f"this Lightning checkpoint records its LightningModule class {class_path!r}; "
                                  "building it imports and runs that class's code, which ckptfit does only when "
                                  "asked", path=ckpt.path,
                                  hint="pass trust=True (CLI: --trust) if you trust the code that class comes from, "
                                       "or pass the model yourself with --model SPEC")
        cls = _import_class(class_path, ckpt.path)
        from ._lightning import is_lightning_class, lightning_kwargs

        if is_lightning_class(cls):  # built as load_from_checkpoint builds it
            hname = ckpt.tree.get("hparams_name")
            args, _ = lightning_kwargs(cls, {"hyper_parameters": args, "hparams_name": hname}, path=ckpt.path)
        text = f"{class_path}({_kwargs_text(args)}) (recorded in the Lightning checkpoint's hyper_parameters)"
        return (lambda: cls(**args)), text
    return identified_factory(ckpt, use, families)


def from_checkpoint(source: str | os.PathLike[str] | Checkpoint, *, trust: bool = False,
                    families: Any = None, **load_options: Any) -> tuple[nn.Module, LoadReport]:
    """Build the model a checkpoint holds and fill it, in one call.

    The architecture comes from the file (a Hugging Face folder's ``config.json``; a Lightning
    checkpoint's recorded LightningModule class with its ``hyper_parameters``, only with
    ``trust=True``) or is identified from names and shapes; ckptfit refuses to guess when no
    candidate is clearly right. The model is built through :func:`ckptfit.build`.

    Args:
        source: a checkpoint path (file or folder) or an opened :class:`~ckptfit.Checkpoint`.
        trust: allow real unpickling and importing a LightningModule class the file names
            (runs code). Off by default.
        families: restrict identification (see :func:`ckptfit.identification.identify`).
        **load_options: as for :func:`ckptfit.build` (``partial``, ``use``, ``device``, ``dtype``,
            ``freeze``, ``train`` ...).

    Returns:
        ``(model, report)``, the model in eval mode unless ``train=True`` (as ``from_pretrained``);
        ``report.model`` says which architecture was built and why.

    Raises:
        CheckpointError: the architecture is unknown or ambiguous (candidates listed), or it
            needs ``trust=True``.

    Example:
        >>> model, report = ckptfit.from_checkpoint("resnet_final.pth")   # doctest: +SKIP
        >>> report.model                                                   # doctest: +SKIP
        'torchvision.models.resnet34(num_classes=7) (identified from names and shapes, score 1.000)'
    """
    from .loading import build, open as open_checkpoint

    sha256 = load_options.pop("sha256", None)  # checked when the file is opened, here
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source, trust=trust, sha256=sha256)
    try:
        factory, chosen = choose_architecture(ckpt, trust=trust, use=load_options.get("use"), families=families)
        model, report = build(factory, ckpt, trust=trust, **load_options)
    finally:
        if ckpt is not source:
            ckpt.close()
    return model, replace(report, model=chosen)
