"""The one checkpoint writer: safetensors or torch files, nothing lost, atomic, verified.

:func:`write_checkpoint` is what ``convert`` and ``ckptfit load --save`` write with:

- **Nothing is lost.** Only true aliases (tied weights: one storage, same offset, shape,
  stride and dtype) are written once; every other tensor is written whole, whatever it
  shares: views of one storage (``flat[:4]``, ``flat[4:]``, overlapping or not) are written as
  contiguous copies of their own, transposed tensors as their values, zero-size tensors as
  themselves. An alias is recorded: torch output keeps the tie (one storage, as
  ``torch.save`` of a tied model), safetensors output names it in
  ``__metadata__["ckptfit.aliases"]``; :attr:`Written.aliases` lists them either way.
- **Atomic.** The file is written beside the destination, fsynced and renamed into place
  (:func:`ckptfit._atomic.atomic_path`); a failure leaves the destination as it was.
- **Verified.** Before the rename, the file is opened again with ckptfit's own reader for its
  format and every tensor is compared bit for bit (NaNs included) with what was given; ties
  and metadata are checked too. A difference raises and leaves no destination.

safetensors output uses the ``safetensors`` library's ``save_file``; torch output ``torch.save``.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._atomic import atomic_path
from .errors import CheckpointError, CorruptCheckpoint
from .lazy import LazyTensor

__all__ = ["write_checkpoint", "Written", "format_for", "compare", "header_metadata", "ALIASES_KEY"]

ALIASES_KEY = "ckptfit.aliases"  # safetensors __metadata__ entry: JSON {alias: written name}
_FORMATS = ("safetensors", "torch")

Path = tuple[Any, ...]  # a key path in a tree of containers


@dataclass(frozen=True)
class Written:
    """What :func:`write_checkpoint` wrote.

    Attributes:
        path: the file written.
        format: ``"safetensors"`` or ``"torch"``.
        num_tensors: tensors in the file, aliases counted once per name.
        bytes_written: the file's size.
        aliases: ``{name: written_as}`` for tensors written once because they are the same
            tensor (tied); torch output keeps the tie, safetensors output records it.
        metadata: the metadata names written (safetensors header), read back and checked.
        verified: every tensor was re-read from the file and found bit-for-bit equal.
    """

    path: str
    format: str
    num_tensors: int
    bytes_written: int
    aliases: Mapping[str, str] = field(default_factory=dict)
    metadata: tuple[str, ...] = ()
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "num_tensors": self.num_tensors,
                "bytes_written": self.bytes_written, "aliases": dict(self.aliases), "metadata": list(self.metadata),
                "verified": self.verified}


def format_for(path: str | os.PathLike[str]) -> str:
    """The output format a file name asks for: ``*.safetensors`` -> ``"safetensors"``, anything else ``"torch"``."""
    return "safetensors" if os.fspath(path).lower().endswith(".safetensors") else "torch"


# ------------------------------------------------------------------------------------ trees

def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _leaves(obj: Any, path: Path = ()) -> list[tuple[Path, Any]]:
    """``(key path, tensor)`` for every tensor in a tree of dicts, lists and tuples, in order."""
    out: list[tuple[Path, Any]] = []
    stack: list[tuple[Path, Any]] = [(path, obj)]
    while stack:
        p, o = stack.pop()
        if isinstance(o, torch.Tensor) or _is_lazy(o):
            out.append((p, o))
        elif isinstance(o, Mapping):
            stack.extend(reversed([(p + (k,), v) for k, v in o.items()]))
        elif isinstance(o, list | tuple):
            stack.extend(reversed([(p + (i,), v) for i, v in enumerate(o)]))
    return out


def _is_lazy(o: Any) -> bool:
    return isinstance(o, LazyTensor)


def _rebuild(obj: Any, new: Mapping[Path, torch.Tensor], path: Path = ()) -> Any:
    """``obj`` with the tensor at each key path replaced by ``new[path]``; containers copied, types kept."""
    if isinstance(obj, torch.Tensor):
        return new[path]
    if isinstance(obj, Mapping):
        items = [(k, _rebuild(v, new, path + (k,))) for k, v in obj.items()]
        out: Any = collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
        if hasattr(obj, "_metadata"):  # a module state dict's version record (load_state_dict reads it)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list | tuple):
        items = [_rebuild(v, new, path + (i,)) for i, v in enumerate(obj)]
        if type(obj) in (list, tuple):
            return type(obj)(items)
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return list(items) if isinstance(obj, list) else tuple(items)
    return obj


# ------------------------------------------------------------------------------------ what to write

def _covers_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` spans its whole storage (torch.save of it writes nothing else)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``t`` in memory of its own."""
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous().cpu()  # the move to the CPU allocates new memory


def _prepare(leaves: list[tuple[Path, torch.Tensor]], fmt: str) -> tuple[dict[Path, torch.Tensor], dict[Path, Path]]:
    """The CPU tensor to write at each key path, and ``{alias: canonical}`` for true aliases.

    Tensors are grouped by the storage they view. In a group, tensors with the same offset,
    shape, stride and dtype are one tensor (tied): the first is canonical and the others get
    the very same object, so torch.save keeps the tie and safetensors writes it once. If a
    group then holds more than one distinct tensor (views of one buffer, overlapping or not),
    each becomes a contiguous copy of its own, so none is lost and none drags the others'
    bytes along. A lone view of part of a storage is copied too for torch output (torch.save
    would write the whole storage); safetensors output makes every tensor contiguous.
    """
    problems = []
    groups: dict[Any, list[tuple[Path, torch.Tensor]]] = {}
    alone: list[tuple[Path, torch.Tensor]] = []
    for path, t in leaves:
        if t.device.type == "meta":
            problems.append(f"{_name(path)!r} is on the meta device (a shape without data)")
            continue
        if t.layout != torch.strided:
            if fmt == "safetensors":
                problems.append(f"{_name(path)!r} is a {t.layout} tensor; safetensors holds dense tensors only "
                                f"(write .pt, or call .to_dense() first)")
            alone.append((path, t))
            continue
        if t.numel() == 0:
            alone.append((path, t))  # no bytes: nothing to share, nothing to tie
            continue
        groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((path, t))
    if problems:
        raise CheckpointError(f"cannot write {len(problems)} tensor(s): " + "; ".join(problems[:5]),
                              hint="load real weights into meta tensors first; write sparse tensors to .pt")
    out: dict[Path, torch.Tensor] = {}
    aliases: dict[Path, Path] = {}
    for path, t in alone:
        t = t.detach()
        out[path] = t.cpu() if t.layout != torch.strided else t.cpu().contiguous()
    for members in groups.values():
        distinct: dict[tuple, Path] = {}
        for path, t in members:
            view = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in distinct:
                aliases[path] = distinct[view]
            else:
                distinct[view] = path
        firsts = dict(members)
        share = len(distinct) > 1
        for path in distinct.values():
            t = firsts[path].detach()
            if share or (fmt == "torch" and not _covers_storage(t)):
                t = _own_copy(t)
            elif fmt == "safetensors":
                t = t.cpu().contiguous()
            else:
                t = t.cpu()
            out[path] = t
    for alias, canonical in aliases.items():
        out[alias] = out[canonical]
    return out, aliases


# ------------------------------------------------------------------------------------ verification

def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() and flat.dtype != torch.uint8 else flat


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN equals NaN and -0.0 differs from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def compare(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any], where: str) -> None:
    """Raise unless every expected tensor is in ``got`` (tensors or lazy tensors) and bit-for-bit equal.

    Raises:
        CorruptCheckpoint: naming up to five tensors that are missing or differ.
    """
    problems = []
    for k, v in expected.items():
        if k not in got:
            problems.append(f"{k}: missing from the output")
            continue
        g = got[k]
        g = g.load() if _is_lazy(g) else g
        if not _equal(v.cpu(), g):
            problems.append(f"{k}: differs after writing (output {g.dtype} {list(g.shape)}, expected {v.dtype} "
                            f"{list(v.shape)})")
    if problems:
        raise CorruptCheckpoint(f"verification of the output failed for {len(problems)} tensor(s): "
                                + "; ".join(problems[:5]), path=where,
                                hint="nothing was written; please report this with the source file")


def _read_back(path: str) -> tuple[Any, dict[str, str]]:
    """The tree ckptfit's own reader finds in ``path`` (tensors lazy), and safetensors header metadata."""
    from .formats import open_checkpoint
    from .formats.safetensors_file import read_header

    ckpt = open_checkpoint(path)
    header_md = read_header(path)[1] if ckpt.format == "safetensors" else {}
    return ckpt, header_md


def _verify(tmp: str, fmt: str, want: dict[Path, torch.Tensor], aliases: Mapping[Path, Path],
            metadata: Mapping[str, str], dest: str) -> None:
    ckpt, header_md = _read_back(tmp)
    try:
        if fmt == "safetensors":
            written = {p: t for p, t in want.items() if p not in aliases}
            got: dict[Path, Any] = {(k,): v for k, v in ckpt.tree.items()}
            extra = sorted(set(map(_name, got)) - set(map(_name, written)))
            if extra:
                raise CorruptCheckpoint(f"the output holds tensors that were not given: {', '.join(extra[:5])}",
                                        path=dest)
            if dict(header_md) != dict(metadata):
                raise CorruptCheckpoint("the output's metadata differs from what was written", path=dest)
        else:
            written = want
            got = dict(_leaves(ckpt.tree))
            ties = [a for a, c in aliases.items() if a in got and c in got and not _same_storage(got[a], got[c])]
            if ties:
                raise CorruptCheckpoint(f"the tie {_name(ties[0])} = {_name(aliases[ties[0]])} was not kept",
                                        path=dest)
        compare({_name(p): t for p, t in written.items()}, {_name(p): t for p, t in got.items()}, dest)
    finally:
        ckpt.close()


def _same_storage(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return (a.storage_key is not None and a.storage_key == b.storage_key and a.storage_offset == b.storage_offset
            and a.shape == b.shape and a.stride == b.stride)


# ------------------------------------------------------------------------------------ writing

def header_metadata(metadata: Mapping[str, Any] | None, aliases: Mapping[str, str]) -> dict[str, str]:
    """safetensors ``__metadata__``: ``format: pt``, each entry as a string (JSON unless one), the aliases."""
    out = {"format": "pt"}
    for k, v in (metadata or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    if aliases:
        out[ALIASES_KEY] = json.dumps(dict(aliases), sort_keys=True)
    return out


def _check_safetensors(tree: Any) -> dict[str, Any]:
    from .formats.safetensors_file import SAFETENSORS_DTYPES

    if not isinstance(tree, Mapping):
        raise CheckpointError(f"safetensors holds a flat mapping of names to tensors, not a {type(tree).__name__}",
                              hint="pass a state dict, or write .pt")
    bad = [f"{k!r} is a {type(v).__name__}" for k, v in tree.items() if not isinstance(v, torch.Tensor)]
    bad += [f"{k!r} is not a string" for k in tree if not isinstance(k, str)]
    if bad:
        raise CheckpointError("safetensors holds only tensors under string names: " + "; ".join(bad[:5]),
                              hint="write .pt to keep other objects, or pass the state dict alone")
    known = set(SAFETENSORS_DTYPES.values())  # dtype names
    odd = [f"{k!r} ({v.dtype})" for k, v in tree.items() if str(v.dtype).removeprefix("torch.") not in known]
    if odd:
        raise CheckpointError(f"safetensors cannot hold the dtype of {', '.join(odd[:5])}",
                              hint="write torch format instead (.pt, --format torch)")
    return dict(tree)


def _write_safetensors_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _write_torch_file(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_checkpoint(path: str | os.PathLike[str], obj: Any, *, format: str | None = None,  # noqa: A002
                     metadata: Mapping[str, Any] | None = None,
                     source: str | os.PathLike[str] | None = None) -> Written:
    """Write tensors (a state dict, or for torch output any tree of containers) atomically, and verify them.

    Args:
        path: the file to write.
        obj: for safetensors a mapping of names to tensors; for torch any tree of dicts, lists
            and tuples holding tensors and plain data (a whole training checkpoint).
        format: ``"safetensors"`` or ``"torch"``; default from the name (:func:`format_for`).
        metadata: safetensors only: header metadata (non-strings are JSON-encoded); torch
            output keeps its metadata inside ``obj``.
        source: the file the data was read from, if any; writing over it is refused.

    Returns:
        A :class:`Written`: aliases, metadata written, size, ``verified=True``.

    Raises:
        CheckpointError: what cannot be written (not a flat mapping for safetensors, a dtype
            safetensors cannot hold, a meta tensor), or the output differs when read back
            (then the destination is left as it was).

    Example:
        >>> written = write_checkpoint("model.safetensors", model.state_dict())   # doctest: +SKIP
        >>> written.aliases                                                     # doctest: +SKIP
        {'lm_head.weight': 'embed.weight'}
    """
    fmt = (format or format_for(path)).lower()
    if fmt not in _FORMATS:
        raise CheckpointError(f"unknown output format {format!r}", hint="use safetensors or torch")
    if metadata and fmt != "safetensors":
        raise CheckpointError("metadata= is for safetensors output; torch output keeps metadata inside the "
                              "object written", hint="put it into the dict you write")
    if fmt == "safetensors":
        obj = _check_safetensors(obj)
    leaves = _leaves(obj)
    lazy = [_name(p) for p, t in leaves if _is_lazy(t)]
    if lazy:
        raise CheckpointError(f"write_checkpoint takes loaded tensors; {lazy[0]!r} is lazy", hint="call .load()")
    prepared, alias_paths = _prepare(leaves, fmt)
    aliases = {_name(a): _name(c) for a, c in alias_paths.items()}
    dest = os.path.abspath(os.fspath(path))
    header: dict[str, str] = {}
    with atomic_path(dest, source=source) as tmp:
        if fmt == "safetensors":
            header = header_metadata(metadata, aliases)
            unique = {p[0]: t for p, t in prepared.items() if p not in alias_paths}
            _write_safetensors_file(unique, tmp, header)
        else:
            _write_torch_file(_rebuild(obj, prepared), tmp)
        _verify(tmp, fmt, prepared, alias_paths, header, dest)
        size = os.path.getsize(tmp)
    return Written(dest, fmt, len(leaves), size, aliases, tuple(str(k) for k in metadata or ()), True)
