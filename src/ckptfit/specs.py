"""Model SPEC strings: where to get a model from, without weights. The one description of the grammar.

A SPEC names a model builder; ``--model SPEC`` (CLI), ``ckptfit.build("SPEC", ...)`` and the
second argument of ``ckptfit diff`` take the same strings::

    torchvision:NAME            a torchvision builder, weights=None       torchvision:resnet18
    timm:NAME                   timm.create_model(NAME, pretrained=False) timm:convnext_atto
    hf:CONFIG_DIR               a Hugging Face model from CONFIG_DIR/config.json (no download)
    package.module:ATTR         any importable callable returning an nn.Module   mypkg.models:Net
    path/to/file.py:ATTR        the same, from a Python file               ./net.py:Net

``ATTR`` may be dotted (``mypkg.zoo:Registry.small``). A file inside a package (a folder with
``__init__.py``) is imported under its package name, so its relative imports work; other
modules it imports must be importable (run from their folder, or set ``PYTHONPATH``).
Importing a module runs its code: name only code you trust (the checkpoint itself never runs).
An ``hf:`` model's sizes come from a file, so :func:`ckptfit.build` builds it within bounds the
checkpoint sets (:func:`bounded_by_file`): a config.json describing a model far larger than the
file is refused before the memory is taken.

Constructor arguments (``--model-arg K=V``, repeatable; ``model_kwargs`` in Python) are
Python literals: ``num_classes=10``, ``dims=(64, 128)``, ``act='gelu'``, ``bias=False``,
``scale=None``; a value that is not a literal stays a string (``act=gelu``); JSON's
``true``/``false``/``null`` are read as JSON.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

from .errors import CheckpointError

__all__ = ["model_factory", "parse_model_args", "bounded_by_file", "config_bounds"]


def parse_model_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["num_classes=10", "dims=(64, 128)", "act=gelu"]`` -> ``{"num_classes": 10, "dims": (64, 128), "act": "gelu"}``.

    Values are Python literals (:func:`ast.literal_eval`), else JSON (``true``, ``null``), else strings.

    Raises:
        CheckpointError: an item is not ``key=value`` or its key is not a Python name.

    Example:
        >>> parse_model_args(["num_classes=10", "dims=(64, 128)", "act=gelu", "bias=False"])
        {'num_classes': 10, 'dims': (64, 128), 'act': 'gelu', 'bias': False}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise CheckpointError(f"model argument {item!r} is not of the form name=value",
                                  hint="write e.g. --model-arg num_classes=10 (values are Python literals)")
        out[key] = _literal(text)
    return out


def _literal(text: str) -> Any:
    """A Python literal, else a JSON constant, else the text itself."""
    stripped = text.strip()
    if len(stripped) > 10_000:  # literal_eval of a huge nested literal can exhaust the stack
        return text
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if stripped in ("true", "false", "null"):
        return json.loads(stripped)
    return text


def _split(spec: str) -> tuple[str, str]:
    """``"KIND:NAME"`` -> ``(KIND, NAME)``; a file SPEC splits at its last ``':'`` (``C:\\m\\net.py:Net``)."""
    head, sep, attr = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return head, attr
    kind, _, name = spec.partition(":")
    return kind, name


def model_factory(spec: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A zero-argument callable building the model ``spec`` names (not called yet).

    Example:
        >>> make = model_factory("torchvision:resnet18", {"num_classes": 10})
        >>> type(make()).__name__
        'ResNet'
    """
    kwargs = dict(kwargs or {})
    if not isinstance(spec, str) or ":" not in spec:
        raise CheckpointError(f"model SPEC {spec!r} has no ':'", hint=_GRAMMAR)
    kind, name = _split(spec)
    if kind == "torchvision":
        torchvision = _installed("torchvision", "vision")
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as e:
            raise CheckpointError(f"torchvision has no model {name!r}",
                                  hint="see torchvision.models.list_models()") from e
        kwargs.setdefault("weights", None)
        return _calling(spec, builder, kwargs)
    if kind == "timm":
        timm = _installed("timm", "vision")
        if not timm.is_model(name):
            stem = name.split("_")[0].rstrip("0123456789") or name
            raise CheckpointError(f"timm has no model {name!r}", hint=f"see timm.list_models('{stem}*')")
        return _calling(spec, lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)
    if kind == "hf":
        transformers = _installed("transformers", "hf")
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

        make.ckptfit_config_dir = cfg_path  # type: ignore[attr-defined]  # its sizes come from a file: bounded_by_file
        return make
    if kind.endswith(".py") or "/" in kind or os.sep in kind:
        module = _import_file(kind, spec)
    else:
        if not all(part.isidentifier() for part in kind.split(".")):
            raise CheckpointError(f"model SPEC {spec!r}: {kind!r} is neither a module name nor a .py file",
                                  hint=_GRAMMAR)
        try:
            module = importlib.import_module(kind)
        except ImportError as e:
            raise CheckpointError(f"cannot import {kind!r} for model SPEC {spec!r}: {e}",
                                  hint="make the package importable (pip install it, or set PYTHONPATH), "
                                       "or name its file: path/to/module.py:ATTR") from e
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None) if part.isidentifier() else None
        if obj is None:
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise CheckpointError(f"{kind} has no attribute {name!r}",
                                  hint=f"check the name after ':' in {spec!r}"
                                       + (f"; classes defined there: {', '.join(names[:8])}" if names else ""))
    if not callable(obj):
        raise CheckpointError(f"{spec} is not callable ({type(obj).__name__})",
                              hint="name a class or a function that returns an nn.Module")
    return _calling(spec, obj, kwargs)


_GRAMMAR = ("use torchvision:NAME, timm:NAME, hf:CONFIG_DIR, package.module:ATTR or path/to/file.py:ATTR "
            "(see docs/cli.md)")


def _installed(module: str, extra: str) -> Any:
    """Import a model library a SPEC names, or say which ckptfit extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(f"{module} is not installed", hint=f'pip install "ckptfit[{extra}]"') from e


def _import_file(path: str, spec: str) -> Any:
    """The module in a ``.py`` file; inside a package it is imported under its dotted name (relative imports work).

    Nothing process-wide changes except what any import does (``sys.modules``); ``sys.path`` is left alone.
    """
    file = os.path.abspath(path)
    if not file.endswith(".py") or not os.path.isfile(file):
        raise CheckpointError(f"model SPEC {spec!r}: no Python file {path!r}" + (
            f" (looked in {os.getcwd()})" if not os.path.isabs(path) else ""),
            hint="give the path to a .py file, relative to the current folder: ./net.py:Net")
    parts = [os.path.basename(file)[:-3]]
    root = os.path.dirname(file)
    while os.path.isfile(os.path.join(root, "__init__.py")):
        parts.insert(0, os.path.basename(root))
        root = os.path.dirname(root)
    if not all(p.isidentifier() for p in parts):
        raise CheckpointError(f"model SPEC {spec!r}: {'.'.join(parts)!r} is not a module name Python can import",
                              hint="rename the file (and its package folders) to Python names")
    name = ".".join(parts)
    top = sys.modules.get(parts[0])
    try:
        if top is not None and _defined_in(top, os.path.join(root, parts[0])):
            return importlib.import_module(name)  # already imported from this very file or package
        if top is not None or parts[0] in sys.builtin_module_names:
            if len(parts) > 1:
                raise CheckpointError(f"model SPEC {spec!r}: a package {parts[0]!r} is already imported from "
                                      f"{getattr(top, '__file__', None) or 'elsewhere'}",
                                      hint=f"name it as a module instead: {name}:ATTR")
            parts[0] = name = f"{parts[0]}_{zlib.crc32(file.encode()):08x}"  # another module has that name
            found = importlib.util.spec_from_file_location(name, file)
        else:
            found = importlib.machinery.PathFinder.find_spec(parts[0], [root])
        if found is None or found.loader is None:
            raise CheckpointError(f"model SPEC {spec!r}: cannot import {file}", hint=_GRAMMAR)
        module = importlib.util.module_from_spec(found)
        sys.modules[parts[0]] = module
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(parts[0], None)
            raise
        return importlib.import_module(name) if len(parts) > 1 else module
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's own module failed to import: say which and why
        raise CheckpointError(f"importing {path} for model SPEC {spec!r} failed: {type(e).__name__}: {e}",
                              hint=f"the modules it imports must be importable: run from the folder they are "
                                   f"in, or set PYTHONPATH={root}") from e


def _defined_in(module: Any, stem: str) -> bool:
    """``module`` is the file ``stem.py`` or the package in folder ``stem``."""
    where = getattr(module, "__file__", None) or ""
    return os.path.abspath(where) in (stem + ".py", os.path.join(stem, "__init__.py"))


# A model a config.json describes is to hold the checkpoint it is built for: without partial=True every
# parameter comes from the file, so it holds about the file's bytes (times 2 for a half-precision file in a
# float32 model, 8 for a 4-bit one). partial=True may add new layers: a head, some adapters. Beyond the
# ratio below it cannot be a correct load, and config.json is wrong (or hostile: max_position_embeddings
# of 300,000,000 makes a BertModel compute 4.5 GB of position buffers in its __init__).
_PARAMETER_RATIO = 16
_MIN_PARAMETER_BYTES = 1 << 28


def bounded_by_file(factory: Callable[..., Any], make: Callable[[dict[str, Any]], nn.Module], ckpt: Any
                    ) -> Callable[[dict[str, Any]], nn.Module]:
    """``make`` bounded by the checkpoint ``ckpt`` it builds the model for, when ``factory`` is an ``hf:DIR``
    SPEC's (its sizes come from ``DIR/config.json``); else ``make`` itself. Call it on the meta device
    (:func:`ckptfit.loading.meta.parameters_on_meta`). A model far larger than the file raises
    :class:`~ckptfit.errors.ResourceLimitExceeded` before it takes the memory, saying what to do.
    """
    cfg_dir = getattr(factory, "ckptfit_config_dir", None)
    if cfg_dir is None:
        return make
    from .loading.meta import MIN_PARAMETERS

    tensors, nbytes = ckpt.num_tensors, ckpt.num_bytes
    size = f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"

    def bounded(kwargs: dict[str, Any]) -> nn.Module:
        with config_bounds(cfg_dir, max_parameters=max(4 * tensors, MIN_PARAMETERS),
                           max_parameter_bytes=max(_PARAMETER_RATIO * nbytes, _MIN_PARAMETER_BYTES),
                           why=f"far larger than the checkpoint it is to hold ({tensors} "
                               f"tensor{'' if tensors == 1 else 's'}, {size}), so it cannot be a correct load",
                           path=ckpt.path,
                           instead=f"those of the model that wrote the checkpoint; or, if the model really is this "
                                   f"large, build it yourself and fill it with ckptfit.load(model, {ckpt.path!r}) "
                                   f"(with partial=True for the layers the file lacks)"):
            return make(kwargs)

    return bounded


@contextlib.contextmanager
def config_bounds(cfg_dir: str, *, max_parameters: int, why: str, instead: str, path: str | None = None,
                  max_parameter_bytes: int | None = None) -> Iterator[None]:
    """Build (on meta) the model ``cfg_dir/config.json`` describes within these bounds and
    :data:`~ckptfit.loading.meta.MAX_INIT_BYTES`; past them, :class:`~ckptfit.errors.ResourceLimitExceeded`
    saying ``why`` it cannot be meant (refused at ``path``, the config by default) and to fix the sizes
    to ``instead``. The one refusal for every build whose sizes a config.json sets (load, build, diff).
    """
    from .errors import ResourceLimitExceeded
    from .loading.meta import MAX_INIT_BYTES, bounded_build

    config = os.path.join(cfg_dir, "config.json")
    try:
        with bounded_build(max_parameters=max_parameters, max_bytes=MAX_INIT_BYTES,
                           max_parameter_bytes=max_parameter_bytes, what=f"the model {config} describes"):
            yield
    except ResourceLimitExceeded as e:
        raise ResourceLimitExceeded(
            f"{e.detail.removesuffix('; not built')}, {why}; not built", path=path or config,
            hint=f"fix the sizes in {config} (layer counts, max_position_embeddings, vocab_size ...) to "
                 f"{instead}") from None


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
