"""What ``ckptfit inspect`` shows: a checkpoint described from its headers only, folded for reading.

:func:`inspect_checkpoint` opens the file lazily and summarises it; no tensor data is read,
so its time does not grow with the file's size.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .keyfolding import fold_keys
from .checkpoint import Checkpoint
from .formats import open_checkpoint
from .rendering import human_bytes, printable

# human_bytes (ckptfit.rendering) stays importable from here.
__all__ = ["Inspection", "inspect_checkpoint", "TensorGroup", "human_bytes"]


def _tensors(n: int) -> str:
    """``"1 tensor"``, ``"14 tensors"``."""
    return f"{n} tensor{'s' if n != 1 else ''}"


def _count(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


@dataclass(frozen=True)
class TensorGroup:
    """Tensors with the same shape and dtype whose names fold into one pattern."""

    pattern: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    numel: int
    nbytes: int
    device: str


@dataclass(frozen=True)
class Inspection:
    """Everything ``ckptfit inspect`` reports about one checkpoint."""

    path: str
    format: str
    size: int
    num_tensors: int
    num_bytes: int
    safety: dict
    metadata: dict
    state_dicts: tuple[dict, ...]
    default: str | None
    modules: tuple[tuple[str, int, int, int], ...]  # (top-level module, tensors, params, bytes)
    groups: tuple[TensorGroup, ...]
    tensors: tuple[tuple[str, tuple[int, ...], str, int, str], ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``format``, ``num_tensors``, ``num_bytes``, ``state_dicts``, ``safety`` and more."""
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "num_tensors": self.num_tensors,
            "num_bytes": self.num_bytes,
            "safety": self.safety,
            "metadata": self.metadata,
            "state_dicts": list(self.state_dicts),
            "default_state_dict": self.default,
            "modules": [{"name": m, "tensors": t, "params": p, "bytes": b} for m, t, p, b in self.modules],
            "groups": [{"pattern": g.pattern, "shape": list(g.shape), "dtype": g.dtype, "count": g.count,
                        "numel": g.numel, "bytes": g.nbytes, "device": g.device} for g in self.groups],
            "tensors": [{"name": n, "shape": list(s), "dtype": d, "bytes": b, "device": dev}
                        for n, s, d, b, dev in self.tensors],
        }

    def print(self, console, *, show_all: bool = False) -> None:
        """Render for a terminal (rich)."""
        from rich.table import Table
        from rich.text import Text as _Text

        def Text(text: str = "", **kw: Any) -> _Text:  # noqa: N802 - text from the file, never markup or escapes
            return _Text(printable(text), **kw)

        def safe(v: Any) -> _Text:
            return _Text(printable(v, newlines=False))

        verdict = self.safety.get("verdict", "?")
        console.print(_Text.assemble((printable(os.path.basename(self.path) or self.path, newlines=False), "bold"),
                                    f"  {self.format}, {human_bytes(self.size)} on disk, "
                                    f"{_tensors(self.num_tensors)} ({human_bytes(self.num_bytes)})"))
        console.print(Text(f"safety: {verdict}" + (f" — inert placeholders for: {', '.join(self.safety['unknown_classes'][:6])}"
                                                   + (" …" if len(self.safety["unknown_classes"]) > 6 else "")
                                                   if self.safety.get("unknown_classes") else "")))
        for a in self.safety.get("anomalies", [])[:5]:
            console.print(Text(f"  anomaly: {a}", style="yellow"))
        from ._crc import checksum_note

        if checksum_note(self.format):
            console.print(Text(f"bytes: {checksum_note(self.format)}"))
        if self.metadata:
            console.print(Text("metadata:", style="bold"))
            for k, v in list(self.metadata.items())[:20]:
                text = v if isinstance(v, str) else _short_json(v)
                console.print(safe(f"  {k}: {text}"), no_wrap=True, overflow="ellipsis")
        if self.state_dicts:
            console.print(Text("state dicts:", style="bold"))
            for sd in self.state_dicts:
                mark = "*" if sd["default"] else " "
                name = sd["name"] or "(top level)"
                console.print(Text(f" {mark} {name}: {sd['kind']}, {_tensors(sd['num_tensors'])}, "
                                   f"{human_bytes(sd['num_bytes'])} — {sd['reason']}"))
        if self.modules:
            t = Table(title=safe(f"modules of {self.default or '(top level)'!s}"), title_justify="left", box=None,
                      pad_edge=False)
            for col, j in (("module", "left"), ("tensors", "right"), ("params", "right"), ("bytes", "right")):
                t.add_column(col, justify=j)  # type: ignore[arg-type]
            for m, n, p, b in self.modules:
                t.add_row(safe(m or "(root)"), str(n), _count(p), human_bytes(b))
            console.print(t)
        if not self.tensors:
            console.print(Text("tensors: none", style="bold"))
            return
        t = Table(title="tensors" + ("" if show_all else " (same shape and dtype folded)"), title_justify="left",
                  box=None, pad_edge=False)
        for col, j in (("name", "left"), ("shape", "left"), ("dtype", "left"), ("n", "right"), ("params", "right"),
                       ("bytes", "right"), ("saved on", "left")):
            t.add_column(col, justify=j, overflow="fold")  # type: ignore[arg-type]
        if show_all:
            for n, s, d, b, dev in self.tensors:
                numel = 1
                for x in s:
                    numel *= x
                t.add_row(safe(n or "(root)"), str(list(s)), safe(d), "1", _count(numel), human_bytes(b), safe(dev))
        else:
            for g in self.groups:
                t.add_row(safe(g.pattern or "(root)"), str(list(g.shape)), safe(g.dtype), str(g.count),
                          _count(g.numel), human_bytes(g.nbytes), safe(g.device))
        console.print(t)


def _short_json(v: Any, limit: int = 160) -> str:
    import json

    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _groups(items: list[tuple[str, Any]]) -> list[TensorGroup]:
    by_sig: OrderedDict[tuple, list[tuple[str, Any]]] = OrderedDict()
    for name, t in items:
        by_sig.setdefault((t.shape, t.dtype_name, t.device), []).append((name, t))
    out: list[tuple[int, TensorGroup]] = []
    order = {name: i for i, (name, _) in enumerate(items)}
    for (shape, dtype, device), members in by_sig.items():
        names = [n for n, _ in members]
        for pattern in fold_keys(names):
            from .keyfolding import expand_pattern

            covered = expand_pattern(pattern)
            count = len(covered)
            numel = 1
            for s in shape:
                numel *= s
            first = min(order.get(c, 0) for c in covered)
            out.append((first, TensorGroup(pattern, shape, dtype, count, numel * count,
                                           members[0][1].nbytes * count, device)))
    out.sort(key=lambda x: x[0])
    return [g for _, g in out]


def _shared_prefix(names: list[str]) -> str:
    """The leading ``a.b.`` every name has, with something dotted after it (``module.`` of a
    DataParallel file, ``model.`` of a Lightning one), so that modules are listed below it."""
    if not names:
        return ""
    prefix = ""
    while True:
        first = names[0][len(prefix):]
        if "." not in first:
            return prefix
        candidate = prefix + first.split(".", 1)[0] + "."
        if not all(n.startswith(candidate) and "." in n[len(candidate):] for n in names):
            return prefix
        prefix = candidate


def summarize(ckpt: Checkpoint) -> Inspection:
    """An :class:`Inspection` of an opened checkpoint (headers only)."""
    cands = ckpt.state_dicts()
    default = next((c for c in cands if c.default), None)
    items = list(default.tensors.items()) if default is not None else list(ckpt.tensors())
    modules: OrderedDict[str, list[int]] = OrderedDict()
    shared = _shared_prefix([name for name, _ in items])
    for name, t in items:
        rest = name[len(shared):]
        top = shared + rest.split(".", 1)[0] if "." in rest else ""
        m = modules.setdefault(top, [0, 0, 0])
        m[0] += 1
        m[1] += t.numel
        m[2] += t.nbytes
    all_tensors = list(ckpt.tensors())
    return Inspection(
        path=ckpt.path,
        format=ckpt.format,
        size=ckpt.size,
        num_tensors=len(all_tensors),
        num_bytes=sum(t.nbytes for _, t in all_tensors),
        safety=ckpt.safety.to_dict(),
        metadata=ckpt.metadata,
        state_dicts=tuple({"name": c.name, "kind": c.kind, "default": c.default, "reason": c.reason,
                           "num_tensors": c.num_tensors, "num_bytes": c.num_bytes} for c in cands),
        default=default.name if default is not None else None,
        modules=tuple((k, *v) for k, v in modules.items()),  # type: ignore[misc]
        groups=tuple(_groups(items)),
        tensors=tuple((n, t.shape, t.dtype_name, t.nbytes, t.device) for n, t in items),
    )


def inspect_checkpoint(path: str | os.PathLike[str], *, trust: bool = False) -> Inspection:
    """Open ``path`` lazily and describe it (no tensor data read).

    Example:
        >>> info = inspect_checkpoint("resnet18.pth")    # doctest: +SKIP
        >>> info.format, info.num_tensors                # doctest: +SKIP
        ('torch-zip', 122)
    """
    with open_checkpoint(path, trust=trust) as ckpt:
        return summarize(ckpt)
