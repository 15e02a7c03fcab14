"""ckptfit: put any PyTorch checkpoint into a model, correctly, safely and fast, and say what it did.

Example:
    >>> import ckptfit                                              # doctest: +SKIP
    >>> report = ckptfit.load(model, "checkpoint.pth")              # doctest: +SKIP
    >>> print(report)                                               # doctest: +SKIP
"""
from __future__ import annotations

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
from .loading import open as open  # noqa: A004 - the public verb
from .loading import plan as plan
from .plan import Decision as Decision
from .plan import Plan as Plan
from .report import LoadReport as LoadReport
from .verify import VerifyResult as VerifyResult
from .verify import verify as verify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open",
    "load",
    "plan",
    "build",
    "from_checkpoint",
    "verify",
    "Checkpoint",
    "StateDictCandidate",
    "LazyTensor",
    "Plan",
    "Decision",
    "LoadReport",
    "VerifyResult",
    "CheckpointError",
    "NotACheckpoint",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
    "UnsupportedFormat",
    "ResourceLimitExceeded",
    "LoadError",
]
