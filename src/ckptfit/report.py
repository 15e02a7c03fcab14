"""The LoadReport: what a load did, and its renderings (text, JSON-ready dict, rich table).

A :class:`LoadReport` is made from the :class:`~ckptfit.plans.Plan` that was applied, plus
where the tensors went (device, dtype) and what it cost (seconds, bytes). It is plain
frozen data; rendering is kept apart from computing, and every rendering folds keys
(``layer{1..4}.{0,1}.conv1.weight``) so that it stays short at any model size.
:func:`render_plan` and :func:`plan_to_dict` give the text and JSON of a plan that has not been
applied (a dry run). A refused plan has its own rendering (:mod:`ckptfit.refusal`: one headline,
each problem once, the suggestions last); the pieces both share are in :mod:`ckptfit.rendering`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .keyfolding import fold_keys
from .plans import Decision, Plan, Unused
from .refusal import refusal_error, refusal_lines
from .rendering import (LISTED_STAGES, STAGE_LABELS, Section, cap, count_text, decision_dict, dtype_text,
                        fold_sections, group_by, how_lines, human_bytes, list_lines, ported, printable,
                        section_lines, source_text)

if TYPE_CHECKING:  # torch for annotations only: describing a checkpoint never imports torch
    import torch
    from rich.console import Group

# refusal_error (ckptfit.refusal) and printable (ckptfit.rendering) stay importable from here.
__all__ = ["LoadReport", "render_plan", "plan_to_dict", "refusal_error", "printable"]


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
            dtype=dtype_text(dtype),
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

    def _sections(self) -> list[Section]:
        """The folded sections of an applied load."""
        return fold_sections(self.loaded, self.tied, self.left_at_init, self.skipped_shape, (), self.unused,
                             refused=False)

    def _head_lines(self, verb: str) -> list[str]:
        """The summary line and what applies to the whole load: where, container, names, stages."""
        lines = [count_text(verb, len(self.loaded), len(self.tied), self.num_targets) + source_text(self)]
        if self.model:
            lines.append(f"  model: {self.model}")
        where = []
        if self.device:
            where.append(f"on {self.device}")
        if self.dtype:
            where.append(f"as {self.dtype}")
        if self.bytes_read is not None:
            where.append(f"{human_bytes(self.bytes_read)} read")
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
        return lines + how_lines(self, self.loaded)

    def _lines(self, verb: str, max_lines: int, max_keys: int) -> list[str]:
        lines = self._head_lines(verb)
        for section in self._sections():
            lines.extend(section_lines(section, max_lines, max_keys))
        lines.extend(list_lines("warning", self.warnings))
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
                                  for k, keys, why in ported(self.loaded)],
            "warnings": list(self.warnings),
            "loaded": [decision_dict(d) for d in self.loaded],
            "tied": [decision_dict(d) for d in self.tied],
            "left_at_init": [decision_dict(d) for d in self.left_at_init],
            "skipped_shape": [decision_dict(d) for d in self.skipped_shape],
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
    lines = refusal_lines(plan, max_lines, max_keys) if not plan.ok else \
        LoadReport.from_plan(plan)._lines("Would load", max_lines, max_keys)
    if plan.partial:
        lines.insert(1, "  partial=True: tensors that nothing fills stay at their init")
    lines.extend(list_lines("suggestion", cap(list(plan.suggestions), max_lines, "suggestions")))
    return printable("\n".join(lines))


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
        "loaded": [decision_dict(d) for d in loads],
        "tied": [decision_dict(d) for d in tied],
        "left_at_init": [decision_dict(d) for d in left],
        "skipped_shape": [decision_dict(d) for d in skipped],
        "unused": [{"source": u.source, "reason": u.reason, "shape": list(u.shape)} for u in plan.unused],
        "tensor_transforms": [{"kind": k, "targets": keys, "reason": why} for k, keys, why in ported(loads)],
        "folded": {
            "loaded": fold_keys(d.target for d in loads),
            "tied": fold_keys(d.target for d in tied),
            "left_at_init": fold_keys(d.target for d in left),
            "skipped_shape": fold_keys(d.target for d in skipped),
            "unused": fold_keys(u.source for u in plan.unused),
        },
    }


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
    plain = [d for d in report.loaded if not (d.stage in LISTED_STAGES and d.source != d.target)]
    for stage, group in group_by(plain, lambda d: d.stage).items():
        label = STAGE_LABELS.get(str(stage), str(stage))
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
