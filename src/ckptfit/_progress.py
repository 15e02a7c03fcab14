"""A progress bar for long loads and conversions, shown only when it helps.

:func:`progress` returns a :class:`Progress` that is silent unless stderr is a terminal and
the work has already taken more than a second; it then shows a transient rich bar (bytes,
speed, time left) on stderr, so stdout stays clean for ``--json`` output. Set
``CKPTFIT_PROGRESS=0`` to turn it off, ``CKPTFIT_PROGRESS=1`` to force it on (drawn on stderr
even when it is not a terminal, a pipe or a log file). The same holds for the library and the
CLI, for loads, conversions, sha256 checks and remote transfers (:mod:`ckptfit._remote`).
"""
from __future__ import annotations

import os
import sys
import time
from types import TracebackType

__all__ = ["Progress", "progress"]

DELAY_S = 1.0  # a bar for work that ends sooner is noise


def _forced() -> bool | None:
    """``CKPTFIT_PROGRESS``: True (forced on), False (off) or None (not set: a terminal decides)."""
    env = os.environ.get("CKPTFIT_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return None


def _enabled() -> bool:
    forced = _forced()
    if forced is not None:
        return forced
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts work done; draws a bar once the work has lasted ``delay`` seconds.

    Use it as a context manager; :meth:`advance` is cheap enough to call per tensor.
    """

    def __init__(self, total: int, description: str, *, delay: float = DELAY_S, enabled: bool | None = None):
        self.total = max(int(total), 0)
        self.description = description
        self.done = 0
        self._delay = delay
        self._enabled = _enabled() if enabled is None else enabled
        self._force = enabled is True or (enabled is None and _forced() is True)  # drawn on a pipe too
        self._start = time.perf_counter()
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def advance(self, n: int) -> None:
        """Record ``n`` more units (bytes) done."""
        self.done += n
        if not self._enabled:
            return
        if self._bar is None:
            if time.perf_counter() - self._start < self._delay or self.done >= self.total:
                return
            self._open()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def _open(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
        except ImportError:  # rich is a dependency, but a bar is never worth failing a load
            self._enabled = False
            return
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True, force_terminal=True if self._force else None),
                                 transient=True)
        self._task = self._bar.add_task(self.description, total=self.total or None, completed=self.done)
        self._bar.start()

    @property
    def shown(self) -> bool:
        """Whether a bar has been drawn."""
        return self._bar is not None

    def close(self) -> None:
        """Remove the bar, if one was drawn."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def progress(total: int, description: str, *, delay: float = DELAY_S, enabled: bool | None = None) -> Progress:
    """A :class:`Progress` over ``total`` bytes, labelled ``description``.

    Example:
        >>> with progress(3, "loading", enabled=False) as bar:
        ...     bar.advance(3)
        >>> bar.done
        3
    """
    return Progress(total, description, delay=delay, enabled=enabled)
