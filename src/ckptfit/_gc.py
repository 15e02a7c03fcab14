"""Pausing Python's cyclic garbage collector while ckptfit builds many long-lived objects.

Opening a checkpoint of 20,000 tensors creates a few hundred thousand small objects (the
pickle's strings, tuples and dicts, one :class:`~ckptfit.lazy.LazyTensor` each, plan entries)
that all stay alive until the load ends. Each allocation counts towards the collector's
thresholds, so it runs again and again over a heap that only grows: about half the time of
opening and planning such a file went to collections that found nothing to free. Reference
counting still frees everything that is not in a cycle while the collector is paused; cycles
made meanwhile wait for the next collection after it resumes. The pickle interpreter bounds
every object it creates, garbage or not (``MAX_OBJECT_BYTES``), so pausing changes no limit.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable automatic collection for the block; re-enable it after only if it was enabled before.

    Nested and concurrent uses are safe: an inner block (or another thread) that finds the
    collector already disabled leaves it to whoever disabled it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
