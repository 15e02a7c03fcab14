"""The state dicts inside a file: finding every candidate set of model weights, and the one chooser.

:func:`find_candidates` walks a checkpoint's tree (mappings of tensors, pickled ``nn.Module``
objects, a model saved as nested dicts); :func:`mark_candidates` marks the default and says
when two complete state dicts are equally plausible; :func:`choose_candidate` is the one choice
behind ``load``, ``plan``, ``convert`` and :meth:`~ckptfit.checkpoint.Checkpoint.state_dict`
(by ``use=``, else the default, else the one that fits a model clearly better).
"""
from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import CheckpointError, ResourceLimitExceeded
from .lazy import LazyTensor
from .matching.names import EMA_WORDS
from .safety import Placeholder

__all__ = ["StateDictCandidate", "Choice", "CandidateKind", "META_KEYS", "candidate_kind", "is_optimizer_state",
           "module_state", "find_candidates", "mark_candidates", "choose_candidate", "select_candidate"]

CandidateKind = Literal["model", "ema", "optimizer", "module", "other"]

# Preferred names for the model's own weights, best first.
_MODEL_NAMES = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights",
                "model_weights", "params_ema_free", "generator", "student", "backbone")
_OPT_WORDS = ("optim", "opt_state", "optimizer")
META_KEYS = {"_metadata"}
# Names that say "the model's own weights" and nothing more; two complete state dicts under such
# names, or two under role names ("student", "teacher"), are equally plausible.
_GENERIC_NAMES = frozenset(("state_dict", "model_state_dict", "model", "module", "net", "network", "params",
                            "weights", "model_weights"))


@dataclass(frozen=True, eq=False)
class StateDictCandidate:
    """One set of model weights found inside a checkpoint.

    Attributes:
        name: its key path in the file (``"state_dict"``, ``"model.ema"``; ``""`` = the root).
        tensors: ``{key: LazyTensor}`` in file order.
        kind: ``model`` (the model's own weights), ``ema``, ``module`` (a whole pickled
            ``nn.Module``'s parameters and buffers), ``optimizer`` or ``other``.
        default: whether ckptfit uses it when nothing else is asked.
        reason: why it is (or is not) the default.
    """

    name: str
    tensors: dict[str, LazyTensor]
    kind: CandidateKind
    default: bool = False
    reason: str = ""

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else "the file's top level"


def candidate_kind(name: str) -> CandidateKind:
    """``ema`` or ``optimizer`` when any segment of the key path says so (``model_ema.module``), else ``model``."""
    parts = [p.lower() for p in name.split(".")]
    if any(w in p for p in parts for w in EMA_WORDS):
        return "ema"
    if any(w in p for p in parts for w in _OPT_WORDS):
        return "optimizer"
    return "model"


def is_optimizer_state(obj: dict) -> bool:
    """``Optimizer.state_dict()``: ``{"state": {...}, "param_groups": [...]}``; its tensors are not weights."""
    # (a DCP directory flattens param_groups into a dict of its indices, hence any type)
    return "state" in obj and isinstance(obj.get("param_groups"), list | dict)


# Entries one pickled module tree may expand to when submodules are shared (a malicious file could
# share one submodule along a long chain and ask for an exponential walk).
_MAX_MODULE_ENTRIES = 200_000


def module_state(obj: Placeholder) -> dict[str, LazyTensor] | None:
    """Parameters and persistent buffers of a pickled ``nn.Module`` (a placeholder), or None.

    Like ``nn.Module.state_dict``, a submodule registered under two names (``self.b = self.a``)
    contributes its tensors under both; a module that contains itself is walked once.
    """
    attrs = obj.attributes()
    if not isinstance(attrs.get("_modules"), dict) or not isinstance(attrs.get("_parameters"), dict):
        return None
    out: dict[str, LazyTensor] = collections.OrderedDict()
    # depth-first in registration order, like nn.Module.state_dict (iterative); each entry carries the
    # ids of its ancestors so that a cycle ends the walk without dropping shared submodules
    stack: list[tuple[str, Placeholder, frozenset[int]]] = [("", obj, frozenset())]
    visited = 0
    while stack:
        prefix, mod, ancestors = stack.pop()
        if id(mod) in ancestors:
            continue
        visited += 1
        if visited > _MAX_MODULE_ENTRIES:
            raise ResourceLimitExceeded(f"the pickled module tree expands to more than {_MAX_MODULE_ENTRIES} "
                                        f"submodules (shared submodules nested without end)",
                                        hint="no real model is this deep; the file is damaged or hostile")
        a = mod.attributes()
        params, buffers, modules = (a.get(k) for k in ("_parameters", "_buffers", "_modules"))
        for name, p in (params.items() if isinstance(params, dict) else ()):
            if isinstance(p, LazyTensor):
                out[prefix + str(name)] = p
        nonpersistent = a.get("_non_persistent_buffers_set")
        skip = {n for n in nonpersistent if isinstance(n, str)} if isinstance(nonpersistent, set | frozenset | list) \
            else set()
        for name, b in (buffers.items() if isinstance(buffers, dict) else ()):
            if isinstance(b, LazyTensor) and name not in skip:
                out[prefix + str(name)] = b
        inner = ancestors | {id(mod)}
        children = [(prefix + str(n) + ".", m, inner) for n, m in (modules.items() if isinstance(modules, dict) else ())
                    if isinstance(m, Placeholder)]
        stack.extend(reversed(children))
    return out


@dataclass(frozen=True)
class Choice:
    """The state dict chosen inside a file, and why.

    Attributes:
        candidate: the chosen one (for ``use=`` naming a key prefix inside a state dict, a
            candidate of just those tensors, the prefix taken off).
        reason: why, in words, for the report.
        ambiguous: when non-empty, the equally plausible candidates (``candidate`` among them):
            nothing should be loaded until ``use=`` names one.
    """

    candidate: StateDictCandidate
    reason: str
    ambiguous: tuple[StateDictCandidate, ...] = ()

    @property
    def ambiguity(self) -> str:
        """The refusal, in words ("" when not ambiguous)."""
        if not self.ambiguous:
            return ""
        listed = ", ".join(f"{c.label} ({c.num_tensors} tensors)" for c in self.ambiguous)
        return (f"the file holds {len(self.ambiguous)} complete, equally plausible state dicts: {listed}; "
                f"ckptfit does not guess which one is meant")

    @property
    def hint(self) -> str:
        """What to pass to choose one (both the Python and the CLI spelling)."""
        names = [c.name for c in self.ambiguous if c.name]
        return "choose one: " + " or ".join(f"use={n!r} (CLI: --use {n})" for n in names)


def choose_candidate(cands: list[StateDictCandidate], use: str | None, *,
                     fit: Callable[[StateDictCandidate], tuple[bool, int]] | None = None,
                     path: str | None = None) -> Choice:
    """Which of ``cands`` (marked, :func:`mark_candidates`) to load; see :meth:`Checkpoint.choose`.

    Raises:
        CheckpointError: there are no candidates, or ``use`` matches nothing.
    """
    if not cands:
        raise CheckpointError("the file holds no tensors that could be model weights", path=path,
                              hint="run `ckptfit inspect` on it to see what it contains")
    if use is not None:
        return _choose_by_use(cands, use, path)
    return _choose_default(cands, fit)


def _use_key(use: str) -> str:
    """``use`` as a dotted key path: ``"model/ema"`` and ``"model.ema."`` are ``"model.ema"``."""
    return ".".join(part for part in use.replace("/", ".").split(".") if part)


def _choose_by_use(cands: list[StateDictCandidate], use: str, path: str | None) -> Choice:
    try:
        return Choice(select_candidate(cands, use, path=path), f"chosen with use={use!r}")
    except CheckpointError:
        inner = _prefix_inside(cands, _use_key(use))
        if inner is None:
            raise
    outer, prefix = inner  # e.g. Lightning: one state dict holding 'model.*' and 'model_ema.*'
    name = f"{outer.name}.{prefix[:-1]}" if outer.name else prefix[:-1]
    tensors = {k[len(prefix):]: t for k, t in outer.tensors.items() if k.startswith(prefix)}
    kind: CandidateKind = "ema" if use == "ema" or candidate_kind(prefix[:-1]) == "ema" else outer.kind
    reason = f"use={use!r}: the tensors under {prefix!r} inside {outer.label}"
    if kind == "ema":
        from ._ema_names import undot  # LitEma's dotless names ('model_ema.diffusion_modelinput_blocks00weight')

        mapped = undot(outer.tensors, prefix, path)
        if mapped is not None:
            tensors, reason = mapped[0], f"{reason}; {mapped[1]}"
    return Choice(StateDictCandidate(name, tensors, kind), reason)


def _prefix_inside(cands: list[StateDictCandidate], use: str) -> tuple[StateDictCandidate, str] | None:
    """``use`` naming a key prefix inside one state dict rather than a container of its own.

    ``use="ema"`` finds the one leading segment with an EMA word (``model_ema.``, ``ema_model.``);
    any other ``use`` must be leading segments as written, after the state dict's own key path
    or not (``"state_dict.model_ema"`` and ``"model_ema"`` in a Lightning file).
    """
    found: list[tuple[StateDictCandidate, str]] = []
    for c in cands:
        if use == "ema":
            firsts = dict.fromkeys(k.split(".", 1)[0] for k in c.tensors if "." in k)
            found.extend((c, f + ".") for f in firsts if any(w in f.lower() for w in EMA_WORDS))
            continue
        inner = use[len(c.name) + 1:] if c.name and use.startswith(c.name + ".") else use
        if inner and any(k.startswith(inner + ".") for k in c.tensors):
            found.append((c, inner + "."))
    found = list({(id(c.tensors), p): (c, p) for c, p in found}.values())  # one dict saved under two names
    return found[0] if len(found) == 1 else None


def _same_weights(a: StateDictCandidate, b: StateDictCandidate) -> bool:
    """Whether two candidates hold the same stored tensors (one dict saved twice, or views of one storage)."""
    if a.tensors is b.tensors:
        return True

    def where(c: StateDictCandidate) -> list:
        return sorted((t.storage_key, t.storage_offset, t.shape) if t.storage_key is not None else (id(t),)
                      for t in c.tensors.values())

    return len(a.tensors) == len(b.tensors) and where(a) == where(b)


def _plausibility(c: StateDictCandidate) -> tuple[str, bool]:
    last = c.name.rsplit(".", 1)[-1].lower()
    return c.kind, last in _GENERIC_NAMES


def _choose_default(cands: list[StateDictCandidate],
                    fit: Callable[[StateDictCandidate], tuple[bool, int]] | None) -> Choice:
    default = next(c for c in cands if c.default)
    if len(cands) == 1:
        return Choice(default, default.reason)
    contenders = [c for c in cands if c.kind in ("model", "module") or c is default]
    chosen, reason = default, default.reason
    if fit is not None:
        # the default, unless another (non-EMA, non-optimizer) one fits the model clearly better
        scored = sorted(((*fit(c), c is default, i, c) for i, c in enumerate(contenders)),
                        key=lambda s: (s[0], s[1], s[2], -s[3]), reverse=True)
        ok, n, is_default, _, best = scored[0]
        if not is_default:
            n_default = next(s[1] for s in scored if s[2])
            chosen, reason = best, (f"it fits the model ({n} tensors) better than the default {default.name!r} "
                                    f"({n_default} tensors)")
        equal = [s[4] for s in scored if s[0] == ok and s[1] == n]
    else:
        equal = [c for c in contenders if c.num_tensors == chosen.num_tensors
                 and sorted(t.shape for t in c.tensors.values()) == sorted(t.shape for t in chosen.tensors.values())]
    rivals = [c for c in equal if c is not chosen and c.kind in ("model", "module")
              and _plausibility(c) == _plausibility(chosen) and not _same_weights(c, chosen)]
    if chosen.kind in ("model", "module") and rivals and (fit is None or ok):
        names = " and ".join(repr(c.name) for c in (chosen, *rivals))
        return Choice(chosen, f"none: {names} are equally plausible", (chosen, *rivals))
    return Choice(chosen, reason)


def _mark_ambiguous(cands: list[StateDictCandidate]) -> list[StateDictCandidate]:
    """The default's reason says so when an equally plausible state dict stands beside it."""
    if len(cands) < 2:
        return cands
    choice = _choose_default(cands, None)
    if not choice.ambiguous:
        return cands
    why = f"ambiguous: {choice.reason.removeprefix('none: ')}; pick one with use="
    return [StateDictCandidate(c.name, c.tensors, c.kind, c.default, why) if c.default else c for c in cands]


def select_candidate(cands: list[StateDictCandidate], use: str, *, path: str | None = None) -> StateDictCandidate:
    """Pick the candidate named by ``use``: exact key path (dotted or slash), last segment, or a kind
    (``ema``, ``model``). A key prefix inside one state dict is :meth:`choose_candidate`'s business."""
    names = [c.name for c in cands]
    for c in cands:
        if c.name == use:
            return c
    key = _use_key(use)
    for c in cands:
        if c.name == key:
            return c
    use = key or use
    tail = [c for c in cands if c.name.rsplit(".", 1)[-1] == use]
    if len(tail) == 1:
        return tail[0]
    if use in ("ema", "model", "module", "optimizer"):
        same = [c for c in cands if c.kind == use]
        if len(same) == 1:
            return same[0]
        if len(same) > 1:
            exact = [c for c in same if c.name.rsplit(".", 1)[-1].lower() == use]
            if len(exact) == 1:
                return exact[0]
            raise CheckpointError(f"use={use!r} is ambiguous: the file has {', '.join(repr(c.name) for c in same)}",
                                  path=path, hint="pass the exact key path, e.g. use=" + repr(same[0].name))
    raise CheckpointError(f"use={use!r} matches no state dict in the file; it has: "
                          f"{', '.join(repr(n) if n else repr('') + ' (top level)' for n in names)}",
                          path=path, hint="pass one of those names as use=")


def find_candidates(tree: Any) -> list[StateDictCandidate]:
    """Walk the tree (iteratively, each object once) for mappings of tensors and pickled modules.

    Optimizer states are skipped (their momentum buffers are not model weights); a mapping saved
    under two keys (``{"state_dict": sd, "state_dict_ema": sd}``) is offered under both names.
    """
    found: list[StateDictCandidate] = []
    seen: dict[int, StateDictCandidate | None] = {}
    nested: list[tuple[str, dict]] = []  # dicts of dicts: perhaps one model saved in parts
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, LazyTensor):
            continue
        if id(obj) in seen:
            first = seen[id(obj)]
            if first is not None and path:
                kind = candidate_kind(path)
                if first.kind == "module" and kind != "ema":
                    kind = "module"
                found.append(StateDictCandidate(path, first.tensors, kind))
            continue
        seen[id(obj)] = None
        if isinstance(obj, dict):
            if is_optimizer_state(obj):
                continue
            tensors = [(k, v) for k, v in obj.items() if isinstance(v, LazyTensor)]
            values = [v for k, v in obj.items() if k not in META_KEYS and v is not None]
            if tensors and all(isinstance(k, str) for k in obj) and len(tensors) * 2 >= len(values):
                sd = collections.OrderedDict((k, v) for k, v in tensors)
                found.append(StateDictCandidate(path, sd, candidate_kind(path) if path else "model"))
                seen[id(obj)] = found[-1]
                continue
            if path and len(obj) >= 2 and all(isinstance(k, str) and isinstance(v, dict) for k, v in obj.items()):
                nested.append((path, obj))
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in obj.items()]
            stack.extend(reversed(children))
        elif isinstance(obj, list | tuple):
            stack.extend(reversed([(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(obj)]))
        elif isinstance(obj, Placeholder):
            ms = module_state(obj)
            if ms:
                kind: CandidateKind = candidate_kind(path) if path else "module"
                found.append(StateDictCandidate(path, ms, "ema" if kind == "ema" else "module"))
                seen[id(obj)] = found[-1]
                continue
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in obj.attributes().items()]
            stack.extend(reversed(children))
    return _merge_nested(found, nested, seen)


def _merge_nested(found: list[StateDictCandidate], nested: list[tuple[str, dict]],
                  seen: dict[int, StateDictCandidate | None]) -> list[StateDictCandidate]:
    """A model saved as nested dicts (``{"model": {"backbone": {...}, "head": {...}}}``) is one candidate.

    Each part stays a candidate of its own (kind ``other``), for a model that is just that part.
    Never at the top level, and never when a part looks like EMA or optimizer state: those are
    siblings of the model, not pieces of it.
    """
    for path, obj in nested:
        parts = [(k, seen.get(id(v))) for k, v in obj.items()]
        if not all(c is not None and c.kind == "model" and candidate_kind(k) == "model" for k, c in parts):
            continue
        merged: dict[str, LazyTensor] = collections.OrderedDict()
        for k, c in parts:
            merged.update((f"{k}.{name}", t) for name, t in c.tensors.items())  # type: ignore[union-attr]
        names = {c.name for _, c in parts if c is not None}
        found = [StateDictCandidate(c.name, c.tensors, "other") if c.name in names else c for c in found]
        found.append(StateDictCandidate(path, merged, candidate_kind(path)))
    return found


def _rank(c: StateDictCandidate) -> tuple:
    last = c.name.rsplit(".", 1)[-1].lower()
    kind_rank = {"model": 0, "module": 0, "other": 1, "ema": 2, "optimizer": 3}[c.kind]
    name_rank = _MODEL_NAMES.index(last) if last in _MODEL_NAMES else (len(_MODEL_NAMES) if c.name else -1)
    return (kind_rank, name_rank, -c.num_tensors)


def _mark_default(found: list[StateDictCandidate]) -> list[StateDictCandidate]:
    if not found:
        return []
    best = min(found, key=_rank)
    others = [c for c in found if c is not best]
    if len(found) == 1:
        why = "the only set of weights in the file"
    elif best.kind == "ema":
        why = "no non-EMA weights in the file"
    else:
        skipped = ", ".join(f"{o.name!r} ({o.kind})" for o in others)
        why = f"the model's own weights; also in the file: {skipped}"
    out = []
    for c in found:
        out.append(StateDictCandidate(c.name, c.tensors, c.kind, c is best, why if c is best else
                                      f"not the default ({c.kind}); pick it with use={c.name!r}"))
    return out


def mark_candidates(found: list[StateDictCandidate]) -> list[StateDictCandidate]:
    """The candidates :func:`find_candidates` found, the default marked (and said to be ambiguous when it is)."""
    return _mark_ambiguous(_mark_default(found))
