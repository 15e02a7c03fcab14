"""One exception tree for everything ckptfit refuses, each carrying where and what next.

Every error ckptfit raises on purpose derives from :class:`CheckpointError`. Its
message says what went wrong, where (file, key, shapes) and what to do next; the
structured fields (``path``, ``hint``) let a program act on it without parsing text.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "NotACheckpoint",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "ResourceLimitExceeded",
    "LoadError",
]


class CheckpointError(Exception):
    """Base class of every error ckptfit raises on purpose.

    Attributes:
        path: the file or directory concerned, if any.
        detail: what went wrong, without the hint.
        hint: what the user can do next, if anything.
        summary: the message without the hint (``detail`` with the path, named once).
    """

    _hint_label = "hint"

    def __init__(self, detail: str, *, path: str | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.detail = detail
        self.hint = hint
        # the path once: not as a prefix when the first line already names it
        named = self.path is not None and self.path in detail.split("\n", 1)[0]
        message = f"{self.path}: {detail}" if self.path and not named else detail
        self.summary = message  # the message without the hint: what went wrong, and where
        if hint:
            message = f"{message}\n{_hint_text(self._hint_label, hint)}"
        super().__init__(message)


def _hint_text(label: str, hint: str) -> str:
    """``  hint: X``, or one indented line per alternative when there are several."""
    lines = hint.splitlines()
    if len(lines) == 1:
        return f"  {label}: {hint}"
    return f"  {label}s:\n" + "\n".join(f"    {line}" for line in lines)


class NotACheckpoint(CheckpointError):
    """The input is not a checkpoint at all (empty, HTML, an LFS pointer, an image ...)."""


class CorruptCheckpoint(CheckpointError):
    """The input looks like a checkpoint but is damaged (truncated, bad CRC, inconsistent)."""


class ResourceLimitExceeded(CorruptCheckpoint):
    """The input asks for more memory, depth or size than any sane checkpoint would."""


class UnsupportedFormat(CheckpointError):
    """A recognised format, or a variant of one, that ckptfit cannot read."""


class UnsafeCheckpoint(CheckpointError):
    """The input's pickled data would run code if unpickled normally.

    Attributes:
        globals: the ``module.name`` of every dangerous callable referenced.
    """

    def __init__(self, detail: str, *, path: str | None = None, hint: str | None = None,
                 globals: Sequence[str] = ()):
        self.globals = tuple(globals)
        super().__init__(detail, path=path, hint=hint)


class LoadError(CheckpointError):
    """The checkpoint cannot be put into the model as asked; the model was left untouched.

    The message reads once: the refusal with each problem, then what to do (``suggestion:``,
    one line per alternative). ``hint`` is always set.

    Attributes:
        problems: one line per problem found (all of them, not just the first).
        plan: the :class:`ckptfit.Plan` that was refused, for inspection.
        hint: what to do, one suggestion per line; each, followed literally, loads or leads
            to a more specific message.
    """

    _hint_label = "suggestion"

    def __init__(self, detail: str, *, path: str | None = None, hint: str | None = None,
                 problems: Sequence[str] = (), plan: object = None):
        self.problems = tuple(problems)
        self.plan = plan
        if not hint:
            hint = f"run `ckptfit plan {path or 'PATH'} --model SPEC` to see every decision and its reason"
        super().__init__(detail, path=path, hint=hint)
