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
    """

    def __init__(self, detail: str, *, path: str | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.detail = detail
        self.hint = hint
        message = f"{self.path}: {detail}" if self.path else detail
        if hint:
            message = f"{message}\n  hint: {hint}"
        super().__init__(message)


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

    Attributes:
        problems: one line per problem found (all of them, not just the first).
        plan: the :class:`ckptfit.Plan` that was refused, for inspection.
    """

    def __init__(self, detail: str, *, path: str | None = None, hint: str | None = None,
                 problems: Sequence[str] = (), plan: object = None):
        self.problems = tuple(problems)
        self.plan = plan
        super().__init__(detail, path=path, hint=hint)
