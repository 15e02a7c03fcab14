"""Convert or slim a checkpoint: any readable format in, safetensors / torch zip / DCP out, verified.

:func:`convert` reads the source lazily (every format :func:`ckptfit.open` reads: torch zip,
legacy, Hugging Face folders, DCP, TorchScript, whole pickled models), picks its state dict as
:func:`ckptfit.load` would (or ``use=``), optionally casts floating tensors, and writes:

- **safetensors**: one file, or ``model-0000i-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` (when ``shard_size`` is given or the destination is a
  folder). Plain-data metadata (epoch, hyper_parameters ...) goes into the header's
  ``__metadata__`` (JSON-encoded strings). Tied tensors (one storage, same offset, shape and
  stride) are written once and the others named under ``__metadata__["ckptfit.aliases"]``.
- **torch** (``.pt``/``.pth``/``.bin``/``.ckpt``): the whole container (weights, optimizer state,
  plain metadata) or, with ``only_weights``, the state dict alone; ties stay ties.
- **dcp** (a folder, ``format="dcp"``): ``torch.distributed.checkpoint.save`` in one process.

Files are written by :func:`ckptfit.writing.write_checkpoint`, the one writer (also behind
``ckptfit load --save``): views of one buffer are written whole, each file is written beside
the destination and re-read by ckptfit's own reader *before* it is moved into place, and
every tensor must be bit-for-bit equal to its source (or to the source cast to ``dtype``). A
failure leaves no destination. The source is only ever read. What the output does not hold
(other state dicts, optimizer state, metadata it has no place for) is listed in
:attr:`ConvertResult.dropped`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from typing import Any

import torch

from ._atomic import atomic_dir
from .checkpoint import Checkpoint, StateDictCandidate
from .dtypes import dtype_name, parse_dtype
from .errors import CheckpointError
from .lazy import LazyTensor
from .safety import Placeholder, to_plain
from .writing import compare, header_metadata, write_checkpoint

__all__ = ["convert", "ConvertResult", "parse_size"]

_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_DEFAULT_SHARD = 5 * 10**9


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote, what it left out, and the verification.

    Attributes:
        source: the checkpoint read (never modified).
        destination: the file or folder written.
        format: ``"safetensors"``, ``"safetensors-sharded"``, ``"torch"`` or ``"dcp"``.
        files: every file written (relative to ``destination`` for folders).
        container: the state dict taken from the source (``""`` = the root).
        num_tensors: tensors written.
        bytes_written: total size of the output.
        dtype: the dtype floating weights were cast to, if any.
        metadata: plain-data metadata kept (names).
        dropped: what the output does not hold, and why.
        aliases: ``{key: same_as}`` for tensors written once because they share storage.
        verified: every tensor was re-read from the output by ckptfit's own reader and found bit-for-bit equal.
        seconds: how long it took.
        names: how keys were renamed (``strip_prefix``, ``rename``), one line per rule with its count.
    """

    source: str
    destination: str
    format: str
    files: tuple[str, ...]
    container: str | None
    num_tensors: int
    bytes_written: int
    dtype: str | None
    metadata: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    verified: bool = False
    seconds: float = 0.0
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "format": self.format,
                "files": list(self.files), "container": self.container, "num_tensors": self.num_tensors,
                "bytes_written": self.bytes_written, "dtype": self.dtype, "metadata": list(self.metadata),
                "dropped": list(self.dropped), "aliases": dict(self.aliases), "verified": self.verified,
                "seconds": self.seconds, "names": list(self.names)}

    def __str__(self) -> str:
        from .rendering import human_bytes

        speed = f", {human_bytes(int(self.bytes_written / self.seconds))}/s" if self.seconds > 0 else ""
        tensors = f"{self.num_tensors} tensor{'s' if self.num_tensors != 1 else ''}"
        lines = [f"Wrote {self.destination} ({self.format}, {tensors}, {human_bytes(self.bytes_written)}"
                 + (f", as {self.dtype}" if self.dtype else "") + f") in {self.seconds:.2f} s{speed}"]
        if self.container:
            lines.append(f"  weights from container {self.container!r}")
        if self.names:
            lines.append(f"  names: {'; '.join(self.names)}")
        if len(self.files) > 1:
            lines.append(f"  files: {', '.join(self.files[:4])}" + (f" and {len(self.files) - 4} more"
                                                                     if len(self.files) > 4 else ""))
        if self.metadata:
            lines.append(f"  metadata kept: {', '.join(self.metadata)}")
        if self.aliases:
            lines.append(f"  shared tensors written once ({len(self.aliases)}): "
                         + ", ".join(f"{k} = {v}" for k, v in list(self.aliases.items())[:3]))
        for d in self.dropped:
            lines.append(f"  not written: {d}")
        lines.append("  verified: every tensor re-read and equal to the source" + (" (after the cast)" if self.dtype
                                                                                     else "")
                     if self.verified else "  NOT verified")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers

def parse_size(text: str | int | None) -> int | None:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ``1024`` -> 1024.

    Example:
        >>> parse_size("2GB"), parse_size("1KiB")
        (2000000000, 1024)
    """
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read the size {text!r}", hint="write e.g. 2GB, 500MB or a number of bytes")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    size = int(number * base ** " KMGT".index(unit or " "))
    if size <= 0:
        raise CheckpointError(f"shard size {text!r} must be positive")
    return size


def _alias_key(t: LazyTensor) -> tuple | None:
    if t.storage_key is None:
        return None
    return (t.storage_key, t.storage_offset, t.shape, t.stride, t.dtype)


def _target_dtype(t: LazyTensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


class _Reader:
    """Loads source tensors (cast where asked); tied tensors come back as one tensor object."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.cache: dict[Any, torch.Tensor] = {}
        self.bar: Any = _NoBar()

    def get(self, t: LazyTensor, cast: bool = True) -> torch.Tensor:
        key = (_alias_key(t) or id(t), cast)
        if key not in self.cache:
            value = t.load()
            want = _target_dtype(t, self.dtype) if cast else t.dtype
            if value.dtype != want:
                value = value.to(want)
            self.cache[key] = value
        if cast:
            self.bar.advance(t.numel * _target_dtype(t, self.dtype).itemsize)
        return self.cache[key]


def _plain_metadata(ckpt: Checkpoint) -> dict[str, Any]:
    md = {}
    for k, v in ckpt.metadata.items():
        if isinstance(v, str) and v.startswith("<") and v.endswith(">"):
            continue  # optimizer / scheduler summaries: not plain data
        if ckpt.format == "hf-folder" and k in ("file", "index"):
            continue  # where the reader found the shards, not the checkpoint's own metadata
        if ckpt.format == "safetensors" and k == "format" and v == "pt":
            continue  # safetensors' own tag for torch tensors, not the checkpoint's metadata
        md[str(k)] = v
    return md


def _dropped(ckpt: Checkpoint, cand: StateDictCandidate, kept_tree: bool) -> list[str]:
    if kept_tree:
        return []
    out = []
    for c in ckpt.state_dicts():
        if c is not cand and c.name != cand.name:
            what = {"ema": "EMA weights (write them with use='ema')", "optimizer": "optimizer state"}.get(
                c.kind, "another set of tensors")
            out.append(f"{c.label}: {what}, {c.num_tensors} tensors")
    if isinstance(ckpt.tree, dict):
        for k, v in ckpt.metadata.items():
            if isinstance(v, str) and v.startswith("<") and v.endswith(">") and not any(
                    c.name == k or c.name.startswith(f"{k}.") for c in ckpt.state_dicts()):
                out.append(f"{k!r}: optimizer/scheduler state {v}")
    return out


def _progress(total: int, what: str):
    try:
        from ._progress import progress
    except ImportError:  # pragma: no cover - the bar is optional
        return contextlib.nullcontext(_NoBar())
    return progress(total, what)


class _NoBar:
    def advance(self, n: int) -> None:
        pass


# ------------------------------------------------------------------------------------ torch output

def _plain_key(k: Any) -> bool:
    return isinstance(k, str | int | float | bytes | type(None)) or (
        type(k) is tuple and all(_plain_key(x) for x in k))  # (keys nest at most 64 deep: safety.MAX_KEY_DEPTH)


def _real_tree(obj: Any, reader: _Reader, cast_ids: set[int], dropped: list[str], path: str = "") -> Any:
    """The source tree with tensors loaded; unknown objects (inert placeholders) left out, each reported."""
    if isinstance(obj, LazyTensor):
        return reader.get(obj, cast=id(obj) in cast_ids)
    if isinstance(obj, Placeholder):
        dropped.append(f"{path or 'the root'}: an object of class {obj.qualname} (not plain data)")
        return None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(v, Placeholder):
                dropped.append(f"{where}: an object of class {v.qualname} (not plain data)")
                continue
            if not _plain_key(k):  # a tensor or an inert object as a key: torch.save could not write it back
                dropped.append(f"{path or 'the root'}: an entry whose key is a {type(k).__name__} (not plain data)")
                continue
            out[k] = _real_tree(v, reader, cast_ids, dropped, where)
        return out
    if isinstance(obj, list | tuple):
        items = [_real_tree(v, reader, cast_ids, dropped, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else items
    return to_plain(obj)


# ------------------------------------------------------------------------------------ convert

def _output_format(dst: str, fmt: str | None, shard_size: int | None) -> str:
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in ("safetensors", "torch", "dcp"):
            raise CheckpointError(f"unknown output format {fmt!r}", hint="use safetensors, torch or dcp")
        if fmt == "safetensors" and (shard_size is not None or os.path.isdir(dst) or not dst.endswith(".safetensors")):
            return "safetensors-sharded" if (shard_size is not None or os.path.isdir(dst)
                                             or not os.path.splitext(dst)[1]) else "safetensors"
        return fmt
    if shard_size is not None or os.path.isdir(dst) or dst.endswith(os.sep):
        return "safetensors-sharded"
    if dst.endswith(".safetensors"):
        return "safetensors"
    if dst.lower().endswith(_TORCH_EXT):
        return "torch"
    if not os.path.splitext(dst)[1]:
        return "safetensors-sharded"
    raise CheckpointError(f"cannot tell the output format from {os.path.basename(dst)!r}",
                          hint="end the name in .safetensors or .pt/.pth/.bin, or pass format= (--format)")


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
            use: str | None = None, only_weights: bool = False, shard_size: int | str | None = None,
            trust: bool = False, format: str | None = None,  # noqa: A002 - CLI name
            strip_prefix: str | Sequence[str] | None = None, rename: Sequence[tuple[str, str]] | None = None,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None) -> ConvertResult:
    """Write a checkpoint in another format (or slimmer), atomically, and verify every tensor.

    Args:
        src: any checkpoint :func:`ckptfit.open` reads (never modified).
        dst: ``*.safetensors``; a folder (sharded safetensors, or DCP with ``format="dcp"``);
            ``*.pt`` / ``*.pth`` / ``*.bin`` / ``*.ckpt`` (torch zip).
        dtype: cast the floating weights (``torch.bfloat16`` or ``"bf16"``); others stay as they are.
        use: which state dict in the source (``"ema"``, a key path), as for :func:`ckptfit.load`.
        only_weights: write the state dict alone: no optimizer or scheduler state, no metadata
            (torch output); safetensors output always holds only the weights (plus header metadata).
        shard_size: write safetensors shards of at most this size (``"2GB"``) plus an index.
        trust: allow real unpickling of the source (runs code from it). Never needed for weights.
        format: ``"safetensors"``, ``"torch"`` or ``"dcp"``; default from ``dst``.
        strip_prefix: key prefixes to remove (``"module."``), applied first; ``"auto"`` removes the
            prefixes torch's wrappers add (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
            ``torch.compile``) when every key has them.
        rename: ``[(regex, replacement), ...]`` applied in order to every key, each at most once
            per key, as :func:`ckptfit.load` applies them.
        include: glob patterns; only tensors whose key (before or after renaming) matches one are written.
        exclude: glob patterns; tensors whose key (before or after renaming) matches one are left out.
            With any of these four, torch output holds the state dict alone (as ``only_weights``).

    Returns:
        A :class:`ConvertResult` (``print()`` it).

    Raises:
        CheckpointError: the source cannot be read, ``dtype`` is not a dtype name (the message
            lists them), the destination is the source or an unsafe place, a rule matches
            no key or two keys end up with one name, or verification failed (then nothing is written).

    Example:
        >>> from ckptfit.conversion import convert
        >>> result = convert("last.ckpt", "model.safetensors", dtype="bf16")      # doctest: +SKIP
        >>> result.verified                                                        # doctest: +SKIP
        True
        >>> convert("train.pth", "model.safetensors", strip_prefix="module.")      # doctest: +SKIP
    """
    from .loading import open as open_checkpoint

    start = time.perf_counter()
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size)
    fmt = _output_format(dst, format, shard_bytes)
    if _same_path(src, dst) or os.path.abspath(src) == dst:
        raise CheckpointError("the destination is the source", path=dst,
                              hint="choose another output path; ckptfit never modifies its input")
    if fmt in ("safetensors-sharded", "dcp") and os.path.isdir(dst) and os.listdir(dst):
        raise CheckpointError("the destination folder is not empty", path=dst,
                              hint="remove it or choose a new folder name")
    if fmt == "torch" and shard_bytes is not None:
        raise CheckpointError("sharding is for safetensors output", hint="drop --shard-size or write .safetensors")
    keyed = _KeyRules.of(strip_prefix, rename, include, exclude)
    only_weights = only_weights or bool(keyed)  # renamed weights have no place in the source's tree
    ckpt = open_checkpoint(src, trust=trust)
    try:
        cand = ckpt.state_dict(use)
        items, names, left_out = keyed.apply(list(cand.tensors.items()), path=src)
        reader = _Reader(dtype)
        md = _plain_metadata(ckpt)
        total = sum(t.numel * _target_dtype(t, dtype).itemsize for _, t in items)
        with _progress(total, f"converting {os.path.basename(src.rstrip(os.sep))}") as bar:
            reader.bar = bar
            if fmt == "torch":
                files, kept, dropped, aliases = _convert_torch(ckpt, cand, dict(items), dst, src, reader,
                                                               only_weights, md)
            else:
                dropped = _dropped(ckpt, cand, kept_tree=False)
                if fmt == "safetensors":
                    written = write_checkpoint(dst, {k: reader.get(t) for k, t in items}, format="safetensors",
                                               metadata=md, source=src)
                    files, aliases, kept = [os.path.basename(dst)], dict(written.aliases), written.metadata
                elif fmt == "safetensors-sharded":
                    files, aliases = _convert_sharded(dst, items, reader, md, shard_bytes or _DEFAULT_SHARD, ckpt)
                    kept = tuple(md)
                else:
                    files = _convert_dcp(dst, items, reader)
                    aliases, kept = {}, ()
                    if md:
                        dropped.append(f"metadata ({', '.join(md)}): the DCP output holds the weights only")
            expected = len(items)
            dropped[:0] = left_out
    finally:
        ckpt.close()
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in files) if os.path.isdir(dst) else os.path.getsize(dst)
    return ConvertResult(src, dst, fmt, tuple(files), cand.name, expected, size,
                         dtype_name(dtype) if dtype is not None else None, tuple(kept),
                         tuple(dropped), dict(aliases), True, round(time.perf_counter() - start, 3), tuple(names))


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


@dataclass(frozen=True)
class _KeyRules:
    """``strip_prefix``, ``rename``, ``include``, ``exclude``: which tensors convert writes, under which names."""

    strip: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.strip or self.rename or self.include is not None or self.exclude)

    @classmethod
    def of(cls, strip_prefix: Any, rename: Any, include: Any, exclude: Any) -> _KeyRules:
        """Checked options (a wrong type or a bad regex is a :class:`CheckpointError` naming the option)."""
        rules = []
        if isinstance(rename, Mapping):
            rename = list(rename.items())
        for item in rename or ():
            if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise CheckpointError(f"rename= entry {item!r} is not a (regex, replacement) pair",
                                      hint="write rename=[(r'^backbone\\.', '')] (CLI: --rename '^backbone\\.=>')")
            try:
                re.compile(item[0])
            except re.error as e:
                raise CheckpointError(f"rename= regex {item[0]!r} is not a valid regular expression: {e}",
                                      hint="check the part before '=>'") from None
            rules.append((item[0], item[1]))
        return cls(_strings(strip_prefix, "strip_prefix") or (), tuple(rules),
                   _strings(include, "include"), _strings(exclude, "exclude") or ())

    def apply(self, items: list[tuple[str, LazyTensor]], *, path: str) -> tuple[list, list[str], list[str]]:
        """``(items renamed and filtered, name lines for the result, lines for what was left out)``."""
        if not self:
            return items, [], []
        keys = [k for k, _ in items]
        names: list[str] = []
        for prefix in self._prefixes(keys, path):
            hits = sum(k.startswith(prefix) for k in keys)
            keys = [k[len(prefix):] if k.startswith(prefix) else k for k in keys]
            names.append(f"strip {prefix!r} ({hits} keys)")
        for pattern, replacement in self.rename:
            rx, hits, new = re.compile(pattern), 0, []
            for k in keys:
                try:
                    n = rx.sub(replacement, k, count=1)
                except (re.error, IndexError) as e:
                    raise CheckpointError(f"rename r'{pattern}' -> '{replacement}': invalid replacement: {e}",
                                          path=path) from None
                hits += n != k
                new.append(n)
            if not hits:
                raise CheckpointError(f"rename r'{pattern}' -> '{replacement}' matches no key", path=path,
                                      hint="run `ckptfit inspect --all` on the file to see its keys")
            keys = new
            names.append(f"rename r'{pattern}' -> '{replacement}' ({hits} keys)")
        kept, left_out, origin = [], {"include": 0, "exclude": 0}, {}
        for (old, t), new_key in zip(items, keys):
            both = (old, new_key)
            if self.include is not None and not any(fnmatchcase(n, p) for p in self.include for n in both):
                left_out["include"] += 1
            elif any(fnmatchcase(n, p) for p in self.exclude for n in both):
                left_out["exclude"] += 1
            else:
                kept.append((new_key, t))
                origin.setdefault(new_key, []).append(old)
        if not kept:
            raise CheckpointError(f"no tensor is left to write: include={list(self.include or ())!r}, "
                                  f"exclude={list(self.exclude)!r} leave out all {len(items)}", path=path,
                                  hint="the patterns are globs on the keys (before or after renaming), e.g. 'fc.*'")
        for new_key, olds in origin.items():
            if len(olds) > 1:
                first, second = olds[:2]
                raise CheckpointError(f"two keys would both be written as {new_key!r}: {first!r} and {second!r}",
                                      path=path, hint="make the rename rules more specific, or exclude one of them")
        lines = [f"{n} tensors not matched by include={list(self.include or ())!r}" for n in [left_out["include"]] if n]
        lines += [f"{n} tensors excluded by exclude={list(self.exclude)!r}" for n in [left_out["exclude"]] if n]
        return kept, names, lines

    def _prefixes(self, keys: list[str], path: str) -> list[str]:
        out = []
        for prefix in self.strip:
            if prefix != "auto":
                if not any(k.startswith(prefix) for k in keys):
                    raise CheckpointError(f"strip_prefix {prefix!r}: no key starts with it", path=path,
                                          hint="run `ckptfit inspect` on the file to see its keys")
                out.append(prefix)
                continue
            rest = keys
            while True:  # the wrapper prefixes every key has, outermost first
                shared = next((w for w in _WRAPPER_PREFIXES if rest and all(k.startswith(w) for k in rest)), None)
                if shared is None:
                    break
                out.append(shared)
                rest = [k[len(shared):] for k in rest]
        return out


def _strings(value: Any, name: str) -> tuple[str, ...] | None:
    """A string or a sequence of strings as a tuple; None stays None."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(x, str) and x for x in items):
        raise CheckpointError(f"{name}= must be a string or a list of non-empty strings, not {value!r}"[:200])
    return tuple(items) or None


def _dedupe(items: list[tuple[str, LazyTensor]]) -> tuple[dict[str, str], list[tuple[str, LazyTensor]]]:
    """Tensors sharing storage exactly (ties): ``({alias: canonical}, the other items)``."""
    first: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    unique = []
    for k, t in items:
        key = _alias_key(t) or ("id", id(t))
        if key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            unique.append((k, t))
    return aliases, unique


def _convert_sharded(dst: str, items, reader: _Reader, md: Mapping[str, Any], shard_bytes: int,
                     ckpt: Checkpoint) -> tuple[list[str], dict[str, str]]:
    """Shards of at most ``shard_bytes`` (a tie in the shard of the tensor it is tied to) plus an index."""
    ties, unique = _dedupe(items)
    by_key = dict(items)
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in unique:
        n = t.numel * _target_dtype(t, reader.dtype).itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    for alias, canonical in ties.items():
        next(s for s in shards if canonical in s).append(alias)
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
             for i in range(count)]
    files = []
    weight_map: dict[str, str] = {}
    aliases: dict[str, str] = {}
    with atomic_dir(dst) as tmp:
        for name, shard in zip(names, shards):
            written = write_checkpoint(os.path.join(tmp, name), {k: reader.get(by_key[k]) for k in shard},
                                       format="safetensors", metadata=md)
            aliases.update(written.aliases)
            weight_map.update({k: name for k in shard if k not in written.aliases})
            files.append(name)
            reader.cache.clear()  # one shard in memory at a time
        if count > 1:
            total = sum(t.numel * _target_dtype(t, reader.dtype).itemsize for _, t in unique)
            index = {"metadata": {"total_size": total, **header_metadata(md, aliases)}, "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            files.append("model.safetensors.index.json")
        cfg = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
        if isinstance(cfg, dict):
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            files.append("config.json")
    return files, aliases


def _convert_dcp(dst: str, items, reader: _Reader) -> list[str]:
    import torch.distributed.checkpoint as dcp

    from .loading import open as open_checkpoint

    state = {k: reader.get(t).clone() for k, t in items}  # DCP writes from owned memory
    with atomic_dir(dst) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp, no_dist=True) if _takes_no_dist(dcp.save) else \
                dcp.save(state, checkpoint_id=tmp)
        back = open_checkpoint(tmp)
        try:
            compare(state, back.state_dict().tensors, dst)
        finally:
            back.close()
        files = sorted(os.listdir(tmp))
    return files


def _takes_no_dist(fn) -> bool:
    import inspect

    try:
        return "no_dist" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _convert_torch(ckpt: Checkpoint, cand: StateDictCandidate, tensors: Mapping[str, LazyTensor], dst: str,
                   src: str, reader: _Reader, only_weights: bool, md: Mapping[str, Any]):
    dropped: list[str] = []
    weights = {k: reader.get(t) for k, t in tensors.items()}  # ties stay ties: one tensor object
    cast_ids = {id(t) for t in tensors.values()}
    whole = not only_weights and isinstance(ckpt.tree, dict) and cand.kind != "module"
    if whole:
        obj: Any = _real_tree(ckpt.tree, reader, cast_ids, dropped)
    else:
        obj = weights
        dropped = _dropped(ckpt, cand, kept_tree=False)
    written = write_checkpoint(dst, obj, format="torch", source=src)
    # metadata is kept only where it is in what was written: a bare state dict has no place for it
    kept = tuple(k for k in md if isinstance(obj, dict) and k in obj and obj is not weights)
    in_tree = isinstance(ckpt.tree, dict)
    lost = [k for k in md if k not in kept and not (whole and in_tree and k in ckpt.tree)]  # the others: above
    if lost:
        why = ("only_weights writes the state dict alone" if only_weights else
               "the output is a bare state dict, which has no place for it (write .safetensors to keep it in "
               "the header)" if whole else "the source is not a plain container")
        dropped.append(f"metadata ({', '.join(map(str, lost))}): {why}")
    return [os.path.basename(dst)], kept, dropped, dict(written.aliases)
