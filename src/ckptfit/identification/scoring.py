"""Comparing one signature with the checkpoint through the loader's matcher
(:func:`ckptfit.matching.match`): a score, the constructor arguments read from the shapes
(``num_classes``, ``in_chans``) and what differs; ranking and folding equal candidates."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


from ..keyfolding import fold_keys
from ..matching import match
from ..plans import TensorSpec
from .results import Candidate
from .signatures import SENTINEL, key_patterns

__all__ = ["KNOWN_SCORE", "Query", "merge_equivalent", "registry_rank", "score_signature", "strip_common"]

KNOWN_SCORE = 0.995    # a candidate this good (and complete) is an identification, not a guess


def strip_common(keys: Sequence[str]) -> list[str]:
    """Drop leading segments every key shares (``module.``, ``model.``), for the prefilter only."""
    keys = list(keys)
    while len(keys) > 1:
        heads = {k.split(".", 1)[0] for k in keys}
        if len(heads) != 1 or any("." not in k for k in keys):
            break
        keys = [k.split(".", 1)[1] for k in keys]
    return keys


class Query:
    def __init__(self, specs: list[TensorSpec]):
        self.specs = specs
        self.keys = strip_common([s.name for s in specs])
        self.keyset = set(self.keys)
        self.patterns = key_patterns(self.keys)
        self.shapes = Counter(s.shape for s in specs)

    def prefilter(self, keys: Sequence[str], shapes: Sequence[Sequence[int]]) -> float:
        ks = set(strip_common(keys))
        jac = len(ks & self.keyset) / max(len(ks | self.keyset), 1)
        cs = Counter(tuple(s) for s in shapes)
        shp = sum((cs & self.shapes).values()) / max(sum(cs.values()), sum(self.shapes.values()), 1)
        return 0.5 * jac + 0.5 * shp


def _resolve(shape: Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(d // SENTINEL * n if d and d % SENTINEL == 0 else d for d in shape)


def score_signature(sig: dict, query: Query) -> Candidate:
    """Compare one signature with the checkpoint through the loader's matcher; infer num_classes."""
    keys, shapes = sig["keys"], sig["shapes"]
    default = sig.get("default_num_classes", 1000)
    sentinel = sig.get("sentinel", False)
    head = {k for k, s in zip(keys, shapes) if sentinel and any(d and d % SENTINEL == 0 for d in s)}
    kwargs: dict[str, Any] = dict(sig.get("kwargs") or {})
    notes: list[str] = []
    num_classes = default
    if head:
        first = match([TensorSpec(k, tuple(s), "float32") for k, s in zip(keys, shapes)], query.specs,
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
    targets = [TensorSpec(k, tuple(s), "float32") for k, s in zip(keys, shapes)]
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


def registry_rank(arch: str) -> int:
    return 0 if arch.startswith("torchvision.") else 1 if arch.startswith("timm.") else 2


def merge_equivalent(cands: list[Candidate], sigs: Mapping[str, dict]) -> list[Candidate]:
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
