"""Plain pickle files (``pickle.dump`` of a dict of numpy arrays or tensors saved without torch.save).

The pickle runs on the restricted interpreter like every other; numpy arrays are rebuilt as
data and offered as tensors.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..safety import load_pickle
from . import register
from .polyglot import refuse_tar
from .numpy_file import numpy_to_tensors

if TYPE_CHECKING:
    from ..scan_walk import ScanWalk

__all__ = ["open_pickle"]


def _sniff(path: str, head: bytes) -> bool:
    return head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5


def scan_pickle(w: ScanWalk, path: str) -> None:
    """The scan hook: the whole file is one pickle (torch.load would unpickle any protocol, 0 and 1 too)."""
    from ..scan_walk import MAX_SCAN_PICKLE

    w.format = "pickle"
    if os.path.getsize(path) > MAX_SCAN_PICKLE:
        w.errors.append(f"a {os.path.getsize(path)}-byte pickle is beyond what ckptfit scans")
        return
    with open(path, "rb") as f:
        data = f.read()
    w.run(data, "pickle")


@register("pickle", sniff=_sniff, priority=1, scan=scan_pickle)
def open_pickle(path: str, trust: bool = False) -> Checkpoint:
    """Open a plain pickle file with the restricted interpreter."""
    refuse_tar(path, "a pickle")  # torch.load would read it as a tar archive instead
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    value, scan = load_pickle(memoryview(mm), member="pickle", path=path)
    tree = numpy_to_tensors(value)
    return Checkpoint(path=path, format="pickle", tree=tree, scans=(scan,))
