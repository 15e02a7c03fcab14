"""What every rendering of a plan or a load shares: text safe for a terminal, folded sections, lines, dicts.

:class:`~ckptfit.report.LoadReport` (an applied load) and a refused plan (:mod:`ckptfit.refusal`)
are rendered from the same pieces, so that they read alike: the headline (:func:`count_text`,
:func:`source_text`), how names were reconciled (:func:`how_lines`), the folded sections
(:func:`fold_sections`, :func:`section_lines`) and the JSON of one decision (:func:`decision_dict`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .dtypes import dtype_name
from .keyfolding import fold_keys, fold_pairs
from .matching.names import fmt_shape
from .plans import Decision, Plan, Unused

if TYPE_CHECKING:  # torch for annotations only: describing a checkpoint never imports torch
    import torch

    from .report import LoadReport

__all__ = ["printable", "STAGE_LABELS", "LISTED_STAGES", "dtype_text", "human_bytes", "group_by", "decision_dict",
           "fold_sections", "Row", "Section", "count_text", "source_text", "how_lines", "ported", "cap",
           "section_lines", "list_lines"]

# Characters a terminal acts on (C0 and C1 controls, DEL, bidirectional overrides): text from a file
# (tensor names, metadata, class names) is never allowed to move the cursor, recolour or reorder a line.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_NL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object, *, newlines: bool = True) -> str:
    """``text`` safe for a terminal: control characters shown as ``\\x1b`` escapes, nothing else changed.

    Args:
        newlines: keep line breaks (and tabs), for multi-line renderings; False escapes them too,
            for one name or value on one line.

    Example:
        >>> printable("conv\x1b[31m.weight")
        'conv\\x1b[31m.weight'
    """
    s = text if isinstance(text, str) else str(text)
    pattern = _CONTROL if newlines else _CONTROL_NL
    return pattern.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 256 else f"\\u{ord(m.group(0)):04x}", s)


_T = TypeVar("_T")

STAGE_LABELS = {
    "exact": "by name",
    "prefix": "by name after renaming",
    "rule": "by rule",
    "structural": "by structure",
    "user": "by your mapping",
    "tie": "through a tie",
    "harmless": "harmless",
    "port": "split or joined",
    "none": "unmatched",
}
_STAGE_ORDER = {stage: i for i, stage in enumerate(("exact", "prefix", "user", "rule", "structural"))}
# Loads a user wants to check one by one: the names differ in a way no simple rename explains.
LISTED_STAGES = ("rule", "structural")


def dtype_text(dtype: torch.dtype | str | None) -> str | None:
    """:func:`ckptfit.dtypes.dtype_name`, or None for no dtype."""
    return None if dtype is None else dtype_name(dtype)


def _shape_text(shape: Sequence[int] | None) -> str:
    return fmt_shape(tuple(shape)) if shape is not None else "?"


def human_bytes(n: int) -> str:
    """A byte count for reading, in powers of 1000 (the one size format: reports, inspect, convert).

    Example:
        >>> human_bytes(999), human_bytes(123456789), human_bytes(2_500_000_000_000)
        ('999 B', '123.5 MB', '2.5 TB')
    """
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def group_by(items: Iterable[_T], key: Callable[[_T], Hashable]) -> dict[Hashable, list[_T]]:
    """Items grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[_T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "target": d.target,
        "action": d.action,
        "source": d.source,
        "stage": d.stage,
        "reason": d.reason,
        "target_shape": list(d.target_shape),
        "source_shape": list(d.source_shape) if d.source_shape is not None else None,
        "target_dtype": dtype_text(d.target_dtype),
        "source_dtype": dtype_text(d.source_dtype),
        "tied_to": d.tied_to,
        **({"transform": _transform_dict(d.transform)} if d.transform is not None else {}),  # ckptfit.porting
        **({"evidence": d.evidence} if d.evidence else {}),  # structural: what carried the alignment
    }


def _transform_dict(t: Any) -> dict[str, Any]:
    return {"kind": t.kind, "detail": t.detail, "reason": t.reason, "sources": list(t.sources),
            "part": t.part, "parts": t.parts, "dim": t.dim, "transpose": t.transpose,
            "sizes": list(getattr(t, "sizes", ())),
            **({"rows": list(t.rows)} if getattr(t, "rows", ()) else {})}  # class_map: file row per model row


def fold_sections(loaded: Sequence[Decision], tied: Sequence[Decision], kept: Sequence[Decision],
                  skipped: Sequence[Decision], missing: Sequence[Decision], unused: Sequence[Unused], *,
                  refused: bool) -> list[Section]:
    """The folded sections of a load, or of a refused plan (``refused``: tensors of another shape are
    problems rather than layers "left at init")."""
    sections: list[Section] = []
    listed = [d for d in loaded if d.stage in LISTED_STAGES and d.source != d.target]
    for stage in LISTED_STAGES:
        decisions = [d for d in listed if d.stage == stage]
        if not decisions:
            continue
        # structural loads are grouped by the evidence that carried them (name, order ...)
        by_reason = group_by(decisions, lambda d: f"aligned by {d.evidence}" if d.evidence else d.reason)
        show_reason = len(by_reason) <= 3
        groups = by_reason if show_reason else {"": decisions}
        rows = tuple(
            Row(tuple(fold_pairs((d.source or "?", d.target) for d in group)), "loaded",
                str(reason) if show_reason else STAGE_LABELS[stage])
            for reason, group in groups.items()
        )
        sections.append(Section(STAGE_LABELS[stage], len(decisions), rows, show_reason))
    if tied:
        rows = tuple(
            Row(tuple(fold_keys(d.target for d in group)), "tied", (f"shares {tied_to}" if tied_to else "tied")
                + (f"; the checkpoint's own '{own}' checked equal at load" if own else ""))  # ckptfit.loading.ties
            for (tied_to, own), group in group_by(tied, lambda d: (d.tied_to, d.source)).items()
        )
        sections.append(Section("tied", len(tied), rows))
    if kept:
        sections.append(Section("left at init", len(kept), _rows_by_reason(kept, "left at init")))
    if skipped:
        rows = tuple(
            Row(tuple(fold_keys(d.target for d in group)), "shape differs",
                f"checkpoint {_shape_text(src)}, model {_shape_text(tgt)}")
            for (src, tgt), group in group_by(skipped, lambda d: (d.source_shape, d.target_shape)).items()
        )
        title = "shape differs" if refused else "left at init, shape differs"
        sections.append(Section(title, len(skipped), rows))
    if missing:
        sections.append(Section("missing", len(missing), _rows_by_reason(missing, "missing")))
    # a tensor already shown as "shape differs" is not listed a second time as unused
    shown = {d.source for d in skipped}
    rest = [u for u in unused if u.source not in shown]
    if rest:
        rows = tuple(
            Row(tuple(fold_keys(u.source for u in group)), "unused", str(reason))
            for reason, group in group_by(rest, lambda u: u.reason).items()
        )
        sections.append(Section("unused in checkpoint", len(rest), rows))
    return sections


@dataclass(frozen=True)
class Row:
    """One folded line of a rendering: keys (already folded), a status and a detail."""

    keys: tuple[str, ...]
    status: str
    detail: str


@dataclass(frozen=True)
class Section:
    title: str  # "left at init", "unused in checkpoint", ...
    count: int
    rows: tuple[Row, ...]
    detail_inline: bool = True  # False: too many distinct reasons to show; they stay in to_dict()


def count_text(verb: str, copied: int, tied: int, targets: int) -> str:
    """``Loaded 29/29 tensors (1 tied)``: tied tensors hold the checkpoint's values too, so they count."""
    return f"{verb} {copied + tied}/{targets} tensors" + (f" ({tied} tied)" if tied else "")


def source_text(x: LoadReport | Plan) -> str:
    """`` from a.pth (torch-zip, container 'state_dict'; also has: optimizer)``."""
    bits: list[str] = []
    if x.format:
        bits.append(x.format)
    if x.container is not None:
        bits.append(f"container '{x.container}'" if x.container else "state dict at the root")
    others = [c for c in x.containers if c != x.container]
    inner = ", ".join(bits)
    if others:
        inner += ("; " if inner else "") + "also has: " + ", ".join(c or "(root)" for c in others)
    text = f" from {x.path}" if x.path else ""
    return f"{text} ({inner})" if inner else text


def how_lines(x: LoadReport | Plan, loaded: Sequence[Decision]) -> list[str]:
    """How names were reconciled: the container chosen, name transforms, tensor transforms, stages."""
    lines = []
    if x.container_reason and len(x.containers) > 1:
        lines.append(f"  container: {x.container_reason}")
    if x.transforms:
        lines.append("  names: " + "; ".join(x.transforms))
    for kind, keys, why in ported(loaded):  # tensors transposed, split or joined (ckptfit.porting)
        lines.append(f"  {kind}: {', '.join(fold_keys(keys))} — {why}")
    stages = group_by(sorted(loaded, key=lambda d: _STAGE_ORDER.get(d.stage, 99)), lambda d: d.stage)
    if stages and (len(stages) > 1 or "exact" not in stages):
        counts = (f"{len(g)} {STAGE_LABELS.get(str(s), str(s))}" for s, g in stages.items())
        lines.append("  matched: " + ", ".join(counts))
    return lines


def ported(decisions: Sequence[Decision]) -> list[tuple[str, list[str], str]]:
    """``[(kind, model keys, reason)]`` of the decisions that carry a transform, by kind and reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for d in decisions:
        t = getattr(d, "transform", None)
        if t is not None:
            groups.setdefault((t.kind, t.reason), []).append(d.target)
    return [(k, keys, why) for (k, why), keys in groups.items()]


def _rows_by_reason(decisions: Sequence[Decision], status: str) -> tuple[Row, ...]:
    return tuple(
        Row(tuple(fold_keys(d.target for d in group)), status, str(reason))
        for reason, group in group_by(decisions, lambda d: d.reason).items()
    )


def cap(items: Sequence[str], limit: int, unit: str) -> list[str]:
    if limit <= 0 or len(items) <= limit:
        return list(items)
    return [*items[: limit - 1], f"… {len(items) - limit + 1} more {unit}"]


def _row_text(row: Row, max_keys: int) -> str:
    keys = ", ".join(cap(row.keys, max_keys, "patterns"))
    return f"{keys} — {row.detail}" if row.detail else keys


def section_lines(section: Section, max_lines: int, max_keys: int) -> list[str]:
    """``  left at init (2): fc.{weight,bias} — reason``, or a title and one line per group."""
    title = f"  {section.title} ({section.count})"
    rows = section.rows
    if rows[0].status == "loaded":
        # source -> target pairs: one per line, so that each can be checked.
        pairs = [(pair, row.detail if section.detail_inline else "") for row in rows for pair in row.keys]
        details = {detail for _, detail in pairs}
        if len(pairs) == 1:
            pair, detail = pairs[0]
            return [f"{title}: {pair}" + (f" — {detail}" if detail else "")]
        if len(details) == 1:
            detail = details.pop()
            head = f"{title} — {detail}:" if detail else f"{title}:"
            return [head, *cap([f"    {pair}" for pair, _ in pairs], max_lines, "lines")]
        body = [f"    {pair} — {detail}" for pair, detail in pairs]
        return [f"{title}:", *cap(body, max_lines, "lines")]
    if len(rows) == 1:
        return [f"{title}: {_row_text(rows[0], max_keys)}"]
    return [f"{title}:", *cap([f"    {_row_text(row, max_keys)}" for row in rows], max_lines, "lines")]


def list_lines(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    if len(items) == 1:
        return [f"  {title}: {items[0]}"]
    return [f"  {title}s:", *(f"    {item}" for item in items)]
