"""What :func:`~ckptfit.identify` returns: ranked :class:`Candidate` architectures in an :class:`Identification`."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..rendering import printable

__all__ = ["Candidate", "Identification"]


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
        return printable("\n".join(lines))
