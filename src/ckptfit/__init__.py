"""ckptfit: put any PyTorch checkpoint into a model, correctly, safely and fast, and say what it did.

The verbs: :func:`open`, :func:`plan`, :func:`load`, :func:`build`, :func:`from_checkpoint`,
:func:`verify`, :func:`resume`, :func:`identify`, :func:`convert`, :func:`scan`, :func:`diff`.
Each takes the checkpoint first (after the model, for those that fill one).

Example:
    >>> import ckptfit                                              # doctest: +SKIP
    >>> report = ckptfit.load(model, "checkpoint.pth")              # doctest: +SKIP
    >>> print(report)                                               # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, for type checkers and IDEs; at run time they load on first use
    from .auto import from_checkpoint as from_checkpoint
    from .checkpoint import Checkpoint as Checkpoint
    from .conversion import ConvertResult as ConvertResult
    from .conversion import convert as convert
    from .diffing import Diff as Diff
    from .diffing import diff_sources as diff
    from .errors import CheckpointError as CheckpointError
    from .errors import CorruptCheckpoint as CorruptCheckpoint
    from .errors import LoadError as LoadError
    from .errors import NotACheckpoint as NotACheckpoint
    from .errors import ResourceLimitExceeded as ResourceLimitExceeded
    from .errors import UnsafeCheckpoint as UnsafeCheckpoint
    from .errors import UnsupportedFormat as UnsupportedFormat
    from .identification import Identification as Identification
    from .identification import identify as identify
    from .lazy import LazyTensor as LazyTensor
    from .loading import Source as Source
    from .loading import build as build
    from .loading import load as load
    from .loading import open as open
    from .loading import plan as plan
    from .plans import Decision as Decision
    from .plans import Plan as Plan
    from .report import LoadReport as LoadReport
    from .resuming import ResumeReport as ResumeReport
    from .resuming import resume as resume
    from .scanning import ScanReport as ScanReport
    from .scanning import scan as scan
    from .state_dicts import StateDictCandidate as StateDictCandidate
    from .verification import VerifyResult as VerifyResult
    from .verification import verify as verify

# Public name -> (module that defines it, its name there). Importing ``ckptfit`` stays cheap (no
# torch) until a verb is used, so ``ckptfit --help`` and ``from ckptfit.errors import ...`` are
# instant. No submodule is named like a public name (tests/test_layout.py), so importing one
# never shadows a verb.
_LAZY: dict[str, tuple[str, str]] = {
    "from_checkpoint": (".auto", "from_checkpoint"),
    "Checkpoint": (".checkpoint", "Checkpoint"),
    "ConvertResult": (".conversion", "ConvertResult"),
    "convert": (".conversion", "convert"),
    "Diff": (".diffing", "Diff"),
    "diff": (".diffing", "diff_sources"),
    "CheckpointError": (".errors", "CheckpointError"),
    "CorruptCheckpoint": (".errors", "CorruptCheckpoint"),
    "LoadError": (".errors", "LoadError"),
    "NotACheckpoint": (".errors", "NotACheckpoint"),
    "ResourceLimitExceeded": (".errors", "ResourceLimitExceeded"),
    "UnsafeCheckpoint": (".errors", "UnsafeCheckpoint"),
    "UnsupportedFormat": (".errors", "UnsupportedFormat"),
    "Identification": (".identification", "Identification"),
    "identify": (".identification", "identify"),
    "LazyTensor": (".lazy", "LazyTensor"),
    "Source": (".loading", "Source"),
    "build": (".loading", "build"),
    "load": (".loading", "load"),
    "open": (".loading", "open"),
    "plan": (".loading", "plan"),
    "Decision": (".plans", "Decision"),
    "Plan": (".plans", "Plan"),
    "LoadReport": (".report", "LoadReport"),
    "ResumeReport": (".resuming", "ResumeReport"),
    "resume": (".resuming", "resume"),
    "ScanReport": (".scanning", "ScanReport"),
    "scan": (".scanning", "scan"),
    "StateDictCandidate": (".state_dicts", "StateDictCandidate"),
    "VerifyResult": (".verification", "VerifyResult"),
    "verify": (".verification", "verify"),
}


def __getattr__(name: str) -> Any:
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module 'ckptfit' has no attribute {name!r}")
    module, attr = entry
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    # verbs
    "open",
    "plan",
    "load",
    "build",
    "from_checkpoint",
    "verify",
    "resume",
    "identify",
    "convert",
    "scan",
    "diff",
    # types
    "Source",
    "Checkpoint",
    "StateDictCandidate",
    "LazyTensor",
    "Plan",
    "Decision",
    "LoadReport",
    "ResumeReport",
    "VerifyResult",
    "Identification",
    "ConvertResult",
    "ScanReport",
    "Diff",
    # errors
    "CheckpointError",
    "NotACheckpoint",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "ResourceLimitExceeded",
    "LoadError",
]
