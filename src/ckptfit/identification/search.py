"""The verb :func:`identify` (and :func:`build_index`): which registries to search, the timm
groups worth indexing in full, the candidates ranked."""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..checkpoint import as_checkpoint
from ..errors import CheckpointError
from ..plans import TensorSpec
from .cache import cached_entries, index_dir, read_json, write_json
from .hf import HF_FAMILIES, build_hf_family, hf_candidates, looks_hf
from .results import Candidate, Identification
from .scoring import KNOWN_SCORE, Query, merge_equivalent, registry_rank, score_signature, strip_common
from .signatures import NBT, Store, build_many, key_patterns, timm_entries, tv_entries

if TYPE_CHECKING:
    from ..loading.planning import Source

__all__ = ["identify", "build_index"]

_TOP_MATCHED = 10       # signatures compared in full after the prefilter
_TIMM_MAX_GROUPS = 4    # timm groups indexed in full for one query


def _families(families: Sequence[str] | str | None) -> list[str] | None:
    if families is None:
        families = os.environ.get("CKPTFIT_IDENTIFY_FAMILIES") or None
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    return list(families) if families else None


def _allowed(arch: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(arch, p) for p in patterns)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _query_of(source: Source, use: str | None, trust: bool) -> tuple[Query, str | None, str | None, dict | None]:
    ckpt, opened = as_checkpoint(source, trust)  # a file opens without importing torch (a cached answer needs none)
    try:
        cand = ckpt.state_dict(use)
        specs = [TensorSpec(k, t.shape, t.dtype_name) for k, t in cand.tensors.items() if not k.endswith(NBT)]
        config = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
        return Query(specs), ckpt.path, cand.name, _recorded_config(config)
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


def identify(source: Source, *, top: int = 5, use: str | None = None, families: Sequence[str] | str | None = None,
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
    root = index_dir()
    notes: list[str] = []
    searched: list[str] = []
    sigs: list[dict] = []

    if _have("torchvision"):
        store = Store(os.path.join(root, "torchvision.json"))
        entries = [e for e in cached_entries(root, "torchvision", tv_entries) if _allowed(e["arch"], patterns)]
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
    if hf_types and _have("transformers") and (recorded or looks_hf(query)):
        store = Store(os.path.join(root, "transformers.json"))
        candidates.extend(hf_candidates(query, hf_types, store, recorded, notes, hf_sigs))
        searched.append(f"transformers: {len(hf_types)} families")

    sigs = [s for s in sigs if "keys" in s and s["keys"]]
    ranked = sorted(sigs, key=lambda s: query.prefilter(s["keys"], s["shapes"]), reverse=True)[:_TOP_MATCHED]
    candidates.extend(score_signature(s, query) for s in ranked)
    recorded_arch = {f"transformers.{a}" for a in (recorded or {}).get("architectures") or [] if isinstance(a, str)}
    candidates.sort(key=lambda c: (-c.score, c.architecture not in recorded_arch, registry_rank(c.architecture),
                                   len(c.kwargs), c.architecture))
    candidates = merge_equivalent(candidates, {**{s["arch"]: s for s in sigs}, **hf_sigs})
    candidates = [c for c in candidates if c.score > 0] or candidates[:3]
    # known: every model tensor found with its shape; a few leftover checkpoint tensors (a loss
    # module's buffer) are tolerated only while the score stays above the bar
    known = bool(candidates) and candidates[0].score >= KNOWN_SCORE and not any(
        d.startswith(("missing", "shape differs", "...")) for d in candidates[0].differences)
    if known and len(candidates) > 1 and candidates[1].score >= candidates[0].score - 1e-9 \
            and candidates[1].kwargs != candidates[0].kwargs and not candidates[1].differences:
        # two different architectures fit equally: as good as identical for loading, but say so
        notes.append(f"{candidates[1].architecture} fits equally well")
    return Identification(path, container, len(query.specs), tuple(candidates[:max(top, 1)]), known,
                          tuple(searched), tuple(notes), round(time.perf_counter() - start, 3))


def _group_store(root: str, group: str) -> Store:
    return Store(os.path.join(root, "timm", re.sub(r"[^A-Za-z0-9_.-]", "_", group) + ".json"))


def _timm_groups(root: str, patterns: list[str] | None) -> tuple[list[dict], dict[str, list[dict]], str, dict]:
    """timm's entries allowed by ``patterns``, grouped by module and name stem; the path of the
    group representatives' key patterns and what it holds (``{"patterns": {group: [...]}}``)."""
    entries = [e for e in cached_entries(root, "timm", timm_entries) if _allowed(e["arch"], patterns)]
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    reps_path = os.path.join(root, "timm-groups.json")
    reps = read_json(reps_path)
    reps.setdefault("patterns", {})
    return entries, groups, reps_path, reps


def _timm_signatures(query: Query, patterns: list[str] | None, root: str, notes: list[str],
                     searched: list[str]) -> list[dict]:
    """timm signatures worth comparing: groups resembling the checkpoint, indexed in full on demand."""
    entries, groups, reps_path, reps = _timm_groups(root, patterns)
    if not entries:
        return []
    # one representative per group: its key patterns are all the prefilter needs
    known: dict[str, list[str]] = reps["patterns"]
    todo = {g: members for g, members in groups.items() if g not in known}
    if todo:
        t0 = time.perf_counter()
        built = build_many([members[0] for members in todo.values()])
        for sig in built:
            known[sig["group"]] = sorted(key_patterns(strip_common(sig.get("keys") or [])))
            store = _group_store(root, sig["group"])
            store.sigs[sig["id"]] = sig
            write_json(store.path, store.data)
        write_json(reps_path, reps)
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
        >>> ckptfit.identification.build_index(families="torchvision.*")   # doctest: +SKIP
        {'torchvision': 113}
    """
    patterns = _families(families)
    root = index_dir()
    counts: dict[str, int] = {}
    if _have("torchvision"):
        store = Store(os.path.join(root, "torchvision.json"))
        entries = [e for e in cached_entries(root, "torchvision", tv_entries) if _allowed(e["arch"], patterns)]
        store.ensure(entries, workers)
        counts["torchvision"] = len(entries)
    if _have("timm"):
        entries, groups, reps_path, reps = _timm_groups(root, patterns)
        known = reps["patterns"]
        stores = {g: _group_store(root, g) for g in groups}
        todo = [e for g, members in groups.items() for e in members if e["id"] not in stores[g].sigs]
        built = {s["id"]: s for s in build_many(todo, workers)}
        for g, members in groups.items():
            store = stores[g]
            store.sigs.update({m["id"]: built[m["id"]] for m in members if m["id"] in built})
            write_json(store.path, store.data)
            if g not in known and members[0]["id"] in store.sigs:
                known[g] = sorted(key_patterns(strip_common(store.sigs[members[0]["id"]].get("keys") or [])))
        write_json(reps_path, reps)
        counts["timm"] = len(entries)
    if _have("transformers"):
        store = Store(os.path.join(root, "transformers.json"))
        fams = store.data.setdefault("families", {})
        types = [f for f in HF_FAMILIES if _allowed(f"transformers.{f}", patterns)]
        for f in types:
            if f not in fams:
                fams[f] = build_hf_family(f)
        write_json(store.path, store.data)
        counts["transformers"] = len(types)
    return counts
