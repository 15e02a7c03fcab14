"""A classifier head for other classes: keep the rows of the classes the file also has, only when asked.

A model built for another number of classes than the file's (``num_classes=10`` against
ImageNet's 1000) has a head whose weight and bias differ from the file's in their first
dimension; ``partial=True`` leaves that whole head at its init. ``class_map=`` (CLI
``--class-map``) says which of the file's rows are which of the model's classes:

- a sequence with one entry per class of the model, the file's class index or ``None``:
  ``class_map=[3, 7, None]`` gives model class 0 the file's row 3, class 1 row 7, and leaves
  class 2 (a new class) at the model's init;
- a mapping ``{model class: file class}``: ``class_map={0: 3, 1: 7}``; the model's classes
  not in it are new and stay at the model's init.

The rows are copied in every tensor of the head whose first dimension is the class count
(weight and bias); the rest of each tensor's shape must be the file's. The head is found by
shape: the one module whose tensors differ from the file's in their first dimension only.
When several modules could be the head (a distilled ViT's ``head`` and ``head_dist``), or
none does (the same number of classes, reordered), ``class_map_head="NAME"`` (CLI
``--class-map-head NAME``) names the module; nothing is guessed. The load reports the
transform (``rows selected by class_map: 2 of 1000 rows, 1 new row at init``).
"""
from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from .plans import Decision, Plan, Transform

__all__ = ["ClassMap", "parse_class_map", "class_map_from_text", "class_map_plan", "pick_rows", "fill_rows"]


@dataclass(frozen=True)
class ClassMap:
    """``class_map=`` checked: ``rows`` (the sequence form) or ``pairs`` (the mapping form), and the head."""

    rows: tuple[int | None, ...] | None = None
    pairs: tuple[tuple[int, int | None], ...] | None = None
    head: str | None = None

    @property
    def text(self) -> str:
        return "class_map=" + (_short(list(self.rows)) if self.rows is not None else _short(dict(self.pairs or ())))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ..." + text[-1]


def _index(x: Any, what: str) -> int | None:
    if x is None:
        return None
    if isinstance(x, bool) or isinstance(x, (str, bytes, float)):
        raise TypeError(f"class_map: {what} {x!r} is not a class index; use an int >= 0 (or None for a new class)")
    try:
        i = operator.index(x)
    except TypeError:
        raise TypeError(f"class_map: {what} {x!r} is not a class index; use an int >= 0 (or None for a new "
                        f"class)") from None
    if i < 0:
        raise ValueError(f"class_map: {what} {i} is negative; class indices count from 0")
    return i


def parse_class_map(value: Any, head: Any = None) -> ClassMap | None:
    """Check ``class_map=`` and ``class_map_head=`` before any work; raise at once on anything wrong.

    Args:
        value: ``None``; a sequence giving, for each class of the model in order, the file's
            class index or ``None`` (a new class, left at init); or a mapping ``{model class:
            file class or None}``, the model's classes not in it being new.
        head: the head module's name in the model (``"fc"``, ``"head.fc"``), when its shape does
            not tell (see the module docstring).

    Raises:
        TypeError: not a sequence or mapping of int indices, or ``class_map_head`` not a name.
        ValueError: a negative index, a file class given to two model classes, nothing taken
            from the file, or ``class_map_head`` without ``class_map``.

    Example:
        >>> parse_class_map([3, 7, None]).rows
        (3, 7, None)
        >>> parse_class_map({0: 3, 1: 7}).pairs
        ((0, 3), (1, 7))
    """
    if head is not None and (not isinstance(head, str) or not head.strip()):
        raise TypeError(f"class_map_head= must be the head module's name in the model, such as 'fc', not {head!r}")
    if value is None:
        if head is not None:
            raise ValueError("class_map_head= names the head for class_map=; pass class_map= too (or leave both out)")
        return None
    if isinstance(value, Mapping):
        pairs = tuple((_index(k, "model class"), _index(v, f"file class for model class {k!r}"))
                      for k, v in value.items())
        if any(k is None for k, _ in pairs):
            raise TypeError("class_map: a model class (a key) is None; the keys are the model's class indices")
        pairs = tuple(sorted(pairs))  # type: ignore[arg-type]
        cm = ClassMap(pairs=pairs, head=head)  # type: ignore[arg-type]
        taken = [(k, v) for k, v in pairs]
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"class_map= must be a list (the file's class for each model class, None for a new one) "
                        f"or a dict {{model class: file class}}, not {type(value).__name__}")
    else:
        rows = tuple(_index(x, f"entry {i}") for i, x in enumerate(value))
        cm = ClassMap(rows=rows, head=head)
        taken = list(enumerate(rows))
    seen: dict[int, int] = {}
    for new, old in taken:
        if old is None:
            continue
        if old in seen:
            raise ValueError(f"class_map: file class {old} is given to model classes {seen[old]} and {new}; each of "
                             f"the file's rows goes to one model class")
        seen[old] = new
    if not seen:
        raise ValueError("class_map takes no row from the file (every model class is new); leave it out and pass "
                         "partial=True to keep the whole head at init")
    return cm


def class_map_from_text(text: str) -> Any:
    """The CLI's ``--class-map``: a JSON file (a list, or an object ``{"model class": file class}``) or
    ``NEW=OLD,...`` inline (``0=3,1=7``); returns what :func:`parse_class_map` takes.

    Example:
        >>> class_map_from_text("0=3,1=7")
        {0: 3, 1: 7}
    """
    if os.path.isfile(text) or text.endswith(".json"):
        try:
            with open(text, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"{text!r}: cannot read it ({e.strerror or e}); give a JSON file or NEW=OLD,... "
                             f"such as 0=3,1=7") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{text!r} is not JSON ({e}); write a list such as [3, 7, null] or an object such "
                             f"as {{\"0\": 3, \"1\": 7}}") from None
        if isinstance(data, dict):
            out = {}
            for k, v in data.items():
                if not str(k).strip().isdigit():
                    raise ValueError(f"{text!r}: key {k!r} is not a model class index (write {{\"0\": 3, ...}})")
                out[int(k)] = v
            return out
        if isinstance(data, list):
            return data
        raise ValueError(f"{text!r} holds a {type(data).__name__}; write a list such as [3, 7, null] or an "
                         f"object such as {{\"0\": 3, \"1\": 7}}")
    out: dict[int, int | None] = {}
    for part in (p.strip() for p in text.split(",")):
        new, eq, old = part.partition("=")
        new, old = new.strip(), old.strip()
        if not eq or not new.isdigit() or not (old.isdigit() or old.lower() in ("none", "new")):
            raise ValueError(f"{part!r}: write the class map as NEW=OLD pairs (model class = file class), e.g. "
                             f"0=3,1=7, or give a JSON file")
        if int(new) in out:
            raise ValueError(f"model class {new} is given twice ({new}={out[int(new)]}, {part})")
        out[int(new)] = int(old) if old.isdigit() else None
    return out


# ------------------------------------------------------------------------------ the plan

def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _rows_differ(d: Decision) -> bool:
    """A tensor the file has with another number of rows, the rest of its shape alike."""
    s, t = d.source_shape, tuple(d.target_shape)
    return (d.action == "skip_shape" and d.transform is None and s is not None and len(s) == len(t) >= 1
            and s[0] != t[0] and tuple(s[1:]) == t[1:])


def _head(plan: Plan, cm: ClassMap) -> tuple[list[Decision], str | None]:
    """The head's decisions, or a problem."""
    cands: dict[str, list[Decision]] = {}
    for d in plan.decisions:
        if _rows_differ(d):
            cands.setdefault(_module(d.target), []).append(d)
    names = ", ".join(f"'{m}'" for m in list(cands)[:6]) + (" ..." if len(cands) > 6 else "")
    if cm.head is None:
        if len(cands) == 1:
            return next(iter(cands.values())), None
        if not cands:
            return [], (f"{cm.text}: no tensor of the model has another number of rows (classes) than the file's, "
                        f"the rest of its shape alike, so no head was found; if the classes are only reordered, name "
                        f"the head module with class_map_head= (CLI: --class-map-head NAME)")
        first = next(iter(cands))
        return [], (f"{cm.text}: {len(cands)} modules differ from the file in their number of rows and could be the "
                    f"classifier head ({names}); nothing is guessed: name it with class_map_head='{first}' (CLI: "
                    f"--class-map-head {first})")
    head = cm.head.strip()
    mine = [d for d in plan.decisions if _module(d.target) == head or d.target == head]
    if not mine:
        hint = f"; modules whose rows differ from the file's: {names}" if cands else ""
        return [], f"class_map_head={cm.head!r}: the model has no module of that name with tensors{hint}"
    rows = [d for d in mine if _rows_differ(d) or (d.action == "load" and d.transform is None and d.source_shape
                                                   is not None and tuple(d.source_shape) == tuple(d.target_shape)
                                                   and len(d.target_shape) >= 1)]
    if not rows:
        via = next((d for d in mine if d.source is None and d.tied_to and any(
            x.target == d.tied_to for group in cands.values() for x in group)), None)
        if via is not None:  # one tensor under two names: the file has it under the other one
            other = _module(via.tied_to or "")
            return [], (f"class_map_head={cm.head!r}: {via.target} is tied to '{via.tied_to}' (one tensor), which the "
                        f"file holds for another number of classes; name that module: class_map_head='{other}' "
                        f"(CLI: --class-map-head {other})")
        lost = [d.target for d in mine if d.source is None]
        why = (f"{', '.join(lost)} {'is' if len(lost) == 1 else 'are'} not in the file under a matching name (pass "
               f"rename= to pair the file's head with it)" if lost else
               "its tensors do not differ from the file's in their first dimension only")
        return [], f"class_map_head={cm.head!r}: {why}"
    return rows, None


def _resolve(cm: ClassMap, n_new: int, n_old: int, head: str) -> tuple[tuple[int | None, ...] | None, str | None]:
    """The file row of each of the ``n_new`` model rows, or a problem."""
    if cm.rows is not None:
        if len(cm.rows) != n_new:
            return None, (f"{cm.text} has {len(cm.rows)} entries, but the model's head '{head}' has {n_new} classes; "
                          f"give one entry per model class (None for a new class), or a dict {{model class: file "
                          f"class}}")
        rows = cm.rows
    else:
        bad = [k for k, _ in cm.pairs or () if k >= n_new]
        if bad:
            return None, (f"{cm.text}: model class {bad[0]} is out of range: the model's head '{head}' has {n_new} "
                          f"classes (0-{n_new - 1})")
        given = dict(cm.pairs or ())
        rows = tuple(given.get(i) for i in range(n_new))
    over = [(i, r) for i, r in enumerate(rows) if r is not None and r >= n_old]
    if over:
        i, r = over[0]
        return None, (f"{cm.text}: file class {r} (for model class {i}) is out of range: the file's head has "
                      f"{n_old} classes (0-{n_old - 1})")
    return rows, None


def _new_text(rows: tuple[int | None, ...]) -> str:
    new = [i for i, r in enumerate(rows) if r is None]
    if not new:
        return ""
    shown = ", ".join(map(str, new[:8])) + (", ..." if len(new) > 8 else "")
    many = len(new) != 1
    return f", {len(new)} new row{'s' if many else ''} at init (model class{'es' if many else ''} {shown})"


def _refused(plan: Plan, problem: str | None) -> Plan:
    """The plan with the class map's problem; ``partial=True`` would not settle it, so it is not suggested."""
    from .matching.decisions import PARTIAL_SHAPES

    return replace(plan, problems=plan.problems + (str(problem),),
                   suggestions=tuple(s for s in plan.suggestions if s != PARTIAL_SHAPES))


def class_map_plan(plan: Plan, cm: ClassMap | None) -> Plan:
    """With ``class_map=``: load the head's rows the map selects, the new classes' rows kept at init.

    Returns:
        The plan with the head's decisions loading (a ``Transform("class_map", ...)`` whose
        ``rows`` give the file row of each model row) and their problems removed; or a problem
        saying why the map does not apply (no head, several, indices out of range).
    """
    if cm is None:
        return plan
    head, problem = _head(plan, cm)
    if problem is None:
        n_new = {d.target_shape[0] for d in head}
        n_old = {d.source_shape[0] for d in head if d.source_shape}
        if len(n_new) != 1 or len(n_old) != 1:
            problem = (f"{cm.text}: the head's tensors ({', '.join(d.target for d in head)}) do not agree on the "
                       f"number of classes")
    if problem is not None:
        return _refused(plan, problem)
    name = cm.head or _module(head[0].target) or head[0].target
    rows, problem = _resolve(cm, n_new.pop(), n_old.pop(), name)
    if rows is None:
        return _refused(plan, problem)
    n_file = head[0].source_shape[0]  # type: ignore[index]
    taken = sum(r is not None for r in rows)
    why = f"rows selected by class_map: {taken} of {n_file} rows{_new_text(rows)}"
    pairs = [f"{i}<-{r}" for i, r in enumerate(rows) if r is not None]
    detail = "model row <- file row: " + ", ".join(pairs[:8]) + (", ..." if len(pairs) > 8 else "")
    by_id = {}
    for d in head:
        by_id[id(d)] = replace(d, action="load",  # the stage that matched the name stays
                               reason=f"{d.reason.split(', but checkpoint has')[0]}; {why}",
                               transform=Transform("class_map", detail, why, rows=rows))
    decisions, tied = _ties_through(tuple(by_id.get(id(x), x) for x in plan.decisions), by_id.values(), why)
    targets = {d.target for d in head} | tied
    problems = tuple(p for p in plan.problems if not any(p.startswith(f"{t}: ") for t in targets))
    suggestions = plan.suggestions
    if not any(x.action == "skip_shape" for x in decisions):
        from .matching.decisions import PARTIAL_SHAPES

        suggestions = tuple(s for s in suggestions if s != PARTIAL_SHAPES)
    sources = {d.source for d in head}
    checked = {d.source: d for d in decisions if d.target in tied and d.source is not None}
    unused = tuple(u if u.source not in checked else replace(u, reason=(
        f"the model ties '{checked[u.source].target}' to '{checked[u.source].tied_to}', whose rows class_map "
        f"selects; compared with it at load, filled through the tie")) for u in plan.unused if u.source not in sources)
    return replace(plan, decisions=decisions, problems=problems, suggestions=suggestions, unused=unused)


def _ties_through(decisions: tuple[Decision, ...], head: Any, why: str) -> tuple[tuple[Decision, ...], set[str]]:
    """A weight tied to the head is the head's tensor: it holds the rows class_map selects, not its init.

    The model's other key for the head's tensor (its tied weight, found by ``tied_to`` either way)
    becomes ``tied`` to the head's decision: the report says what the tensor holds. Its own file
    tensor, if the file has one and it is not excluded, stays named as the decision's source, so
    the load compares it with the rows the map selects (:mod:`ckptfit.loading.ties`).
    """
    loaded = {d.target: d for d in head}
    partner: dict[str, str] = {}  # the tied key -> the head key that fills it
    for d in decisions:
        if d.target in loaded:
            if d.tied_to and d.tied_to not in loaded:
                partner[d.tied_to] = d.target
        elif d.tied_to in loaded:
            partner[d.target] = d.tied_to
    out = []
    for d in decisions:
        h = partner.get(d.target)
        if d.target in loaded and d.tied_to:
            d = replace(d, tied_to=None)  # the head carries the values
        elif h is not None and d.action in ("keep", "skip_shape", "missing"):
            own = d.source if d.stage != "user" else None  # excluded: filled through the tie, unused
            reason = f"shares storage with '{h}', which is loaded ({why})"
            if own is not None:
                reason += f"; the checkpoint's own '{own}' is compared with those rows at load"
            d = replace(d, action="tied", stage="tie", source=own, tied_to=h, reason=reason,
                        source_shape=d.source_shape if own else None, source_dtype=d.source_dtype if own else None)
        out.append(d)
    return tuple(out), set(partner)


# ---------------------------------------------------------------------------- the copy

def pick_rows(x: torch.Tensor, rows: tuple[int | None, ...]) -> torch.Tensor:
    """The file tensor's rows the map takes, in the model's order (a new tensor: the file is not kept)."""
    old = [r for r in rows if r is not None]
    return x.index_select(0, torch.tensor(old, dtype=torch.long, device=x.device))


def fill_rows(current: torch.Tensor, picked: torch.Tensor, rows: tuple[int | None, ...]) -> torch.Tensor:
    """``current`` (the model's tensor, at its init) with the picked rows written over the mapped classes."""
    new = [i for i, r in enumerate(rows) if r is not None]
    out = current.detach().clone()
    out[torch.tensor(new, dtype=torch.long, device=out.device)] = picked.to(device=out.device, dtype=out.dtype)
    return out
