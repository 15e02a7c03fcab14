"""Convert or slim a checkpoint: any readable format in, safetensors / torch zip / DCP out, verified.

:func:`convert` reads the source lazily (every format :func:`ckptfit.open` reads: torch zip,
legacy, Hugging Face folders, DCP, TorchScript, whole pickled models), picks its state dict as
:func:`ckptfit.load` would (or ``use=``), optionally casts floating tensors, and writes:

- **safetensors**: one file, or ``model-0000i-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` (when ``shard_size`` is given or the destination is a
  folder). Plain-data metadata (epoch, hyper_parameters ...) goes into the header's
  ``__metadata__`` (JSON-encoded strings). Tensors that share storage (tied weights) are
  written once; the others are recorded under ``__metadata__["ckptfit.aliases"]``.
- **torch** (``.pt``/``.pth``/``.bin``/``.ckpt``): the whole container (weights, optimizer state,
  plain metadata) or, with ``only_weights``, the state dict alone.
- **dcp** (a folder, ``format="dcp"``): ``torch.distributed.checkpoint.save`` in one process.

The output is written beside the destination and re-read *before* it is moved into place:
every tensor must be ``torch.equal`` to its source (or to the source cast to ``dtype``). A
failure leaves no destination. The source is only ever read.
"""
from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint, StateDictCandidate
from .errors import CheckpointError, CorruptCheckpoint
from .lazy import LazyTensor
from .safety import Placeholder, to_plain

__all__ = ["convert", "ConvertResult", "parse_size"]

_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
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
        verified: every tensor was re-read from the output and found ``torch.equal``.
        seconds: how long it took.
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

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "format": self.format,
                "files": list(self.files), "container": self.container, "num_tensors": self.num_tensors,
                "bytes_written": self.bytes_written, "dtype": self.dtype, "metadata": list(self.metadata),
                "dropped": list(self.dropped), "aliases": dict(self.aliases), "verified": self.verified,
                "seconds": self.seconds}

    def __str__(self) -> str:
        from .inspection import human_bytes

        speed = f", {human_bytes(int(self.bytes_written / self.seconds))}/s" if self.seconds > 0 else ""
        tensors = f"{self.num_tensors} tensor{'s' if self.num_tensors != 1 else ''}"
        lines = [f"Wrote {self.destination} ({self.format}, {tensors}, {human_bytes(self.bytes_written)}"
                 + (f", as {self.dtype}" if self.dtype else "") + f") in {self.seconds:.2f} s{speed}"]
        if self.container:
            lines.append(f"  weights from container {self.container!r}")
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
    """Loads source tensors (cast where asked), each shared storage once."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.cache: dict[Any, torch.Tensor] = {}

    def get(self, t: LazyTensor, cast: bool = True) -> torch.Tensor:
        key = (_alias_key(t) or id(t), cast)
        if key not in self.cache:
            value = t.load()
            want = _target_dtype(t, self.dtype) if cast else t.dtype
            if value.dtype != want:
                value = value.to(want)
            self.cache[key] = value
        return self.cache[key]


def _plain_metadata(ckpt: Checkpoint) -> dict[str, Any]:
    md = {}
    for k, v in ckpt.metadata.items():
        if isinstance(v, str) and v.startswith("<") and v.endswith(">"):
            continue  # optimizer / scheduler summaries: not plain data
        if ckpt.format == "hf-folder" and k in ("file", "index"):
            continue  # where the reader found the shards, not the checkpoint's own metadata
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


# ------------------------------------------------------------------------------------ safetensors

def _st_header(items: list[tuple[str, LazyTensor]], dtype: torch.dtype | None,
               metadata: Mapping[str, str]) -> tuple[bytes, list[tuple[str, LazyTensor, int]]]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    layout = []
    for key, t in items:
        want = _target_dtype(t, dtype)
        if want not in _ST_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {want}, which safetensors cannot hold",
                                  hint="convert to torch format instead (--format torch)")
        n = t.numel * want.itemsize
        header[key] = {"dtype": _ST_DTYPES[want], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        layout.append((key, t, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


def _tensor_bytes(value: torch.Tensor) -> memoryview:
    flat = value.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _write_safetensors(f, items: list[tuple[str, LazyTensor]], reader: _Reader, metadata: Mapping[str, str],
                       bar) -> None:
    head, layout = _st_header(items, reader.dtype, metadata)
    f.write(head)
    for _key, t, n in layout:
        value = reader.get(t)
        data = _tensor_bytes(value)
        if len(data) != n:
            raise CheckpointError(f"internal error: tensor wrote {len(data)} bytes, expected {n}")
        f.write(data)
        bar.advance(n)


def _read_safetensors(buf) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors buffer (a mapped file) into tensor views, checking every offset."""
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(bytes(buf[8:8 + n]))
    md = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only map: these views are only compared, never written
        for key, info in header.items():
            dt = _ST_CODES[info["dtype"]]
            begin, end = info["data_offsets"]
            count = (end - begin) // dt.itemsize
            t = torch.frombuffer(buf, dtype=dt, count=count, offset=base + begin) if count else torch.empty(0, dtype=dt)
            out[key] = t.reshape(info["shape"])
    return out, md


# ------------------------------------------------------------------------------------ verification

def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:  # NaNs equal to themselves, bit for bit
        return torch.equal(a.contiguous().view(-1).view(torch.uint8) if a.numel() else a,
                           b.contiguous().view(-1).view(torch.uint8) if b.numel() else b)
    return torch.equal(a, b)


def _check(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
    problems = []
    for k, v in expected.items():
        if k not in got:
            problems.append(f"{k}: missing from the output")
        elif not _equal(v, got[k]):
            problems.append(f"{k}: differs after writing (output {got[k].dtype} {list(got[k].shape)}, "
                            f"expected {v.dtype} {list(v.shape)})")
    if problems:
        raise CorruptCheckpoint(f"verification of the output failed for {len(problems)} tensor(s): "
                                + "; ".join(problems[:5]), path=where,
                                hint="nothing was written; please report this with the source file")


class _FdReader(io.RawIOBase):
    """A read-only file over a mapped buffer (to re-read an output before it is moved into place)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.buf) - self.pos)
        b[:n] = self.buf[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = [offset, self.pos + offset, len(self.buf) + offset][whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


@contextlib.contextmanager
def _mapped(f) -> Iterator[Any]:
    """Map what was written to ``f`` so far, read-only (by name: ``atomic_write``'s file is write-only)."""
    f.flush()
    with open(f.name, "rb") if isinstance(f.name, str) else contextlib.nullcontext(f) as r:
        mm = mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):
            mm.close()


def _flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    stack = [(prefix, tree)]
    while stack:
        p, obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            out[p] = obj
        elif isinstance(obj, dict):
            stack.extend((f"{p}.{k}" if p else str(k), v) for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            stack.extend((f"{p}.{i}" if p else str(i), v) for i, v in enumerate(obj))
    return out


# ------------------------------------------------------------------------------------ torch output

def _real_tree(obj: Any, reader: _Reader, cast_ids: set[int], dropped: list[str], path: str = "") -> Any:
    """The source tree with tensors loaded; unknown objects (inert placeholders) left out."""
    if isinstance(obj, LazyTensor):
        return reader.get(obj, cast=id(obj) in cast_ids)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, Placeholder):
                dropped.append(f"{path + '.' if path else ''}{k}: an object of class {v.qualname} (not plain data)")
                continue
            out[k] = _real_tree(v, reader, cast_ids, dropped, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(obj, list | tuple):
        items = [_real_tree(v, reader, cast_ids, dropped, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else items
    if isinstance(obj, Placeholder):
        return None
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


def _header_metadata(md: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, str]:
    out = {"format": "pt"}
    for k, v in md.items():
        out[k] = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    if aliases:
        out["ckptfit.aliases"] = json.dumps(dict(aliases), sort_keys=True)
    return out


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
            use: str | None = None, only_weights: bool = False, shard_size: int | str | None = None,
            trust: bool = False, format: str | None = None) -> ConvertResult:  # noqa: A002 - CLI name
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

    Returns:
        A :class:`ConvertResult` (``print()`` it).

    Raises:
        CheckpointError: the source cannot be read, the destination is the source or an unsafe
            place, or verification failed (then nothing is written).

    Example:
        >>> from ckptfit.convert import convert
        >>> result = convert("last.ckpt", "model.safetensors", dtype="bf16")      # doctest: +SKIP
        >>> result.verified                                                        # doctest: +SKIP
        True
    """
    from .loading import open as open_checkpoint

    start = time.perf_counter()
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if isinstance(dtype, str):
        from .cli import parse_dtype

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
    ckpt = open_checkpoint(src, trust=trust)
    try:
        cand = ckpt.state_dict(use)
        items = list(cand.tensors.items())
        reader = _Reader(dtype)
        md = _plain_metadata(ckpt)
        total = sum(t.numel * _target_dtype(t, dtype).itemsize for _, t in items)
        with _progress(total, f"converting {os.path.basename(src.rstrip(os.sep))}") as bar:
            if fmt == "torch":
                files, kept, dropped, aliases = _convert_torch(ckpt, cand, dst, src, reader, only_weights, md, bar)
            else:
                aliases, unique = _dedupe(items)
                dropped = _dropped(ckpt, cand, kept_tree=False)
                if fmt == "safetensors":
                    files = _convert_safetensors(dst, src, unique, reader, _header_metadata(md, aliases), bar)
                elif fmt == "safetensors-sharded":
                    files = _convert_sharded(dst, unique, reader, md, aliases, shard_bytes or _DEFAULT_SHARD, bar,
                                             ckpt)
                else:
                    files = _convert_dcp(dst, items, reader, bar)
                    aliases = {}
                    if md:
                        dropped.append(f"metadata ({', '.join(md)}): the DCP output holds the weights only")
                kept = tuple(md) if fmt != "dcp" else ()
            expected = len(items)
    finally:
        ckpt.close()
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in files) if os.path.isdir(dst) else os.path.getsize(dst)
    return ConvertResult(src, dst, fmt, tuple(files), cand.name, expected, size,
                         str(dtype).removeprefix("torch.") if dtype is not None else None, tuple(kept),
                         tuple(dropped), dict(aliases), True, round(time.perf_counter() - start, 3))


def _dedupe(items: list[tuple[str, LazyTensor]]) -> tuple[dict[str, str], list[tuple[str, LazyTensor]]]:
    """Tensors sharing storage exactly (ties) are written once: ``({alias: canonical}, unique items)``."""
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


def _expected(items: list[tuple[str, LazyTensor]], reader: _Reader) -> dict[str, torch.Tensor]:
    return {k: reader.get(t) for k, t in items}


def _convert_safetensors(dst: str, src: str, items, reader: _Reader, header_md: dict[str, str], bar) -> list[str]:
    from ._atomic import atomic_write

    with atomic_write(dst, source=src) as f:
        _write_safetensors(f, items, reader, header_md, bar)
        with _mapped(f) as mm:
            got, _ = _read_safetensors(mm)
            _check(_expected(items, reader), got, dst)
            del got
    return [os.path.basename(dst)]


@contextlib.contextmanager
def _temp_dir_beside(dst: str) -> Iterator[str]:
    """A temporary folder next to ``dst``, moved into place on success, removed on failure."""
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise CheckpointError("the destination's parent folder does not exist", path=parent,
                              hint="create it first, or choose another output path")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        # mkdtemp makes the folder private (0o700); the result gets what os.mkdir would give it
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked before writing)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_sharded(dst: str, items, reader: _Reader, md: Mapping[str, Any], aliases: Mapping[str, str],
                     shard_bytes: int, bar, ckpt: Checkpoint) -> list[str]:
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    for k, t in items:
        n = t.numel * _target_dtype(t, reader.dtype).itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, t))
        size += n
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
             for i in range(count)]
    files = []
    weight_map: dict[str, str] = {}
    with _temp_dir_beside(dst) as tmp:
        for name, shard in zip(names, shards):
            path = os.path.join(tmp, name)
            header = _header_metadata(md, {a: c for a, c in aliases.items() if any(c == k for k, _ in shard)})
            with open(path, "wb") as f:
                _write_safetensors(f, shard, reader, header, bar)
            with open(path, "rb") as f, _mapped(f) as mm:
                got, _ = _read_safetensors(mm)
                _check(_expected(shard, reader), got, path)
                del got
            weight_map.update({k: name for k, _ in shard})
            files.append(name)
            reader.cache.clear()  # one shard in memory at a time
        if count > 1:
            total = sum(t.numel * _target_dtype(t, reader.dtype).itemsize for _, t in items)
            index = {"metadata": {"total_size": total, **{k: v for k, v in _header_metadata(md, aliases).items()}},
                     "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            files.append("model.safetensors.index.json")
        cfg = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
        if isinstance(cfg, dict):
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            files.append("config.json")
    return files


def _convert_dcp(dst: str, items, reader: _Reader, bar) -> list[str]:
    import torch.distributed.checkpoint as dcp

    from .loading import open as open_checkpoint

    state = {k: reader.get(t).clone() for k, t in items}  # DCP writes from owned memory
    for _, t in items:
        bar.advance(t.numel * _target_dtype(t, reader.dtype).itemsize)
    with _temp_dir_beside(dst) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp, no_dist=True) if _takes_no_dist(dcp.save) else \
                dcp.save(state, checkpoint_id=tmp)
        back = open_checkpoint(tmp)
        try:
            got = {k: t.load() for k, t in back.state_dict().tensors.items()}
        finally:
            back.close()
        _check(state, got, dst)
        files = sorted(os.listdir(tmp))
    return files


def _takes_no_dist(fn) -> bool:
    import inspect

    try:
        return "no_dist" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _convert_torch(ckpt: Checkpoint, cand: StateDictCandidate, dst: str, src: str, reader: _Reader,
                   only_weights: bool, md: Mapping[str, Any], bar):
    from ._atomic import atomic_write

    dropped: list[str] = []
    aliases: dict[str, str] = {}
    weights = {k: reader.get(t) for k, t in cand.tensors.items()}  # ties stay ties: one tensor object
    for t in cand.tensors.values():
        bar.advance(t.numel * _target_dtype(t, reader.dtype).itemsize)
    cast_ids = {id(t) for t in cand.tensors.values()}
    if only_weights or not isinstance(ckpt.tree, dict) or cand.kind == "module":
        obj: Any = weights
        dropped = _dropped(ckpt, cand, kept_tree=False)
        if not only_weights and md:
            dropped.append(f"metadata ({', '.join(md)}): the source is not a plain container")
        kept: tuple[str, ...] = ()
    else:
        obj = _real_tree(ckpt.tree, reader, cast_ids, dropped)
        kept = tuple(md)
    with atomic_write(dst, source=src) as f:
        torch.save(obj, f)
        with _mapped(f) as mm:
            back = torch.load(io.BufferedReader(_FdReader(mm)), map_location="cpu", weights_only=True)
            expected = _flatten(obj)
            _check(expected, _flatten(back), dst)
            del back
    return [os.path.basename(dst)], kept, dropped, aliases
