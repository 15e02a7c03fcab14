"""Walks over rebuilt pickle values: bounded, JSON-ready plain data for metadata, reports and messages,
and the depth check every loader applies before walking them further."""
from __future__ import annotations

import datetime
import sys
from typing import Any

from .errors import ResourceLimitExceeded
from .lazy import LazyTensor, StorageRef
from .pickle_numpy import NumpyArray
from .pickle_values import Placeholder, PlaceholderClass

__all__ = ["to_plain", "short_repr", "check_depth", "MAX_DEPTH"]


def short_repr(obj: Any, limit: int = 80) -> str:
    """A bounded rendering of a pickled value for messages (never an exponential ``repr``)."""
    text = repr(to_plain(obj, max_items=8, max_depth=3, max_nodes=40))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_plain(obj: Any, *, max_items: int = 200, max_depth: int = 6, max_nodes: int = 5000) -> Any:
    """Render a rebuilt pickle value as JSON-ready plain data (for metadata and reports).

    Tensors become ``"<tensor float32 [3, 4]>"``, placeholders ``{"__class__": "argparse.Namespace", ...}``
    with their attributes, numpy values lists/numbers; output is bounded in size and depth, and
    shared references are rendered at most once per path (no exponential walk).
    """
    budget = [max_nodes]

    def rec(o: Any, depth: int, seen: frozenset) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return "..."
        if o is None or isinstance(o, bool | int | float | str):
            if isinstance(o, str) and len(o) > 500:
                return o[:500] + "..."
            return o
        if isinstance(o, LazyTensor):
            return f"<tensor {str(o.dtype).removeprefix('torch.')} {list(o.shape)}>"
        torch = sys.modules.get("torch")  # a torch.dtype exists only once torch is imported
        if torch is not None and isinstance(o, torch.dtype):
            return str(o)
        if isinstance(o, bytes | bytearray):
            return f"<{len(o)} bytes>"
        if id(o) in seen:
            return "<cycle>"
        if depth >= max_depth:
            return "..."
        seen = seen | {id(o)}
        try:
            import numpy as np

            if isinstance(o, np.ndarray):
                return o.tolist() if o.size <= max_items and not o.dtype.hasobject else f"<ndarray {o.dtype} {list(o.shape)}>"
            if isinstance(o, np.generic):
                return o.item()
        except ImportError:  # pragma: no cover
            pass
        if isinstance(o, dict):
            out = {}
            for i, (k, v) in enumerate(o.items()):
                if i >= max_items:
                    out["..."] = f"{len(o) - max_items} more"
                    break
                out[k if isinstance(k, str) else repr(k) if not isinstance(k, int) else str(k)] = rec(v, depth + 1, seen)
            return out
        if isinstance(o, list | tuple | set | frozenset):
            seq = list(o)
            out_l = [rec(v, depth + 1, seen) for v in seq[:max_items]]
            if len(seq) > max_items:
                out_l.append(f"... {len(seq) - max_items} more")
            return out_l
        if isinstance(o, Placeholder):
            q = o.qualname
            if q.startswith("pathlib.") and o.args and all(isinstance(a, str) for a in o.args):
                import pathlib  # pure paths only: string arithmetic, no file system access

                pure = pathlib.PureWindowsPath if "Windows" in q else pathlib.PurePosixPath
                return str(pure(*o.args[:max_items]))
            d: dict[str, Any] = {"__class__": q}
            if o.args:
                d["args"] = rec(list(o.args), depth + 1, seen)
            attrs = o.attributes()
            if attrs:
                d.update({str(k): rec(v, depth + 1, seen) for k, v in list(attrs.items())[:max_items]})
            elif o.state is not None:
                d["state"] = rec(o.state, depth + 1, seen)
            if o.dict_items:
                d["items"] = rec(o.dict_items, depth + 1, seen)
            if o.list_items:
                d["list"] = rec(o.list_items, depth + 1, seen)
            return d
        if isinstance(o, PlaceholderClass):
            return f"<class {o.qualname}>"
        if isinstance(o, NumpyArray):
            return rec(o.value, depth, seen)
        if isinstance(o, datetime.date | datetime.time | datetime.timedelta):
            return str(o)
        return f"<{type(o).__name__}>"

    return rec(obj, 0, frozenset())


MAX_DEPTH = 1000  # containers nested deeper than this are refused by the loader (no checkpoint comes close)
_LEAVES = (str, bytes, int, float, bool, type(None), LazyTensor, StorageRef)


def check_depth(value: Any, *, path: str | None = None, member: str = "") -> None:
    """Refuse a rebuilt value whose containers nest more than :data:`MAX_DEPTH` deep.

    The interpreter itself is iterative, but everything that later walks the tree (key paths
    such as ``a.0.0.0...``, reports, renderings) costs at least the square of the depth, so a
    1e6-deep list, a few MB of pickle, is stopped here. Walked breadth first, each object once.
    """
    level = [value]
    seen: set[int] = set()
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            where = f" ({member})" if member else ""
            raise ResourceLimitExceeded(f"the pickled data{where} nests containers more than {MAX_DEPTH} deep",
                                        path=path, hint="no checkpoint is shaped like this; nothing was executed")
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, _LEAVES) or id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, dict):
                nxt.extend(v for v in o.values() if not isinstance(v, _LEAVES))
            elif isinstance(o, list | tuple | set | frozenset):
                nxt.extend(v for v in o if not isinstance(v, _LEAVES))
            elif isinstance(o, Placeholder):
                nxt.extend(o.args)
                nxt.append(o.state)
                nxt.extend(o.list_items)
                nxt.extend(o.dict_items.values())
                nxt.extend(o.kwargs.values())
        level = nxt
