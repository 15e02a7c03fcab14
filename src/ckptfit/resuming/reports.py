"""What :func:`~ckptfit.resume` returns (:class:`ResumeReport`, one :class:`OptimizerMapping` per
optimizer) and what ``ckptfit plan --resume`` shows (:class:`ResumePlan`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..keyfolding import fold_keys
from ..report import LoadReport

__all__ = ["OptimizerMapping", "ResumePlan", "ResumeReport"]


@dataclass(frozen=True)
class OptimizerMapping:
    """How one saved optimizer state was put onto the new optimizer's parameters.

    Attributes:
        where: the state's place in the checkpoint (``"optimizer_state_dict"``, ``"optimizer.pt"``).
        rule: how the saved parameter ids were named (``"parameter order"``, ...).
        mapped: ``(model parameter, checkpoint parameter)`` pairs whose state was restored.
        fresh: ``(model parameter, why)``: parameters that start with fresh optimizer state.
        dropped: ``(checkpoint parameter, why)``: saved states that went nowhere.
        groups: number of parameter groups (saved, new).
        hyperparams: what happened to the groups' hyper-parameters (lr, betas ...).
        problems: why the state cannot be restored (empty when it was or can be).
    """

    where: str
    rule: str
    mapped: tuple[tuple[str, str], ...] = ()
    fresh: tuple[tuple[str, str], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    groups: tuple[int, int | None] = (0, None)
    hyperparams: str = ""
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the state can be restored as mapped."""
        return not self.problems

    def lines(self, verb: str = "mapped") -> list[str]:
        """The human summary, keys folded, one item per line."""
        saved, new = self.groups
        groups = f"{saved} group{'s' if saved != 1 else ''}"
        if new is not None and new != saved:
            groups += f" saved, {new} now"
        head = f"optimizer {self.where!r} ({groups}): "
        if self.problems:
            out = [head + "— refused"]
            out += [f"  {p}" for p in self.problems]
            return out
        total = len(self.mapped) + len(self.dropped)
        out = [head + f"{len(self.mapped)}/{total} parameter states {verb} by {self.rule}"]
        for title, items in (("fresh state", self.fresh), ("dropped", self.dropped)):
            if not items:
                continue
            out.append(f"  {title} ({len(items)}):")
            by_reason: dict[str, list[str]] = {}
            for key, why in items:
                by_reason.setdefault(why, []).append(key)
            for why, keys in by_reason.items():
                out.append(f"    {', '.join(fold_keys(keys))} — {why}")
        if self.hyperparams:
            out.append(f"  hyper-parameters: {self.hyperparams}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "rule": self.rule, "mapped": [list(p) for p in self.mapped],
                "fresh": [list(p) for p in self.fresh], "dropped": [list(p) for p in self.dropped],
                "groups": list(self.groups), "hyperparams": self.hyperparams, "problems": list(self.problems),
                "ok": self.ok}


@dataclass(frozen=True)
class ResumeReport:
    """What :func:`resume` restored: the model (a :class:`LoadReport`), optimizer, scheduler, scaler, RNG, counters.

    Attributes:
        path: the checkpoint file or folder.
        layout: the training-checkpoint layout recognised (``"PyTorch tutorial dict"``, ``"timm"``,
            ``"Lightning"``, ``"Hugging Face Trainer folder"``, ``"training dict"``).
        model: the report of the model's load.
        optimizers: one :class:`OptimizerMapping` per optimizer restored.
        schedulers: one line per LR scheduler (restored, or why not).
        scaler: what happened to the AMP grad scaler, if one was passed or saved.
        rng: the random number generators restored (``"torch"``, ``"cuda"``, ``"numpy"``, ``"python"``).
        epoch: the epoch counter as saved, if any.
        step: the global step as saved, if any.
        loss: the loss as saved, if any.
        notes: anything else worth knowing (parts of the file not restored, and why).
    """

    path: str
    layout: str
    model: LoadReport
    optimizers: tuple[OptimizerMapping, ...] = ()
    schedulers: tuple[str, ...] = ()
    scaler: str | None = None
    rng: tuple[str, ...] = ()
    epoch: int | float | None = None
    step: int | None = None
    loss: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def optimizer(self) -> OptimizerMapping | None:
        """The first (usually only) optimizer's mapping."""
        return self.optimizers[0] if self.optimizers else None

    def to_text(self) -> str:
        """The human summary; ``str(report)`` is this."""
        lines = [f"Resumed from {os.path.basename(self.path.rstrip(os.sep)) or self.path} ({self.layout})"]
        counters = [f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step), ("loss", self.loss))
                    if v is not None]
        if counters:
            lines.append("  " + ", ".join(counters))
        lines += ["  " + ln for ln in ("model: " + self.model.to_text()).splitlines()]
        for o in self.optimizers:
            lines += ["  " + ln for ln in o.lines("restored")]
        lines += [f"  scheduler {s}" for s in self.schedulers]
        if self.scaler:
            lines.append(f"  grad scaler: {self.scaler}")
        if self.rng:
            lines.append(f"  rng restored: {', '.join(self.rng)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"path": self.path, "layout": self.layout, "model": self.model.to_dict(),
                "optimizers": [o.to_dict() for o in self.optimizers], "schedulers": list(self.schedulers),
                "scaler": self.scaler, "rng": list(self.rng), "epoch": self.epoch, "step": self.step,
                "loss": self.loss, "notes": list(self.notes)}


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`resume` would do with a checkpoint's optimizer states (``ckptfit plan --resume``).

    Attributes:
        layout: the training-checkpoint layout recognised.
        optimizers: one :class:`OptimizerMapping` per saved optimizer state.
        restorable: other parts the file holds (schedulers, grad scaler, RNG states).
        epoch: the epoch counter as saved, if any.
        step: the global step as saved, if any.
    """

    layout: str
    optimizers: tuple[OptimizerMapping, ...] = ()
    restorable: tuple[str, ...] = ()
    epoch: int | float | None = None
    step: int | float | None = None

    @property
    def ok(self) -> bool:
        """True when every optimizer state can be mapped."""
        return all(o.ok for o in self.optimizers)

    def __str__(self) -> str:
        lines = [f"resume ({self.layout}):"]
        if not self.optimizers:
            lines.append("  the checkpoint holds no optimizer state")
        for o in self.optimizers:
            lines += ["  " + ln for ln in o.lines("would map")]
        if self.restorable:
            lines.append("  also restorable: " + ", ".join(self.restorable))
        counters = [f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step)) if v is not None]
        if counters:
            lines.append("  saved at " + ", ".join(counters))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"layout": self.layout, "ok": self.ok, "optimizers": [o.to_dict() for o in self.optimizers],
                "restorable": list(self.restorable), "epoch": self.epoch, "step": self.step}
