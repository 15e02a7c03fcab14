"""ckptfit: put any PyTorch checkpoint into a model, correctly, safely and fast, and say what it did.

Example:
    >>> import ckptfit                                              # doctest: +SKIP
    >>> report = ckptfit.load(model, "checkpoint.pth")              # doctest: +SKIP
    >>> print(report)                                               # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, for type checkers and IDEs; at run time they load on first use
    from .auto import from_checkpoint as from_checkpoint
    from .checkpoint import Checkpoint as Checkpoint
    from .checkpoint import StateDictCandidate as StateDictCandidate
    from .errors import CheckpointError as CheckpointError
    from .errors import CorruptCheckpoint as CorruptCheckpoint
    from .errors import LoadError as LoadError
    from .errors import NotACheckpoint as NotACheckpoint
    from .errors import ResourceLimitExceeded as ResourceLimitExceeded
    from .errors import UnsafeCheckpoint as UnsafeCheckpoint
    from .errors import UnsupportedFormat as UnsupportedFormat
    from .lazy import LazyTensor as LazyTensor
    from .loading import build as build
    from .loading import load as load
    from .loading import open as open
    from .loading import plan as plan
    from .plan import Decision as Decision
    from .plan import Plan as Plan
    from .report import LoadReport as LoadReport
    from .resuming import ResumeReport as ResumeReport
    from .resuming import resume as resume
    from .verification import VerifyResult as VerifyResult
    from .verification import verify as verify

# Public name -> module that defines it. Importing ``ckptfit`` stays cheap (no torch) until a
# verb is used, so ``ckptfit --help`` and ``from ckptfit.errors import ...`` are instant.
_LAZY = {
    "from_checkpoint": ".auto",
    "Checkpoint": ".checkpoint",
    "StateDictCandidate": ".checkpoint",
    "CheckpointError": ".errors",
    "CorruptCheckpoint": ".errors",
    "LoadError": ".errors",
    "NotACheckpoint": ".errors",
    "ResourceLimitExceeded": ".errors",
    "UnsafeCheckpoint": ".errors",
    "UnsupportedFormat": ".errors",
    "LazyTensor": ".lazy",
    "build": ".loading",
    "load": ".loading",
    "open": ".loading",
    "plan": ".loading",
    "Decision": ".plan",
    "Plan": ".plan",
    "LoadReport": ".report",
    "ResumeReport": ".resuming",
    "resume": ".resuming",
    "VerifyResult": ".verification",
    "verify": ".verification",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps public verbs (``ckptfit.plan``, ``ckptfit.verify``) from being shadowed by the
    submodules of the same name when those are imported (they stay in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

def _warm_up() -> None:
    """Import what the first load needs (the loader with its distributed check, format readers), ~20 ms, once."""
    for name in ("load", "from_checkpoint"):
        __getattr__(name)
    importlib.import_module(".formats", __name__).readers()


if "torch" in sys.modules:  # torch is paid for already: load the library now, not inside the first call
    _warm_up()


__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open",
    "load",
    "plan",
    "build",
    "from_checkpoint",
    "verify",
    "resume",
    "Checkpoint",
    "StateDictCandidate",
    "LazyTensor",
    "Plan",
    "Decision",
    "LoadReport",
    "ResumeReport",
    "VerifyResult",
    "CheckpointError",
    "NotACheckpoint",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "ResourceLimitExceeded",
    "LoadError",
]
