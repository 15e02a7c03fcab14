"""Model SPEC strings, as the CLI takes them: where to get a model from, without weights.

- ``torchvision:resnet18`` — a torchvision builder (``weights=None``),
- ``timm:resnet50`` — ``timm.create_model(name, pretrained=False)``,
- ``hf:PATH`` — a Hugging Face model from the ``config.json`` in folder PATH (no download),
- ``package.module:factory`` — any importable callable returning an ``nn.Module``.

Keyword arguments (``num_classes=10``) are passed to the builder.
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import CheckpointError

__all__ = ["model_factory", "parse_model_args"]


def parse_model_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["num_classes=10", "in_chans=1"]`` -> ``{"num_classes": 10, "in_chans": 1}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CheckpointError(f"model argument {item!r} is not of the form key=value",
                                  hint="write e.g. --model-arg num_classes=10")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def model_factory(spec: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A zero-argument callable building the model ``spec`` names (not called yet).

    Example:
        >>> make = model_factory("torchvision:resnet18", {"num_classes": 10})
        >>> type(make()).__name__
        'ResNet'
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        raise CheckpointError(f"model SPEC {spec!r} has no ':'",
                              hint="use torchvision:NAME, timm:NAME, hf:CONFIG_DIR or package.module:factory")
    kind, name = spec.split(":", 1)
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise CheckpointError("torchvision is not installed", hint='pip install "ckptfit[vision]"') from e
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as e:
            raise CheckpointError(f"torchvision has no model {name!r}",
                                  hint="see torchvision.models.list_models()") from e
        kwargs.setdefault("weights", None)
        return _calling(spec, builder, kwargs)
    if kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise CheckpointError("timm is not installed", hint='pip install "ckptfit[vision]"') from e
        if not timm.is_model(name):
            stem = name.split("_")[0].rstrip("0123456789") or name
            raise CheckpointError(f"timm has no model {name!r}", hint=f"see timm.list_models('{stem}*')")
        return _calling(spec, lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)
    if kind == "hf":
        try:
            import transformers
        except ImportError as e:
            raise CheckpointError("transformers is not installed", hint='pip install "ckptfit[hf]"') from e
        cfg_path = name if os.path.isdir(name) else os.path.dirname(name) or "."
        if not os.path.exists(os.path.join(cfg_path, "config.json")):
            raise CheckpointError(f"no config.json in {cfg_path}", hint="point hf: at a save_pretrained folder")

        def make() -> nn.Module:
            config = transformers.AutoConfig.from_pretrained(cfg_path, **kwargs)
            arch = (config.architectures or [None])[0]
            cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):  # only model classes
                return transformers.AutoModel.from_config(config)
            return cls(config)

        return make
    module_name = kind
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"cannot import {module_name!r} for model SPEC {spec!r}: {e}",
                              hint="make the package importable (pip install it, or set PYTHONPATH)") from e
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CheckpointError(f"{module_name} has no attribute {name!r}",
                                  hint=f"check the name after ':' in {spec!r} (package.module:factory)")
    if not callable(obj):
        raise CheckpointError(f"{spec} is not callable")
    return _calling(spec, obj, kwargs)


def _calling(spec: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    """``builder(**kwargs)`` as a zero-argument factory; wrong constructor arguments become a
    :class:`CheckpointError` naming the SPEC, not a bare ``TypeError``."""

    def make() -> nn.Module:
        try:
            return builder(**kwargs)
        except TypeError as e:
            if "argument" not in str(e):
                raise
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not (k == "weights" and v is None))
            raise CheckpointError(f"cannot build {spec}({args}): {e}",
                                  hint="check the --model-arg names and values against the model's constructor"
                                  ) from e

    make.ckptfit_builder = builder  # type: ignore[attr-defined]  # a LightningModule class is built with the
    make.ckptfit_kwargs = kwargs  # type: ignore[attr-defined]  # file's hyper_parameters (ckptfit._lightning)
    return make
