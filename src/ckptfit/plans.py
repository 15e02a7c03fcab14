"""The Plan: what goes where, decided from names, shapes and dtypes alone, with a reason each.

A :class:`Plan` is what the matcher (:mod:`ckptfit.matching`) returns and what the loader
(:mod:`ckptfit.loading`) applies. It holds one :class:`Decision` per target tensor, in the
target's own order, and one :class:`Unused` per checkpoint tensor that goes nowhere.
Nothing here reads tensor bytes; it is all plain data and can be printed, compared and
turned into JSON.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: describing a checkpoint never imports torch
    import torch

__all__ = ["TensorSpec", "Transform", "Decision", "Unused", "Plan", "Action", "Stage"]

Action = Literal["load", "tied", "keep", "skip_shape", "missing"]
"""What happens to one target tensor.

- ``load``: filled from ``Decision.source``.
- ``tied``: shares storage with another target tensor that is loaded; filled through the tie.
- ``keep``: left at its init, and that is harmless (``num_batches_tracked``, excluded by the
  user, or missing under ``partial=True``).
- ``skip_shape``: the checkpoint has a tensor for it but of another shape; never loaded.
- ``missing``: nothing in the checkpoint fills it; an error unless ``partial=True``.
"""

Stage = Literal["exact", "rule", "prefix", "structural", "tie", "harmless", "user", "port", "none"]
"""Which matcher stage took the decision."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor described without its data: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(map(int, self.shape)))


@dataclass(frozen=True)
class Transform:
    """A change of layout applied to checkpoint data while it is loaded (see :mod:`ckptfit.porting`).

    Attributes:
        kind: ``"transpose"`` (a 2-D weight stored the other way round, e.g. GPT-2's ``Conv1D``
            ``[in, out]`` into ``nn.Linear`` ``[out, in]``), ``"split"`` (one part of a fused
            tensor such as ``qkv``) or ``"concat"`` (separate tensors joined into a fused one).
        detail: what is done, human readable (``"part 2 of 3 (k) along dim 0"``).
        reason: the evidence, or the user's rule, that chose it.
        sources: for ``concat``: every checkpoint key joined, in order.
        part: for ``split``: which part (0-based); ``parts``: how many.
        dim: the dimension split or joined, in the model's layout.
        transpose: for ``split`` / ``concat``: the checkpoint tensors are transposed first.
        sizes: for ``split`` into parts of different sizes (grouped-query attention): each part's size.
        rows: for ``class_map`` (``class_map=``, :mod:`ckptfit._class_map`): the file's row for each
            of the model's rows, ``None`` for a new class's row, which keeps the model's init.
    """

    kind: Literal["transpose", "split", "concat", "adapt", "class_map"]  # adapt: adapt="in_chans" (ckptfit._adapt)
    detail: str
    reason: str
    sources: tuple[str, ...] = ()
    part: int = 0
    parts: int = 1
    dim: int = 0
    transpose: bool = False
    sizes: tuple[int, ...] = ()  # for ``split``: the parts' sizes along ``dim`` when they differ
    rows: tuple[int | None, ...] = ()  # for ``class_map``: the file's row of each model row (None: at init)


@dataclass(frozen=True)
class Decision:
    """What happens to one target tensor, and why."""

    target: str
    action: Action
    source: str | None
    stage: Stage
    reason: str
    target_shape: tuple[int, ...] = ()
    source_shape: tuple[int, ...] | None = None
    target_dtype: torch.dtype | None = None
    source_dtype: torch.dtype | None = None
    tied_to: str | None = None  # for action == "tied": the target key that carries the values
    transform: Transform | None = None  # a change of layout applied while loading (ckptfit.porting)
    # for stage == "structural": what carried the alignment: "name", "name and order", "order"
    # (among look-alike siblings, numbered alike) or "unique signature" (nothing else has these shapes)
    evidence: str | None = None


@dataclass(frozen=True)
class Unused:
    """A checkpoint tensor that is not loaded anywhere, and why."""

    source: str
    reason: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Every decision of one load, before any tensor byte is read.

    Attributes:
        decisions: one per target tensor, in the target's state_dict order.
        unused: checkpoint tensors that go nowhere.
        transforms: the name transforms applied, human readable ("strip 'module.'").
        problems: reasons the load must fail (empty means the plan can be applied).
        suggestions: what the user could do about the problems (a rule, ``partial=True``).
        warnings: things worth knowing that are not problems.
        partial: whether the plan was made with ``partial=True``.
        container: which state dict inside the file was used (``"state_dict"``, ``""`` = the root).
        containers: every candidate state dict the file holds.
        container_reason: why this container was chosen.
        format: the checkpoint's format, when known.
        path: the checkpoint's path, when known.
    """

    decisions: tuple[Decision, ...]
    unused: tuple[Unused, ...] = ()
    transforms: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    partial: bool = False
    container: str | None = None
    containers: tuple[str, ...] = ()
    container_reason: str = ""
    format: str | None = None
    path: str | None = None

    @property
    def ok(self) -> bool:
        """True when the plan can be applied: no problem was found."""
        return not self.problems

    def by_action(self, action: Action) -> tuple[Decision, ...]:
        """The decisions with the given action, in target order."""
        return tuple(d for d in self.decisions if d.action == action)

    @property
    def loads(self) -> tuple[Decision, ...]:
        """The decisions that copy a checkpoint tensor into the model."""
        return self.by_action("load")

    def __str__(self) -> str:
        """The same text ``ckptfit plan`` prints: what would load, from where, and why not."""
        from .report import render_plan

        return render_plan(self)

    def mapping(self) -> dict[str, str]:
        """``{target_key: source_key}`` for every tensor that is loaded."""
        return {d.target: d.source for d in self.decisions if d.action == "load" and d.source is not None}
