"""Plain pickle files (``pickle.dump`` of a dict of numpy arrays or tensors saved without torch.save).

The pickle runs on the restricted interpreter like every other; numpy arrays are rebuilt as
data and offered as tensors.
"""
from __future__ import annotations

import mmap
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..lazy import LazyTensor
from ..safety import _NumpyArray, load_pickle
from . import register

__all__ = ["open_pickle"]


def _sniff(path: str, head: bytes) -> bool:
    return head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5


def _numpy_to_tensors(obj: Any) -> Any:
    """Replace rebuilt numpy arrays by lazy tensors (iteratively, each container once)."""
    import numpy as np

    def conv(v: Any) -> Any:
        if isinstance(v, _NumpyArray):
            v = v.value
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub" and v.dtype.itemsize <= 8:
            t = torch.from_numpy(np.ascontiguousarray(v))
            return LazyTensor.of(t)
        return v

    root = [obj]
    stack: list[Any] = [root]
    seen: set[int] = set()
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        if isinstance(c, dict):
            for k, v in list(c.items()):
                nv = conv(v)
                if nv is not v:
                    c[k] = nv
                elif isinstance(v, dict | list):
                    stack.append(v)
        elif isinstance(c, list):
            for i, v in enumerate(c):
                nv = conv(v)
                if nv is not v:
                    c[i] = nv
                elif isinstance(v, dict | list):
                    stack.append(v)
    return root[0]


@register("pickle", sniff=_sniff, priority=1)
def open_pickle(path: str, trust: bool = False) -> Checkpoint:
    """Open a plain pickle file with the restricted interpreter."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    value, scan = load_pickle(memoryview(mm), member="pickle", path=path)
    tree = _numpy_to_tensors(value)
    return Checkpoint(path=path, format="pickle", tree=tree, scans=(scan,))
