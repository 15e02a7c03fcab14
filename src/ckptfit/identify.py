"""Which known architecture, with which constructor arguments, produced a bare state dict.

:func:`identify` looks at names and shapes only. It compares the checkpoint's state dict with
*signatures*: the ``(key, shape)`` lists of known models built on the meta device (no weights,
no downloads, no random init):

- every torchvision classification, video, detection and segmentation builder,
- every timm architecture in ``timm.list_models()`` (base names, no pretrained tags),
- common Hugging Face transformers families (BERT, GPT-2, Llama, T5 ...), whose sizes
  (hidden size, layers, heads, vocabulary) are read from the shapes.

Models are built with a sentinel ``num_classes`` (1009, a prime no layer width uses), so the
tensors a classifier head owns are known and ``num_classes`` can be read from the checkpoint's
shapes. Each comparison goes through :func:`ckptfit.matching.match`, the reconciliation
:func:`ckptfit.load` uses, so ``module.`` / ``model.`` prefixes (DataParallel, Lightning) and
the file's container choice are handled alike.

The signature index is cached on disk (``$CKPTFIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/ckptfit``, else ``~/.cache/ckptfit``), keyed by the library versions, and
grows incrementally: torchvision is indexed in full on first use (~10 s); timm's ~1,300
architectures are grouped by module and name stem, one representative per group is indexed
(~1 min on 2 cores, once), and a group is indexed in full only when a checkpoint resembles
it. :func:`build_index` indexes everything up front.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._fold import fold_keys
from .errors import CheckpointError
from .plan import TensorSpec

__all__ = ["identify", "Identification", "Candidate", "build_index", "cache_dir"]

SENTINEL = 1009  # num_classes used to build signatures: prime, no layer width is a multiple of it
_NBT = "num_batches_tracked"
_INDEX_VERSION = 2
_TOP_MATCHED = 10       # signatures compared in full after the prefilter
_KNOWN_SCORE = 0.995    # a candidate this good (and complete) is an identification, not a guess
_TIMM_MAX_GROUPS = 4    # timm groups indexed in full for one query

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

# Hugging Face families indexed by default (model_type in transformers' registry).
HF_FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra", "gpt2", "llama", "mistral", "qwen2",
               "t5", "bart", "vit", "opt", "gpt_neox")
# Sizes used to build tiny family signatures; each value found again in a checkpoint's shape
# at the same place is that size.
_HF_SENTINELS = {"hidden_size": 48, "intermediate_size": 76, "vocab_size": 97, "max_position_embeddings": 67,
                 "type_vocab_size": 3, "num_labels": 11}
_HF_BUILD = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0}
_HF_EXTRA = {  # configs whose sizes are not reachable through the standard names
    "t5": {"d_ff": 76, "d_kv": 12, "num_decoder_layers": 2},
    "gpt2": {"n_inner": 76},
    "bart": {"encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 76, "decoder_ffn_dim": 76,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4},
    "distilbert": {"hidden_dim": 76},
    "opt": {"ffn_dim": 76, "word_embed_proj_dim": 48},
    "albert": {"embedding_size": 48},
}
_HF_HEADS = ("MODEL_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
             "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
             "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
             "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
_LAYER_RE = re.compile(r"(?:^|\.)(encoder|decoder)?[^.]*?\.?(?:layers?|h|blocks?)\.(\d+)\.")


# ------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Candidate:
    """One architecture that may have produced the state dict.

    Attributes:
        architecture: ``"torchvision.models.resnet34"``, ``"timm.convnext_tiny"``,
            ``"transformers.BertForMaskedLM"``.
        kwargs: constructor arguments read from the shapes (``{"num_classes": 7}``); for
            transformers, the config values.
        score: 0..1; 1.0 means every model tensor is in the checkpoint with its shape and
            nothing in the checkpoint is left over.
        explained: one line saying why (or what differs).
        spec: a model SPEC for :func:`ckptfit.build` / ``--model`` (``"torchvision:resnet34"``),
            or None when the model cannot be named that way.
        differences: folded lines of what differs (missing, left over, other shapes).
        equivalent: other architectures with exactly the same signature.
    """

    architecture: str
    kwargs: Mapping[str, Any]
    score: float
    explained: str
    spec: str | None = None
    differences: tuple[str, ...] = ()
    equivalent: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "kwargs": dict(self.kwargs), "score": self.score,
                "explained": self.explained, "spec": self.spec, "differences": list(self.differences),
                "equivalent": list(self.equivalent)}


@dataclass(frozen=True)
class Identification:
    """The ranked answer of :func:`identify`.

    Attributes:
        path: the checkpoint identified.
        container: the state dict inside the file that was compared (``""`` = the root).
        num_tensors: tensors in that state dict.
        candidates: best first.
        known: whether the best candidate is clearly right (complete, and not a near tie with
            a different architecture); otherwise the answer is "unknown".
        searched: what was compared against (``"torchvision: 113 models"`` ...).
        notes: how the index was used (built now, cached, timm groups indexed ...).
        seconds: how long it took.
    """

    path: str | None
    container: str | None
    num_tensors: int
    candidates: tuple[Candidate, ...]
    known: bool
    searched: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float | None = None

    @property
    def best(self) -> Candidate | None:
        """The identified architecture, or None when unknown."""
        return self.candidates[0] if self.known and self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "container": self.container, "num_tensors": self.num_tensors,
                "known": self.known, "architecture": self.best.architecture if self.best else "unknown",
                "candidates": [c.to_dict() for c in self.candidates], "searched": list(self.searched),
                "notes": list(self.notes), "seconds": self.seconds}

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (container {self.container!r})" if self.container else "")
        lines = []
        if self.best:
            b = self.best
            kw = ", ".join(f"{k}={v!r}" for k, v in b.kwargs.items())
            lines.append(f"{where}: {b.architecture}({kw})  score {b.score:.3f}")
            lines.append(f"  {b.explained}")
            if b.equivalent:
                lines.append(f"  same signature: {', '.join(b.equivalent[:4])}"
                             + (f" and {len(b.equivalent) - 4} more" if len(b.equivalent) > 4 else ""))
            if b.spec:
                lines.append(f"  build it: ckptfit load {self.path} --model {b.spec}"
                             + "".join(f" --model-arg {k}={json.dumps(v)}" for k, v in b.kwargs.items()))
            rest = self.candidates[1:]
            title = "  next candidates:"
        elif self.candidates and all(c.score <= 0 for c in self.candidates):
            lines.append(f"{where}: unknown architecture ({self.num_tensors} tensors); no known architecture "
                         "shares a tensor name and shape with it")
            rest = ()
            title = None
        else:
            lines.append(f"{where}: unknown architecture ({self.num_tensors} tensors); nearest candidates:")
            rest = self.candidates
            title = None
        if title and rest:
            lines.append(title)
        for c in rest:
            kw = ", ".join(f"{k}={v!r}" for k, v in c.kwargs.items())
            lines.append(f"  {c.score:.3f}  {c.architecture}({kw}): {c.explained}")
            if not self.known:
                lines.extend(f"           {d}" for d in c.differences[:4])
        if not self.candidates:
            lines.append("  (nothing comparable was found)")
        if self.searched:
            lines.append("  searched: " + "; ".join(self.searched))
        from .report import printable

        return printable("\n".join(lines))


# ------------------------------------------------------------------------------------ the cache

def cache_dir() -> str:
    """Where the signature index lives: ``$CKPTFIT_CACHE_DIR``, ``$XDG_CACHE_HOME/ckptfit`` or ``~/.cache/ckptfit``."""
    base = os.environ.get("CKPTFIT_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "ckptfit")
    return base


def _version_of(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _index_dir() -> str:
    key = json.dumps([_INDEX_VERSION, torch.__version__, _version_of("torchvision"), _version_of("timm"),
                      _version_of("transformers")])
    return os.path.join(cache_dir(), "identify-" + hashlib.sha1(key.encode()).hexdigest()[:12])


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data: dict) -> None:
    from ._atomic import atomic_write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))


# ------------------------------------------------------------------------------------ building signatures

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _on_meta(make) -> torch.nn.Module:
    """Build with every tensor on meta; fall back to parameters-only on meta for builders that copy data."""
    try:
        with torch.device("meta"):
            return make()
    except (NotImplementedError, RuntimeError):
        from .loading.meta import parameters_on_meta

        with parameters_on_meta():
            return make()


def _signature_of(model: torch.nn.Module) -> tuple[list[str], list[list[int]], dict[str, str]]:
    """State-dict keys and shapes (``num_batches_tracked`` left out), and ``{tied_key: canonical_key}``."""
    keys, shapes = [], []
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor) and not k.endswith(_NBT):
            keys.append(k)
            shapes.append(list(v.shape))
            if id(v) in first:
                tied[k] = first[id(v)]
            else:
                first[id(v)] = k
    return keys, shapes, tied


def _tv_entries() -> list[dict]:
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
        with _quiet():
            if entry["registry"] == "torchvision":
                import torchvision.models as tvm

                builder = tvm.get_model_builder(entry["name"])
                kw = {"weights": None, **entry["build"], **entry["kwargs"]}
                try:
                    model = _on_meta(lambda: builder(num_classes=SENTINEL, **kw))
                    out["sentinel"] = True
                except (TypeError, ValueError):
                    model = _on_meta(lambda: builder(**kw))
                    out["sentinel"] = False
            elif entry["registry"] == "timm":
                import timm

                try:
                    model = _on_meta(lambda: timm.create_model(entry["name"], pretrained=False,
                                                               num_classes=SENTINEL))
                    out["sentinel"] = True
                except Exception:  # noqa: BLE001 - some models take no num_classes
                    model = _on_meta(lambda: timm.create_model(entry["name"], pretrained=False))
                    out["sentinel"] = False
            else:
                raise ValueError(f"unknown registry {entry['registry']!r}")
        out["keys"], out["shapes"], out["tied"] = _signature_of(model)
    except Exception as e:  # noqa: BLE001 - a builder that fails is recorded and skipped
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def _build_many(entries: list[dict], workers: int | None = None) -> list[dict]:
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


class _Store:
    """One JSON file of signatures, keyed by entry id, extended as entries are built."""

    def __init__(self, path: str):
        self.path = path
        self.data = _read_json(path)
        self.sigs: dict[str, dict] = self.data.setdefault("signatures", {})
        self.dirty = False

    def ensure(self, entries: list[dict], workers: int | None = None) -> int:
        todo = [e for e in entries if e["id"] not in self.sigs]
        if todo:
            for sig in _build_many(todo, workers):
                self.sigs[sig["id"]] = sig
            _write_json(self.path, self.data)
        return len(todo)


# ------------------------------------------------------------------------------------ timm groups

def _timm_entries() -> list[dict]:
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


def _patterns(keys: Iterable[str]) -> set[str]:
    return {re.sub(r"\d+", "#", k) for k in keys}


# ------------------------------------------------------------------------------------ comparing

def _strip_common(keys: Sequence[str]) -> list[str]:
    """Drop leading segments every key shares (``module.``, ``model.``), for the prefilter only."""
    keys = list(keys)
    while len(keys) > 1:
        heads = {k.split(".", 1)[0] for k in keys}
        if len(heads) != 1 or any("." not in k for k in keys):
            break
        keys = [k.split(".", 1)[1] for k in keys]
    return keys


class _Query:
    def __init__(self, specs: list[TensorSpec]):
        self.specs = specs
        self.keys = _strip_common([s.name for s in specs])
        self.keyset = set(self.keys)
        self.patterns = _patterns(self.keys)
        self.shapes = Counter(s.shape for s in specs)

    def prefilter(self, keys: Sequence[str], shapes: Sequence[Sequence[int]]) -> float:
        ks = set(_strip_common(keys))
        jac = len(ks & self.keyset) / max(len(ks | self.keyset), 1)
        cs = Counter(tuple(s) for s in shapes)
        shp = sum((cs & self.shapes).values()) / max(sum(cs.values()), sum(self.shapes.values()), 1)
        return 0.5 * jac + 0.5 * shp


def _resolve(shape: Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(d // SENTINEL * n if d and d % SENTINEL == 0 else d for d in shape)


def _score(sig: dict, query: _Query) -> Candidate:
    """Compare one signature with the checkpoint through the loader's matcher; infer num_classes."""
    from .matching import match

    keys, shapes = sig["keys"], sig["shapes"]
    default = sig.get("default_num_classes", 1000)
    sentinel = sig.get("sentinel", False)
    head = {k for k, s in zip(keys, shapes) if sentinel and any(d and d % SENTINEL == 0 for d in s)}
    kwargs: dict[str, Any] = dict(sig.get("kwargs") or {})
    notes: list[str] = []
    num_classes = default
    if head:
        first = match([TensorSpec(k, tuple(s), torch.float32) for k, s in zip(keys, shapes)], query.specs,
                      partial=True)
        seen: list[int] = []
        head_missing = 0
        for d in first.decisions:
            if d.target not in head:
                continue
            if d.action == "skip_shape" and d.source_shape is not None and len(d.source_shape) == len(d.target_shape):
                for t, s in zip(d.target_shape, d.source_shape):
                    if t and t % SENTINEL == 0 and s % (t // SENTINEL) == 0:
                        seen.append(s // (t // SENTINEL))
            elif d.action in ("missing", "keep"):
                head_missing += 1
        votes = Counter(seen)
        if votes:
            num_classes = votes.most_common(1)[0][0]
        elif head_missing == len(head) and sig.get("registry") == "timm":
            num_classes = 0
            notes.append("no classifier head (num_classes=0)")
        if num_classes != default:
            kwargs["num_classes"] = num_classes
        if num_classes != 0:
            shapes = [list(_resolve(s, num_classes)) for s in shapes]
        else:
            keys, shapes = zip(*[(k, s) for k, s in zip(keys, shapes) if k not in head]) if len(head) < len(keys) \
                else ((), ())
    targets = [TensorSpec(k, tuple(s), torch.float32) for k, s in zip(keys, shapes)]
    present = set(keys)
    tied = {k: c for k, c in (sig.get("tied") or {}).items() if k in present and c in present}
    p = match(targets, query.specs, partial=True, tied=tied)
    loaded = {d.target for d in p.decisions if d.action in ("load", "tied")}
    skipped = [d for d in p.decisions if d.action == "skip_shape"]
    explained_sources: set[str | None] = set()
    # in_chans: only the first conv / patch embedding differs, in its input channels
    if skipped and sig.get("registry") == "timm":
        first_w = next((t for t in targets if len(t.shape) >= 3), None)
        d = skipped[0]
        if (first_w is not None and d.target == first_w.name and d.source_shape is not None
                and len(d.source_shape) == len(d.target_shape)
                and all(a == b for i, (a, b) in enumerate(zip(d.source_shape, d.target_shape)) if i != 1)):
            kwargs["in_chans"] = d.source_shape[1]
            loaded.add(d.target)
            explained_sources = {d.source}
            skipped = skipped[1:]
    n_t = len(targets)
    n_s = len(query.specs)
    used = len({d.source for d in p.decisions if d.action == "load" and d.source}) + (
        1 if "in_chans" in kwargs else 0) + sum(1 for u in p.unused if "ties" in u.reason)
    recall = len(loaded) / n_t if n_t else 0.0
    precision = used / n_s if n_s else 0.0
    score = round(2 * recall * precision / (recall + precision), 4) if recall + precision else 0.0
    missing = [d.target for d in p.decisions if d.action in ("missing", "keep") and d.target not in loaded]
    unused = [u.source for u in p.unused if "ties" not in u.reason and u.source not in explained_sources]
    diffs: list[str] = []
    if missing:
        diffs.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(fold_keys(missing)[:4]))
    if unused:
        diffs.append(f"not in the model ({len(unused)}): " + ", ".join(fold_keys(unused)[:4]))
    for d in skipped[:3]:
        diffs.append(f"shape differs: {d.target} model {list(d.target_shape)}, checkpoint {list(d.source_shape or ())}")
    if len(skipped) > 3:
        diffs.append(f"... and {len(skipped) - 3} more tensors of another shape")
    if not missing and not unused and not skipped:
        how = f"all {n_t} tensors match by name and shape"
        if p.transforms:
            how += " after " + "; ".join(p.transforms)
        if "num_classes" in kwargs:
            how += f"; num_classes={kwargs['num_classes']} read from the classifier shape"
        if "in_chans" in kwargs:
            how += f"; in_chans={kwargs['in_chans']} read from the first layer"
        explained = "; ".join([how, *notes])
    else:
        bits = [f"{len(loaded)}/{n_t} model tensors match"]
        if missing:
            bits.append(f"{len(missing)} missing from the checkpoint")
        if unused:
            bits.append(f"{len(unused)} checkpoint tensors not in the model")
        if skipped:
            bits.append(f"{len(skipped)} of another shape")
        explained = ", ".join(bits)
    return Candidate(sig["arch"], kwargs, score, explained, sig.get("spec"), tuple(diffs))


# ------------------------------------------------------------------------------------ Hugging Face

def _hf_config(model_type: str, values: Mapping[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **dict(values))


def _hf_entries(model_type: str) -> list[tuple[str, str]]:
    """``[(head_mapping, class_name)]`` for a family, base model first."""
    import transformers.models.auto.modeling_auto as ma

    out: list[tuple[str, str]] = []
    for mapping in _HF_HEADS:
        cls = getattr(ma, mapping, {}).get(model_type)
        if isinstance(cls, tuple | list):
            cls = cls[0]
        if isinstance(cls, str) and cls not in [c for _, c in out]:
            out.append((mapping, cls))
    return out


def _build_hf_family(model_type: str) -> dict:
    """Tiny sentinel-sized signatures of every head class of one transformers family."""
    import transformers

    values = {**_HF_SENTINELS, **_HF_BUILD, **_HF_EXTRA.get(model_type, {})}
    fam: dict[str, Any] = {"model_type": model_type, "classes": {}}
    with _quiet():
        try:
            config = _hf_config(model_type, values)
        except Exception as e:  # noqa: BLE001
            fam["error"] = f"{type(e).__name__}: {e}"
            return fam
        for _mapping, cls_name in _hf_entries(model_type):
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                continue
            try:
                model = _on_meta(lambda: cls(config))
            except Exception:  # noqa: BLE001
                continue
            keys, shapes, tied = _signature_of(model)
            fam["classes"][cls_name] = {"keys": keys, "shapes": shapes, "tied": tied}
    return fam


def _hf_read_sizes(tiny: dict, query: _Query) -> dict[str, int]:
    """Sizes read from the checkpoint at the places the tiny model has its sentinels."""
    from .matching import match

    keys, shapes = tiny["keys"], tiny["shapes"]
    p = match([TensorSpec(k, tuple(s), torch.float32) for k, s in zip(keys, shapes)], query.specs, partial=True)
    q_shape = {s.name: s.shape for s in query.specs}
    votes: dict[str, Counter] = {k: Counter() for k in _HF_SENTINELS}
    by_value = {v: (k, 0) for k, v in _HF_SENTINELS.items()}
    pos = _HF_SENTINELS["max_position_embeddings"]
    by_value.update({pos + 1: ("max_position_embeddings", 1), pos + 2: ("max_position_embeddings", 2)})  # OPT: +2
    for d in p.decisions:
        if d.source is None or d.source not in q_shape:
            continue
        src = q_shape[d.source]
        if len(src) != len(d.target_shape):
            continue
        for t, s in zip(d.target_shape, src):
            if t in by_value:
                name, offset = by_value[t]
                votes[name][s - offset] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items() if c}


def _hf_layers(names: Iterable[str]) -> dict[str, int]:
    enc: set[int] = set()
    dec: set[int] = set()
    for n in names:
        m = _LAYER_RE.search(n)
        if m:
            (dec if m.group(1) == "decoder" else enc).add(int(m.group(2)))
    out = {}
    if enc:
        out["num_hidden_layers"] = max(enc) + 1
    if dec:
        out["num_decoder_layers"] = max(dec) + 1
        out.setdefault("num_hidden_layers", max(dec) + 1)  # decoder-only models (OPT: model.decoder.layers)
    return out


def _hf_candidates(query: _Query, families: Sequence[str], store: _Store, recorded: Mapping[str, Any] | None,
                   notes: list[str], sigs: dict[str, dict]) -> list[Candidate]:
    fams = store.data.setdefault("families", {})
    built = [f for f in families if f not in fams]
    for f in built:
        fams[f] = _build_hf_family(f)
    if built:
        _write_json(store.path, store.data)
        notes.append(f"indexed {len(built)} transformers families")
    # family and head class by key patterns (prefix-free)
    ranked = []
    for f in families:
        for cls_name, sig in (fams.get(f) or {}).get("classes", {}).items():
            pats = _patterns(_strip_common(sig["keys"]))
            inter = len(pats & query.patterns)
            if not inter:
                continue
            ranked.append((inter / len(pats | query.patterns), inter / len(pats), f, cls_name, sig))
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    out: list[Candidate] = []
    rec_type = recorded.get("model_type") if recorded else None
    for jac, cover, f, cls_name, tiny in ranked[:3]:
        if cover < 0.6 and f != rec_type:
            continue
        sizes = _hf_read_sizes(tiny, query)
        sizes.update(_hf_layers(s.name for s in query.specs))
        kv_dim = None
        values: dict[str, Any] = dict(sizes)
        for name, v in _HF_EXTRA.get(f, {}).items():  # the family's own names for the same sizes
            for std in ("intermediate_size", "hidden_size"):
                if v == _HF_SENTINELS[std] and std in sizes:
                    values[name] = sizes[std]
        how = "read from the shapes"
        if recorded and recorded.get("model_type") == f:
            for k in ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "head_dim"):
                if k in recorded:
                    values[k] = recorded[k]
            how = "read from the shapes; heads from config.json"
        elif "hidden_size" in sizes:
            heads = sizes["hidden_size"] // 64 if sizes["hidden_size"] % 64 == 0 else 1
            values["num_attention_heads"] = max(heads, 1)
            how = "read from the shapes; heads assumed (head_dim 64: heads are not visible in shapes)"
        if f in ("llama", "mistral", "qwen2"):
            kv = next((s.shape[0] for s in query.specs if s.name.endswith("self_attn.k_proj.weight")), None)
            heads = values.get("num_attention_heads")
            if kv and heads and sizes.get("hidden_size"):
                kv_dim = kv
                values["num_key_value_heads"] = max(kv_dim // (sizes["hidden_size"] // heads), 1)
        cand = _hf_verify(f, cls_name, values, query, how, sigs)
        if cand is not None:
            out.append(cand)
    return out


def _hf_verify(model_type: str, cls_name: str, values: dict, query: _Query, how: str,
               sigs: dict[str, dict]) -> Candidate | None:
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None
    try:
        with _quiet():
            config = _hf_config(model_type, values)
            model = _on_meta(lambda: cls(config))
    except Exception:  # noqa: BLE001 - inferred sizes the family rejects
        return None
    keys, shapes, tied = _signature_of(model)
    sig = {"arch": f"transformers.{cls_name}", "keys": keys, "shapes": shapes, "tied": tied, "kwargs": {},
           "spec": None, "registry": "transformers"}
    sigs[sig["arch"]] = sig
    c = _score(sig, query)
    kw = {"model_type": model_type, **values}  # every value the config needs to rebuild it
    explained = c.explained + f"; sizes {how}" if c.score >= _KNOWN_SCORE else c.explained
    return Candidate(c.architecture, kw, c.score, explained, None, c.differences)


def _looks_hf(query: _Query) -> bool:
    marks = ("embeddings.word_embeddings", "embed_tokens", ".wte.", "wte.weight", "self_attn.q_proj", "attention.self",
             "encoder.block.", "embed_in", "shared.weight", "lm_head", "attn.c_attn", "embeddings.patch_embeddings")
    return any(m in k for k in query.keys[:200] for m in marks)


# ------------------------------------------------------------------------------------ identify

def _families(families: Sequence[str] | str | None) -> list[str] | None:
    if families is None:
        families = os.environ.get("CKPTFIT_IDENTIFY_FAMILIES") or None
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    return list(families) if families else None


def _allowed(arch: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(arch, p) for p in patterns)


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _query_of(source: Any, use: str | None, trust: bool) -> tuple[_Query, str | None, str | None, dict | None]:
    from .loading.planning import as_checkpoint

    ckpt, opened = as_checkpoint(source, trust)
    try:
        cand = ckpt.state_dict(use)
        specs = [TensorSpec(k, t.shape, t.dtype) for k, t in cand.tensors.items() if not k.endswith(_NBT)]
        config = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
        return _Query(specs), ckpt.path, cand.name, _recorded_config(config)
    finally:
        if opened:
            ckpt.close()


_HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "head_dim")


def _recorded_config(config: Any) -> dict | None:
    """The parts of a folder's config.json identify uses, only where they have the expected types
    (the file is not trusted: ``architectures: 1`` or a list as ``model_type`` are ignored)."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) \
            or not config["model_type"].isidentifier():
        return None
    out = {k: v for k, v in config.items() if k not in _HEAD_KEYS and k != "architectures"}
    archs = config.get("architectures")
    if isinstance(archs, list):
        out["architectures"] = [a for a in archs if isinstance(a, str)]
    out.update({k: config[k] for k in _HEAD_KEYS if type(config.get(k)) is int and 0 < config[k] <= 1 << 16})
    return out


def identify(source: Any, *, top: int = 5, use: str | None = None, families: Sequence[str] | str | None = None,
             trust: bool = False) -> Identification:
    """Rank the known architectures (and constructor arguments) that could have produced a checkpoint.

    From names and shapes alone: no tensor data is read. Says "unknown" (``known=False``) with
    the nearest candidates and what differs when nothing fits completely.

    Args:
        source: a path, an opened :class:`~ckptfit.Checkpoint`, or a state dict.
        top: how many candidates to return.
        use: which state dict in the file (as for :func:`ckptfit.load`).
        families: glob patterns over architecture names restricting the search
            (``"torchvision.models.resnet*"``, ``"timm.convnext*"``, ``"transformers.bert"``);
            default: ``$CKPTFIT_IDENTIFY_FAMILIES``, else everything installed.
        trust: allow real unpickling while opening (never needed for weights).

    Returns:
        An :class:`Identification`; ``print()`` it, or ``.to_dict()`` for JSON.

    Example:
        >>> result = ckptfit.identify("resnet_final.pth")          # doctest: +SKIP
        >>> result.best.architecture, result.best.kwargs            # doctest: +SKIP
        ('torchvision.models.resnet34', {'num_classes': 7})
    """
    start = time.perf_counter()
    query, path, container, recorded = _query_of(source, use, trust)
    if not query.specs:
        raise CheckpointError("the state dict holds no tensors to identify", path=path)
    patterns = _families(families)
    root = _index_dir()
    notes: list[str] = []
    searched: list[str] = []
    sigs: list[dict] = []

    if _have("torchvision"):
        store = _Store(os.path.join(root, "torchvision.json"))
        entries = [e for e in _cached_entries(root, "torchvision", _tv_entries) if _allowed(e["arch"], patterns)]
        t0 = time.perf_counter()
        n = store.ensure(entries)
        if n:
            notes.append(f"indexed {n} torchvision models in {time.perf_counter() - t0:.1f} s")
        sigs.extend(store.sigs[e["id"]] for e in entries)
        searched.append(f"torchvision: {len(entries)} models")

    if _have("timm"):
        sigs.extend(_timm_signatures(query, patterns, root, notes, searched))

    hf_types = [f for f in HF_FAMILIES if _allowed(f"transformers.{f}", patterns)]
    rec_type = recorded.get("model_type") if recorded else None
    if rec_type and rec_type not in hf_types and _allowed(f"transformers.{rec_type}", patterns):
        hf_types.append(rec_type)
    candidates: list[Candidate] = []
    hf_sigs: dict[str, dict] = {}
    if hf_types and _have("transformers") and (recorded or _looks_hf(query)):
        store = _Store(os.path.join(root, "transformers.json"))
        candidates.extend(_hf_candidates(query, hf_types, store, recorded, notes, hf_sigs))
        searched.append(f"transformers: {len(hf_types)} families")

    sigs = [s for s in sigs if "keys" in s and s["keys"]]
    ranked = sorted(sigs, key=lambda s: query.prefilter(s["keys"], s["shapes"]), reverse=True)[:_TOP_MATCHED]
    candidates.extend(_score(s, query) for s in ranked)
    recorded_arch = {f"transformers.{a}" for a in (recorded or {}).get("architectures") or [] if isinstance(a, str)}
    candidates.sort(key=lambda c: (-c.score, c.architecture not in recorded_arch, _registry_rank(c.architecture),
                                   len(c.kwargs), c.architecture))
    candidates = _merge_equivalent(candidates, {**{s["arch"]: s for s in sigs}, **hf_sigs})
    candidates = [c for c in candidates if c.score > 0] or candidates[:3]
    # known: every model tensor found with its shape; a few leftover checkpoint tensors (a loss
    # module's buffer) are tolerated only while the score stays above the bar
    known = bool(candidates) and candidates[0].score >= _KNOWN_SCORE and not any(
        d.startswith(("missing", "shape differs", "...")) for d in candidates[0].differences)
    if known and len(candidates) > 1 and candidates[1].score >= candidates[0].score - 1e-9 \
            and candidates[1].kwargs != candidates[0].kwargs and not candidates[1].differences:
        # two different architectures fit equally: as good as identical for loading, but say so
        notes.append(f"{candidates[1].architecture} fits equally well")
    return Identification(path, container, len(query.specs), tuple(candidates[:max(top, 1)]), known,
                          tuple(searched), tuple(notes), round(time.perf_counter() - start, 3))


def _registry_rank(arch: str) -> int:
    return 0 if arch.startswith("torchvision.") else 1 if arch.startswith("timm.") else 2


def _merge_equivalent(cands: list[Candidate], sigs: Mapping[str, dict]) -> list[Candidate]:
    """Fold candidates whose signatures (and inferred kwargs) are identical into one, naming the others."""
    groups: dict[tuple, list[Candidate]] = {}
    order = []
    for c in cands:
        s = sigs.get(c.architecture)
        key = (c.score, tuple(sorted((k, str(v)) for k, v in c.kwargs.items() if k != "aux_logits")),
               tuple(s["keys"]) if s else c.architecture, str(s["shapes"]) if s else "")
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(c)
    out = []
    for key in order:
        g = groups[key]  # already ranked: the first is the preferred one
        first = g[0]
        out.append(Candidate(first.architecture, first.kwargs, first.score, first.explained, first.spec,
                             first.differences, tuple(c.architecture for c in g[1:])))
    return out


def _cached_entries(root: str, name: str, make) -> list[dict]:
    """A registry's entry list, cached beside the index so a cached answer never imports the registry."""
    path = os.path.join(root, f"entries-{name}.json")
    data = _read_json(path)
    if isinstance(data.get("entries"), list):
        return data["entries"]
    entries = make()
    _write_json(path, {"entries": entries})
    return entries


def _group_store(root: str, group: str) -> _Store:
    return _Store(os.path.join(root, "timm", re.sub(r"[^A-Za-z0-9_.-]", "_", group) + ".json"))


def _timm_signatures(query: _Query, patterns: list[str] | None, root: str, notes: list[str],
                     searched: list[str]) -> list[dict]:
    """timm signatures worth comparing: groups resembling the checkpoint, indexed in full on demand."""
    entries = [e for e in _cached_entries(root, "timm", _timm_entries) if _allowed(e["arch"], patterns)]
    if not entries:
        return []
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    # one representative per group: its key patterns are all the prefilter needs
    reps_path = os.path.join(root, "timm-groups.json")
    reps = _read_json(reps_path)
    known: dict[str, list[str]] = reps.setdefault("patterns", {})
    todo = {g: members for g, members in groups.items() if g not in known}
    if todo:
        t0 = time.perf_counter()
        built = _build_many([members[0] for members in todo.values()])
        for sig in built:
            known[sig["group"]] = sorted(_patterns(_strip_common(sig.get("keys") or [])))
            store = _group_store(root, sig["group"])
            store.sigs[sig["id"]] = sig
            _write_json(store.path, store.data)
        _write_json(reps_path, reps)
        notes.append(f"indexed {len(todo)} timm group representatives in {time.perf_counter() - t0:.1f} s")
    scored = []
    for g in groups:
        pats = set(known.get(g) or ())
        if pats:
            scored.append((len(pats & query.patterns) / max(len(pats | query.patterns), 1), g))
    scored.sort(reverse=True)
    if not scored or scored[0][0] == 0:
        searched.append(f"timm: {len(entries)} models in {len(groups)} groups, none alike")
        return []
    best = scored[0][0]
    chosen = [g for j, g in scored[:_TIMM_MAX_GROUPS] if j >= max(0.3, best - 0.2)] or [scored[0][1]]
    out: list[dict] = []
    t0 = time.perf_counter()
    n = 0
    for g in chosen:
        store = _group_store(root, g)
        n += store.ensure(groups[g])
        out.extend(store.sigs[m["id"]] for m in groups[g])
    if n:
        notes.append(f"indexed {n} timm models ({', '.join(chosen)}) in {time.perf_counter() - t0:.1f} s")
    searched.append(f"timm: {len(entries)} models in {len(groups)} groups; compared {', '.join(chosen)} in full")
    return out


def build_index(*, families: Sequence[str] | str | None = None, workers: int | None = None) -> dict[str, int]:
    """Index every torchvision and timm architecture (and the transformers families) now.

    :func:`identify` indexes lazily; this does it all up front (several minutes for timm's full
    registry). Returns how many signatures each registry has.

    Example:
        >>> ckptfit.identify.build_index(families="torchvision.*")   # doctest: +SKIP
        {'torchvision': 113}
    """
    patterns = _families(families)
    root = _index_dir()
    counts: dict[str, int] = {}
    if _have("torchvision"):
        store = _Store(os.path.join(root, "torchvision.json"))
        entries = [e for e in _cached_entries(root, "torchvision", _tv_entries) if _allowed(e["arch"], patterns)]
        store.ensure(entries, workers)
        counts["torchvision"] = len(entries)
    if _have("timm"):
        entries = [e for e in _cached_entries(root, "timm", _timm_entries) if _allowed(e["arch"], patterns)]
        groups: dict[str, list[dict]] = {}
        for e in entries:
            groups.setdefault(e["group"], []).append(e)
        reps_path = os.path.join(root, "timm-groups.json")
        reps = _read_json(reps_path)
        known = reps.setdefault("patterns", {})
        stores = {g: _group_store(root, g) for g in groups}
        todo = [e for g, members in groups.items() for e in members if e["id"] not in stores[g].sigs]
        built = {s["id"]: s for s in _build_many(todo, workers)}
        for g, members in groups.items():
            store = stores[g]
            store.sigs.update({m["id"]: built[m["id"]] for m in members if m["id"] in built})
            _write_json(store.path, store.data)
            if g not in known and members[0]["id"] in store.sigs:
                known[g] = sorted(_patterns(_strip_common(store.sigs[members[0]["id"]].get("keys") or [])))
        _write_json(reps_path, reps)
        counts["timm"] = len(entries)
    if _have("transformers"):
        store = _Store(os.path.join(root, "transformers.json"))
        fams = store.data.setdefault("families", {})
        types = [f for f in HF_FAMILIES if _allowed(f"transformers.{f}", patterns)]
        for f in types:
            if f not in fams:
                fams[f] = _build_hf_family(f)
        _write_json(store.path, store.data)
        counts["transformers"] = len(types)
    return counts
