"""Signatures: the ``(key, shape)`` lists of torchvision and timm models built on the meta device
with a sentinel ``num_classes``, built in worker processes when there are many, stored in the index."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .cache import read_json, write_json

__all__ = ["NBT", "SENTINEL", "Store", "build_many", "key_patterns", "on_meta", "quiet", "signature_of",
           "timm_entries", "tv_entries"]

if TYPE_CHECKING:
    import torch

SENTINEL = 1009  # num_classes used to build signatures: prime, no layer width is a multiple of it
NBT = "num_batches_tracked"

_TV_MODULES = {  # torchvision module -> (default num_classes, extra builder kwargs)
    "": (1000, {}),
    "video": (400, {}),
    "detection": (91, {"weights_backbone": None}),
    "segmentation": (21, {"weights_backbone": None}),
}
# Builders with optional auxiliary heads: index the other variant too.
_TV_VARIANTS = {
    "googlenet": [{"aux_logits": False}],
    "inception_v3": [{"aux_logits": False}],
    "fcn_resnet50": [{"aux_loss": True}], "fcn_resnet101": [{"aux_loss": True}],
    "deeplabv3_resnet50": [{"aux_loss": True}], "deeplabv3_resnet101": [{"aux_loss": True}],
    "deeplabv3_mobilenet_v3_large": [{"aux_loss": True}],
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("transformers", "timm", "torch")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def on_meta(make) -> torch.nn.Module:
    """Build with every tensor on meta; fall back to parameters-only on meta for builders that copy data."""
    import torch

    from ..loading.meta import parameters_on_meta

    try:
        with torch.device("meta"):
            return make()
    except (NotImplementedError, RuntimeError):
        with parameters_on_meta():
            return make()


def signature_of(model: torch.nn.Module) -> tuple[list[str], list[list[int]], dict[str, str]]:
    """State-dict keys and shapes (``num_batches_tracked`` left out), and ``{tied_key: canonical_key}``."""
    import torch

    keys, shapes = [], []
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor) and not k.endswith(NBT):
            keys.append(k)
            shapes.append(list(v.shape))
            if id(v) in first:
                tied[k] = first[id(v)]
            else:
                first[id(v)] = k
    return keys, shapes, tied


def tv_entries() -> list[dict]:
    import torchvision.models as tvm

    out = []
    for sub, (ncls, extra) in _TV_MODULES.items():
        mod = getattr(tvm, sub) if sub else tvm
        for name in tvm.list_models(module=mod):
            arch = f"torchvision.models.{sub + '.' if sub else ''}{name}"
            for variant in [{}] + _TV_VARIANTS.get(name, []):
                out.append({"id": arch + "".join(f"[{k}={v}]" for k, v in variant.items()), "arch": arch,
                            "spec": f"torchvision:{name}", "kwargs": variant, "build": dict(extra),
                            "default_num_classes": ncls, "registry": "torchvision", "name": name})
    return out


def _build_entry(entry: dict) -> dict:
    """The signature of one registry entry (built on meta), or the entry with an ``error``."""
    out = dict(entry)
    try:
        with quiet():
            if entry["registry"] == "torchvision":
                import torchvision.models as tvm

                builder = tvm.get_model_builder(entry["name"])
                kw = {"weights": None, **entry["build"], **entry["kwargs"]}
                try:
                    model = on_meta(lambda: builder(num_classes=SENTINEL, **kw))
                    out["sentinel"] = True
                except (TypeError, ValueError):
                    model = on_meta(lambda: builder(**kw))
                    out["sentinel"] = False
            elif entry["registry"] == "timm":
                import timm

                try:
                    model = on_meta(lambda: timm.create_model(entry["name"], pretrained=False,
                                                               num_classes=SENTINEL))
                    out["sentinel"] = True
                except Exception:  # noqa: BLE001 - some models take no num_classes
                    model = on_meta(lambda: timm.create_model(entry["name"], pretrained=False))
                    out["sentinel"] = False
            else:
                raise ValueError(f"unknown registry {entry['registry']!r}")
        out["keys"], out["shapes"], out["tied"] = signature_of(model)
    except Exception as e:  # noqa: BLE001 - a builder that fails is recorded and skipped
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def build_many(entries: list[dict], workers: int | None = None) -> list[dict]:
    """Build signatures, in worker processes when there are many (building is CPU-bound Python)."""
    if workers is None:  # spawned workers re-import torch (~5 s each): worth it only with cores to spare
        cpus = os.cpu_count() or 1
        workers = min(cpus - 1, 8) if cpus >= 4 and len(entries) >= 100 else 1
    if workers <= 1 or len(entries) < 2:
        return [_build_entry(e) for e in entries]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_build_entry, entries, chunksize=4))


class Store:
    """One JSON file of signatures, keyed by entry id, extended as entries are built."""

    def __init__(self, path: str):
        self.path = path
        self.data = read_json(path)
        self.sigs: dict[str, dict] = self.data.setdefault("signatures", {})
        self.dirty = False

    def ensure(self, entries: list[dict], workers: int | None = None) -> int:
        todo = [e for e in entries if e["id"] not in self.sigs]
        if todo:
            for sig in build_many(todo, workers):
                self.sigs[sig["id"]] = sig
            write_json(self.path, self.data)
        return len(todo)


def timm_entries() -> list[dict]:
    import timm
    from timm.models import _registry

    out = []
    for name in timm.list_models():
        module = _registry._model_to_module.get(name, "?")
        stem = (re.match(r"[a-z]+", name) or re.match(r".", name)).group(0)
        ncls = 1000
        try:
            cfg = timm.models.get_pretrained_cfg(name)
            ncls = int(getattr(cfg, "num_classes", 1000) or 1000) if cfg is not None else 1000
        except Exception:  # noqa: BLE001
            pass
        out.append({"id": f"timm.{name}", "arch": f"timm.{name}", "spec": f"timm:{name}", "kwargs": {},
                    "build": {}, "default_num_classes": ncls, "registry": "timm", "name": name,
                    "group": f"{module}:{stem}"})
    return out


def key_patterns(keys: Iterable[str]) -> set[str]:
    return {re.sub(r"\d+", "#", k) for k in keys}
