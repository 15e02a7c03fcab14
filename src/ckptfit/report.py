"""The LoadReport: what a load did, and its renderings (text, JSON-ready dict, rich table).

A :class:`LoadReport` is made from the :class:`~ckptfit.plans.Plan` that was applied, plus
where the tensors went (device, dtype) and what it cost (seconds, bytes). It is plain
frozen data; rendering is kept apart from computing, and every rendering folds keys
(``layer{1..4}.{0,1}.conv1.weight``) so that it stays short at any model size.
:func:`render_plan` gives the text of a plan that has not been applied (a dry run); a refused
plan has its own rendering (:func:`render_plan`, :func:`refusal_error`): one headline, each
problem once, the suggestions last.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import LoadError
from .keyfolding import fold_keys, fold_pairs
from .plans import Decision, Plan, Unused

if TYPE_CHECKING:  # torch for annotations only: describing a checkpoint never imports torch
    import torch
    from rich.console import Group

__all__ = ["LoadReport", "render_plan", "plan_to_dict", "refusal_error", "printable"]

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

_STAGE_LABELS = {
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
_LISTED_STAGES = ("rule", "structural")


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: Sequence[int] | None) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape is not None else "?"


def _size_text(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _group(items: Iterable[_T], key: Callable[[_T], Hashable]) -> dict[Hashable, list[_T]]:
    """Items grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[_T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "target": d.target,
        "action": d.action,
        "source": d.source,
        "stage": d.stage,
        "reason": d.reason,
        "target_shape": list(d.target_shape),
        "source_shape": list(d.source_shape) if d.source_shape is not None else None,
        "target_dtype": _dtype_name(d.target_dtype),
        "source_dtype": _dtype_name(d.source_dtype),
        "tied_to": d.tied_to,
        **({"transform": _transform_dict(d.transform)} if d.transform is not None else {}),  # ckptfit.porting
        **({"evidence": d.evidence} if d.evidence else {}),  # structural: what carried the alignment
    }


def _transform_dict(t: Any) -> dict[str, Any]:
    return {"kind": t.kind, "detail": t.detail, "reason": t.reason, "sources": list(t.sources),
            "part": t.part, "parts": t.parts, "dim": t.dim, "transpose": t.transpose,
            "sizes": list(getattr(t, "sizes", ()))}


def _sections(loaded: Sequence[Decision], tied: Sequence[Decision], kept: Sequence[Decision],
              skipped: Sequence[Decision], missing: Sequence[Decision], unused: Sequence[Unused], *,
              refused: bool) -> list[_Section]:
    """The folded sections of a load, or of a refused plan (``refused``: tensors of another shape are
    problems rather than layers "left at init")."""
    sections: list[_Section] = []
    listed = [d for d in loaded if d.stage in _LISTED_STAGES and d.source != d.target]
    for stage in _LISTED_STAGES:
        decisions = [d for d in listed if d.stage == stage]
        if not decisions:
            continue
        # structural loads are grouped by the evidence that carried them (name, order ...)
        by_reason = _group(decisions, lambda d: f"aligned by {d.evidence}" if d.evidence else d.reason)
        show_reason = len(by_reason) <= 3
        groups = by_reason if show_reason else {"": decisions}
        rows = tuple(
            _Row(tuple(fold_pairs((d.source or "?", d.target) for d in group)), "loaded",
                 str(reason) if show_reason else _STAGE_LABELS[stage])
            for reason, group in groups.items()
        )
        sections.append(_Section(_STAGE_LABELS[stage], len(decisions), rows, show_reason))
    if tied:
        rows = tuple(
            _Row(tuple(fold_keys(d.target for d in group)), "tied", f"shares {tied_to}" if tied_to else "tied")
            for tied_to, group in _group(tied, lambda d: d.tied_to).items()
        )
        sections.append(_Section("tied", len(tied), rows))
    if kept:
        sections.append(_Section("left at init", len(kept), _rows_by_reason(kept, "left at init")))
    if skipped:
        rows = tuple(
            _Row(tuple(fold_keys(d.target for d in group)), "shape differs",
                 f"checkpoint {_shape_text(src)}, model {_shape_text(tgt)}")
            for (src, tgt), group in _group(skipped, lambda d: (d.source_shape, d.target_shape)).items()
        )
        title = "shape differs" if refused else "left at init, shape differs"
        sections.append(_Section(title, len(skipped), rows))
    if missing:
        sections.append(_Section("missing", len(missing), _rows_by_reason(missing, "missing")))
    # a tensor already shown as "shape differs" is not listed a second time as unused
    shown = {d.source for d in skipped}
    rest = [u for u in unused if u.source not in shown]
    if rest:
        rows = tuple(
            _Row(tuple(fold_keys(u.source for u in group)), "unused", str(reason))
            for reason, group in _group(rest, lambda u: u.reason).items()
        )
        sections.append(_Section("unused in checkpoint", len(rest), rows))
    return sections


@dataclass(frozen=True)
class _Row:
    """One folded line of a rendering: keys (already folded), a status and a detail."""

    keys: tuple[str, ...]
    status: str
    detail: str


@dataclass(frozen=True)
class _Section:
    title: str  # "left at init", "unused in checkpoint", ...
    count: int
    rows: tuple[_Row, ...]
    detail_inline: bool = True  # False: too many distinct reasons to show; they stay in to_dict()


@dataclass(frozen=True)
class LoadReport:
    """What one load did: which tensors were loaded, tied, left at init or skipped, and why.

    Attributes:
        path: the checkpoint's path, when known.
        format: the checkpoint's format (``"torch-zip"``, ``"safetensors"`` ...), when known.
        container: the state dict inside the file that was used (``""`` = the root).
        containers: every candidate state dict the file holds.
        container_reason: why this container was chosen.
        loaded: decisions that copied a checkpoint tensor into the model.
        tied: decisions filled through a tie with another loaded tensor (they count as loaded:
            ``Loaded 29/29 tensors (1 tied)``).
        left_at_init: decisions left at their init (``keep``: harmless, excluded, or ``partial=True``).
        skipped_shape: decisions whose checkpoint tensor has another shape; never loaded.
        unused: checkpoint tensors loaded nowhere.
        transforms: the name transforms applied, human readable.
        warnings: things worth knowing that are not errors.
        device: where the tensors were put, when known.
        dtype: the dtype the tensors were cast to, when any.
        seconds: how long the load took, when measured.
        bytes_read: how many tensor bytes were read, when measured.
        model: the architecture that was built, and why, when ckptfit chose it
            (:func:`ckptfit.auto.from_checkpoint`).
        integrity: whether the tensor bytes were checked against the file's checksums
            (``"CRC-32 checked (122 records)"``, ``"not checked (safetensors has no checksum)"``).
        mode: ``"eval"`` or ``"train"``, when the load built the model (:func:`ckptfit.build`
            returns it in eval mode unless ``train=True``).
        frozen: the parameters ``freeze=True`` froze (``requires_grad=False``): exactly the
            loaded ones.
    """

    path: str | None
    format: str | None
    container: str | None
    containers: tuple[str, ...]
    container_reason: str
    loaded: tuple[Decision, ...]
    tied: tuple[Decision, ...]
    left_at_init: tuple[Decision, ...]
    skipped_shape: tuple[Decision, ...]
    unused: tuple[Unused, ...]
    transforms: tuple[str, ...]
    warnings: tuple[str, ...]
    device: str | None = None
    dtype: str | None = None
    seconds: float | None = None
    bytes_read: int | None = None
    model: str | None = None
    integrity: str | None = None
    mode: str | None = None
    frozen: tuple[str, ...] = ()

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        seconds: float | None = None,
        bytes_read: int | None = None,
        integrity: str | None = None,
    ) -> LoadReport:
        """Build the report of a plan that was applied.

        A refused plan has no report (nothing was loaded): see :func:`render_plan`,
        :func:`plan_to_dict` and :func:`refusal_error`.

        Args:
            plan: the applied plan.
            device: where the tensors were put.
            dtype: the dtype they were cast to, if any.
            seconds: how long the load took.
            bytes_read: how many tensor bytes were read.
            integrity: whether the bytes were checked (``"CRC-32 checked (122 records)"``).

        Returns:
            The report.

        Raises:
            ValueError: the plan has problems (it was refused, not applied).

        Example:
            >>> from ckptfit.plans import Decision, Plan
            >>> plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name"),))
            >>> LoadReport.from_plan(plan, device="cpu").num_loaded
            1
        """
        if not plan.ok:
            raise ValueError("a refused plan was not applied and has no LoadReport; "
                             "render it with render_plan() or plan_to_dict()")
        return cls(
            path=plan.path,
            format=plan.format,
            container=plan.container,
            containers=tuple(plan.containers),
            container_reason=plan.container_reason,
            loaded=plan.by_action("load"),
            tied=plan.by_action("tied"),
            left_at_init=plan.by_action("keep"),
            skipped_shape=plan.by_action("skip_shape"),
            unused=tuple(plan.unused),
            transforms=tuple(plan.transforms),
            warnings=tuple(plan.warnings),
            device=str(device) if device is not None else None,
            dtype=_dtype_name(dtype),
            seconds=float(seconds) if seconds is not None else None,
            bytes_read=int(bytes_read) if bytes_read is not None else None,
            integrity=integrity,
        )

    # ---- counts -------------------------------------------------------------------------

    @property
    def num_loaded(self) -> int:
        """How many model tensors hold checkpoint values: copied, or filled through a tie."""
        return len(self.loaded) + len(self.tied)

    @property
    def num_tied(self) -> int:
        """How many of those were filled through a tie (they share storage with a copied one)."""
        return len(self.tied)

    @property
    def loaded_keys(self) -> tuple[str, ...]:
        """The model's keys that hold checkpoint values: loaded, or filled through a tie.

        The keys to freeze for transfer learning, when doing it by hand:

        Example:
            >>> from ckptfit.plans import Decision, Plan
            >>> plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name"),))
            >>> LoadReport.from_plan(plan).loaded_keys
            ('fc.weight',)
        """
        return tuple(d.target for d in self.loaded) + tuple(d.target for d in self.tied)

    @property
    def num_targets(self) -> int:
        """How many tensors the model has (one decision each)."""
        return len(self.loaded) + len(self.tied) + len(self.left_at_init) + len(self.skipped_shape)

    @property
    def complete(self) -> bool:
        """True when every model tensor has checkpoint values, except harmless ones.

        Harmless ones are those the matcher marked ``stage="harmless"`` (such as
        ``num_batches_tracked``). Unused checkpoint tensors do not count against this.
        """
        return not self.skipped_shape and all(d.stage == "harmless" for d in self.left_at_init)

    # ---- renderings ---------------------------------------------------------------------

    def _sections(self) -> list[_Section]:
        """The folded sections of an applied load."""
        return _sections(self.loaded, self.tied, self.left_at_init, self.skipped_shape, (), self.unused,
                         refused=False)

    def _head_lines(self, verb: str) -> list[str]:
        """The summary line and what applies to the whole load: where, container, names, stages."""
        lines = [_count_text(verb, len(self.loaded), len(self.tied), self.num_targets) + _source_text(self)]
        if self.model:
            lines.append(f"  model: {self.model}")
        where = []
        if self.device:
            where.append(f"on {self.device}")
        if self.dtype:
            where.append(f"as {self.dtype}")
        if self.bytes_read is not None:
            where.append(f"{_size_text(self.bytes_read)} read")
        if self.seconds is not None:
            where.append(f"in {self.seconds:.2f} s")
        if where:
            lines.append("  " + ", ".join(where))
        if self.integrity:
            lines.append(f"  bytes: {self.integrity}")
        if self.mode == "eval":
            lines.append("  mode: eval (as from_pretrained returns it; pass train=True to keep training mode)")
        elif self.mode == "train":
            lines.append("  mode: train (train=True)")
        if self.frozen:
            lines.append(f"  frozen: {len(self.frozen)} loaded parameters (requires_grad=False); "
                         "the others are left as they were")
        return lines + _how_lines(self, self.loaded)

    def _lines(self, verb: str, max_lines: int, max_keys: int) -> list[str]:
        lines = self._head_lines(verb)
        for section in self._sections():
            lines.extend(_section_lines(section, max_lines, max_keys))
        lines.extend(_list_lines("warning", self.warnings))
        return lines

    def to_text(self, *, max_lines: int = 12, max_keys: int = 8) -> str:
        """The human summary, with keys folded; ``str(report)`` is ``report.to_text()``.

        Args:
            max_lines: most folded lines per section before ``… N more lines``.
            max_keys: most folded patterns on one line before ``… N more``.

        Returns:
            Text of a few lines, without a trailing newline.

        Example:
            >>> from ckptfit.plans import Decision, Plan
            >>> plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name"),))
            >>> print(LoadReport.from_plan(plan).to_text())
            Loaded 1/1 tensors
        """
        return printable("\n".join(self._lines("Loaded", max_lines, max_keys)))

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data: str, int, float, bool, None, list and dict only.

        Dtypes are written as ``"float32"``, shapes as lists; every decision is listed in full
        (unfolded) under its action, and ``folded`` holds the folded key patterns.

        Returns:
            A dict that ``json.dumps`` accepts.

        Example:
            >>> from ckptfit.plans import Decision, Plan
            >>> plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name"),))
            >>> LoadReport.from_plan(plan).to_dict()["counts"]["loaded"]
            1
        """
        return {
            "path": self.path,
            "format": self.format,
            "container": self.container,
            "containers": list(self.containers),
            "container_reason": self.container_reason,
            "device": self.device,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "integrity": self.integrity,
            "model": self.model,
            "mode": self.mode,
            "frozen": list(self.frozen),
            "complete": self.complete,
            "counts": {
                "targets": self.num_targets,
                "loaded": self.num_loaded,
                "tied": self.num_tied,
                "left_at_init": len(self.left_at_init),
                "skipped_shape": len(self.skipped_shape),
                "unused": len(self.unused),
            },
            "transforms": list(self.transforms),
            "tensor_transforms": [{"kind": k, "targets": keys, "reason": why}  # ckptfit.porting
                                  for k, keys, why in _ported(self.loaded)],
            "warnings": list(self.warnings),
            "loaded": [_decision_dict(d) for d in self.loaded],
            "tied": [_decision_dict(d) for d in self.tied],
            "left_at_init": [_decision_dict(d) for d in self.left_at_init],
            "skipped_shape": [_decision_dict(d) for d in self.skipped_shape],
            "unused": [{"source": u.source, "reason": u.reason, "shape": list(u.shape)} for u in self.unused],
            "folded": {
                "loaded": fold_keys(d.target for d in self.loaded),
                "tied": fold_keys(d.target for d in self.tied),
                "left_at_init": fold_keys(d.target for d in self.left_at_init),
                "skipped_shape": fold_keys(d.target for d in self.skipped_shape),
                "unused": fold_keys(u.source for u in self.unused),
            },
        }

    def __rich__(self) -> Group:
        """A rich renderable: the summary line and a Key | Status | Detail table, keys folded."""
        return _rich_group(self, self._head_lines("Loaded"), ())


def _count_text(verb: str, copied: int, tied: int, targets: int) -> str:
    """``Loaded 29/29 tensors (1 tied)``: tied tensors hold the checkpoint's values too, so they count."""
    return f"{verb} {copied + tied}/{targets} tensors" + (f" ({tied} tied)" if tied else "")


def _source_text(x: LoadReport | Plan) -> str:
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


def _how_lines(x: LoadReport | Plan, loaded: Sequence[Decision]) -> list[str]:
    """How names were reconciled: the container chosen, name transforms, tensor transforms, stages."""
    lines = []
    if x.container_reason and len(x.containers) > 1:
        lines.append(f"  container: {x.container_reason}")
    if x.transforms:
        lines.append("  names: " + "; ".join(x.transforms))
    for kind, keys, why in _ported(loaded):  # tensors transposed, split or joined (ckptfit.porting)
        lines.append(f"  {kind}: {', '.join(fold_keys(keys))} — {why}")
    stages = _group(sorted(loaded, key=lambda d: _STAGE_ORDER.get(d.stage, 99)), lambda d: d.stage)
    if stages and (len(stages) > 1 or "exact" not in stages):
        counts = (f"{len(g)} {_STAGE_LABELS.get(str(s), str(s))}" for s, g in stages.items())
        lines.append("  matched: " + ", ".join(counts))
    return lines


def _ported(decisions: Sequence[Decision]) -> list[tuple[str, list[str], str]]:
    """``[(kind, model keys, reason)]`` of the decisions that carry a transform, by kind and reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for d in decisions:
        t = getattr(d, "transform", None)
        if t is not None:
            groups.setdefault((t.kind, t.reason), []).append(d.target)
    return [(k, keys, why) for (k, why), keys in groups.items()]


def _rows_by_reason(decisions: Sequence[Decision], status: str) -> tuple[_Row, ...]:
    return tuple(
        _Row(tuple(fold_keys(d.target for d in group)), status, str(reason))
        for reason, group in _group(decisions, lambda d: d.reason).items()
    )


def _cap(items: Sequence[str], limit: int, unit: str) -> list[str]:
    if limit <= 0 or len(items) <= limit:
        return list(items)
    return [*items[: limit - 1], f"… {len(items) - limit + 1} more {unit}"]


def _row_text(row: _Row, max_keys: int) -> str:
    keys = ", ".join(_cap(row.keys, max_keys, "patterns"))
    return f"{keys} — {row.detail}" if row.detail else keys


def _section_lines(section: _Section, max_lines: int, max_keys: int) -> list[str]:
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
            return [head, *_cap([f"    {pair}" for pair, _ in pairs], max_lines, "lines")]
        body = [f"    {pair} — {detail}" for pair, detail in pairs]
        return [f"{title}:", *_cap(body, max_lines, "lines")]
    if len(rows) == 1:
        return [f"{title}: {_row_text(rows[0], max_keys)}"]
    return [f"{title}:", *_cap([f"    {_row_text(row, max_keys)}" for row in rows], max_lines, "lines")]


def _list_lines(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    if len(items) == 1:
        return [f"  {title}: {items[0]}"]
    return [f"  {title}s:", *(f"    {item}" for item in items)]


# A dotted key inside a message: two or more name segments, not a number like 1.5.
_KEY_IN_TEXT = re.compile(r"(?<![\w.])(?:[A-Za-z_][\w\-]*|\d+)(?:\.[\w\-]+)+(?![\w.])")


def _fold_messages(messages: Sequence[str]) -> list[str]:
    """Fold messages that differ only in one dotted key: ``'a.0.w' missing`` x3 -> ``'a.{0..2}.w' missing``."""
    groups: dict[str, list[str]] = {}
    order: list[tuple[str, str | None]] = []
    for message in messages:
        keys = {m.group(0) for m in _KEY_IN_TEXT.finditer(message) if not re.fullmatch(r"[\d.]+", m.group(0))}
        if len(keys) != 1:
            order.append((message, None))
            continue
        key = keys.pop()
        template = message.replace(key, "\x00")
        if template not in groups:
            order.append((template, key))
            groups[template] = []
        groups[template].append(key)
    out: list[str] = []
    for text, key in order:
        if key is None:
            out.append(text)
            continue
        keys = groups[text]
        folded = fold_keys(keys) if len(keys) > 1 else keys
        out.append(text.replace("\x00", ", ".join(folded)))
    return out


def render_plan(plan: Plan, *, max_lines: int = 12, max_keys: int = 8) -> str:
    """The human text of a plan that has not been applied: a dry run, ``ckptfit plan``.

    A plan that can be applied reads like ``str(LoadReport)``, headed ``Would load``. A refused
    plan is headed ``Refused: would load N/M tensors ... — K problems`` and lists each problem
    once: the tensors of another shape and the missing ones in their sections, then only the
    problems no section shows (messages that differ in one key folded into one line), the
    warnings, and the suggestions last.

    Args:
        plan: the plan to describe.
        max_lines: most folded lines per section.
        max_keys: most folded patterns on one line.

    Returns:
        Text of a few lines, without a trailing newline.

    Example:
        >>> from ckptfit.plans import Decision, Plan
        >>> plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name"),))
        >>> print(render_plan(plan))
        Would load 1/1 tensors
    """
    lines = _refusal_lines(plan, max_lines, max_keys) if not plan.ok else \
        LoadReport.from_plan(plan)._lines("Would load", max_lines, max_keys)
    if plan.partial:
        lines.insert(1, "  partial=True: tensors that nothing fills stay at their init")
    lines.extend(_list_lines("suggestion", _cap(list(plan.suggestions), max_lines, "suggestions")))
    return printable("\n".join(lines))


def _refusal_lines(plan: Plan, max_lines: int, max_keys: int, tail: str = "") -> list[str]:
    """A refused plan, suggestions aside: the headline, the sections, the problems no section shows."""
    n = len(plan.problems)
    loads, tied = plan.by_action("load"), plan.by_action("tied")
    # a refusal says so first: the count that follows is what would have loaded, not what did
    head = _count_text("Refused: would load", len(loads), len(tied), len(plan.decisions))
    lines = [f"{head}{_source_text(plan)} — {n} problem{'s' if n != 1 else ''}{tail}", *_how_lines(plan, loads)]
    advice = " ".join(plan.suggestions)
    missing = tuple(_see_suggestion(d, advice) for d in plan.by_action("missing"))
    kept = tuple(d for d in plan.by_action("keep") if d.stage != "harmless")  # harmless ones are no news here
    # checkpoint tensors an ambiguity leaves unused are the other side of a problem the sections show
    # (and those a missing tensor's reason names already: another dtype kind)
    named = {d.source for d in missing if d.source}
    unused = tuple(u for u in plan.unused if not u.reason.startswith("ambiguous") and u.source not in named)
    for section in _sections(loads, tied, kept, plan.by_action("skip_shape"), missing, unused,
                             refused=not plan.partial):
        lines.extend(_section_lines(section, max_lines, max_keys))
    shown = {d.target for d in plan.decisions if d.action in ("skip_shape", "missing")}
    rest = [p for p in plan.problems if p.split(": ", 1)[0] not in shown]
    lines.extend(_list_lines("problem", _cap(_fold_messages(rest), max_lines, "problems")))
    lines.extend(_list_lines("warning", plan.warnings))
    return lines


def _see_suggestion(d: Decision, advice: str) -> Decision:
    """A missing tensor whose reason a suggestion repeats in full says so instead (each problem once)."""
    reason = d.reason.removeprefix("ambiguous: ").removesuffix("; nothing loaded through them")
    if reason != d.reason and reason in advice:
        return replace(d, reason="ambiguous: which checkpoint module fills it is not settled (see the suggestion)")
    return d


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A plan as JSON-ready data (``ckptfit plan --json``): every decision, the problems and suggestions.

    Example:
        >>> from ckptfit.plans import Decision, Plan
        >>> plan_to_dict(Plan((Decision("w", "missing", None, "none", "not in the checkpoint"),),
        ...                   problems=("w: not in the checkpoint",)))["ok"]
        False
    """
    loads, tied = plan.by_action("load"), plan.by_action("tied")
    left = tuple(d for d in plan.decisions if d.action in ("keep", "missing"))
    skipped = plan.by_action("skip_shape")
    return {
        "path": plan.path, "format": plan.format, "container": plan.container,
        "containers": list(plan.containers), "container_reason": plan.container_reason,
        "ok": plan.ok, "partial": plan.partial,
        "counts": {"targets": len(plan.decisions), "loaded": len(loads) + len(tied), "tied": len(tied),
                   "left_at_init": len(left), "skipped_shape": len(skipped), "unused": len(plan.unused)},
        "transforms": list(plan.transforms),
        "problems": list(plan.problems), "suggestions": list(plan.suggestions), "warnings": list(plan.warnings),
        "loaded": [_decision_dict(d) for d in loads],
        "tied": [_decision_dict(d) for d in tied],
        "left_at_init": [_decision_dict(d) for d in left],
        "skipped_shape": [_decision_dict(d) for d in skipped],
        "unused": [{"source": u.source, "reason": u.reason, "shape": list(u.shape)} for u in plan.unused],
        "tensor_transforms": [{"kind": k, "targets": keys, "reason": why} for k, keys, why in _ported(loads)],
        "folded": {
            "loaded": fold_keys(d.target for d in loads),
            "tied": fold_keys(d.target for d in tied),
            "left_at_init": fold_keys(d.target for d in left),
            "skipped_shape": fold_keys(d.target for d in skipped),
            "unused": fold_keys(u.source for u in plan.unused),
        },
    }


def refusal_error(plan: Plan, *, max_lines: int = 12, max_keys: int = 8) -> LoadError:
    """The :class:`~ckptfit.errors.LoadError` of a refused plan: the refusal once, the suggestions last.

    Its ``hint`` holds the suggestions (one per line); a plan with none gets a hint that points
    further (``ckptfit plan``, ``ckptfit identify``), so every refusal says what to do next.
    """
    lines = _refusal_lines(plan, max_lines, max_keys, tail="; the model was not changed")
    hint = "\n".join(plan.suggestions) if plan.suggestions else _fallback_hint(plan)
    return LoadError(printable("\n".join(lines)), path=plan.path, hint=printable(hint), problems=plan.problems,
                     plan=plan)


def _fallback_hint(plan: Plan) -> str:
    where = plan.path or "PATH"
    if not plan.by_action("load"):
        return (f"check that this is the right file for this model: `ckptfit identify {where}` says which "
                f"architecture the file holds, `ckptfit inspect {where}` lists its tensors")
    return f"run `ckptfit plan {where} --model SPEC` to see every decision and its reason"


def _rich_group(report: LoadReport, head: Sequence[str], problems: Sequence[str]) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text as _Text

    def Text(text: str = "", **kw: Any) -> _Text:  # noqa: N802 - every string from the file, made safe
        return _Text(printable(text), **kw)

    styles = {
        "loaded": "green",
        "tied": "cyan",
        "left at init": "yellow",
        "shape differs": "yellow",
        "missing": "bold red",
        "unused": "magenta",
    }
    table = Table("Key", "Status", "Detail", header_style="bold")
    # Loads whose names need no checking are counted, not listed.
    plain = [d for d in report.loaded if not (d.stage in _LISTED_STAGES and d.source != d.target)]
    for stage, group in _group(plain, lambda d: d.stage).items():
        label = _STAGE_LABELS.get(str(stage), str(stage))
        count = f"({len(group)} tensor{'s' if len(group) != 1 else ''})"
        table.add_row(Text(count, style="dim"), Text("loaded", style="green"), Text(label))
    for section in report._sections():
        for row in section.rows:
            status = Text(row.status, style=styles.get(row.status, ""))
            table.add_row(Text("\n".join(row.keys)), status, Text(row.detail))
    parts: list[Any] = [Text(head[0], style="bold"), *(Text(line) for line in head[1:]), table]
    parts.extend(Text(f"warning: {w}", style="yellow") for w in report.warnings)
    parts.extend(Text(f"problem: {p}", style="red") for p in problems)
    return Group(*parts)
