"""safetensors files: an 8-byte header size, a JSON header, then raw little-endian tensor bytes.

The header is validated the way the reference implementation does before anything is
mapped: header size within the file, offsets contiguous from 0 with no gaps or overlaps,
the last offset equal to the data size, ``numel * itemsize`` equal to each byte range (with
Python integers, so no overflow), no duplicate names, known dtypes. Tensors are then views of
the memory-mapped file.
"""
from __future__ import annotations

import collections
import json
import os
import struct
from typing import TYPE_CHECKING


from ..checkpoint import Checkpoint
from ..errors import CheckpointError, CorruptCheckpoint, ResourceLimitExceeded, UnsupportedFormat
from ..dtypes import itemsize
from ..lazy import ByteSpan, LazyTensor, MappedFile
from . import register

if TYPE_CHECKING:
    from ..scan_walk import ScanWalk

__all__ = ["open_safetensors", "SAFETENSORS_DTYPES", "read_header"]

# safetensors dtype -> torch dtype name (torch is imported only when a tensor is read)
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}

MAX_HEADER = 100_000_000  # as the reference implementation
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _sniff(path: str, head: bytes) -> bool:
    # an 8-byte little-endian header size, then a JSON object. The size is not checked against
    # the file's here: a file cut off inside its header is still safetensors, and read_header
    # says it is truncated
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def read_header(path: str) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_start)`` of a safetensors file, validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpoint("safetensors file shorter than its 8-byte header size", path=path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ResourceLimitExceeded(f"safetensors header of {n} bytes exceeds the {MAX_HEADER}-byte limit",
                                        path=path)
        if 8 + n > size:
            raise CorruptCheckpoint(f"safetensors header of {n} bytes runs past the end of the file "
                                    f"({size} bytes): truncated", path=path, hint="download or copy the file again")
        text = f.read(n)

    def no_dupes(pairs):  # called for every JSON object: one per tensor
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise CorruptCheckpoint(f"safetensors header names {k!r} twice", path=path)
                seen.add(k)
        return d

    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=no_dupes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"safetensors header is not valid JSON ({e})", path=path) from e
    except RecursionError as e:  # the reference implementation refuses deep nesting too
        raise CorruptCheckpoint("safetensors header nests JSON values too deep", path=path) from e
    if not isinstance(header, dict):
        raise CorruptCheckpoint("safetensors header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpoint("safetensors __metadata__ must map strings to strings", path=path)
    data_start = 8 + n
    data_size = size - data_start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not info.keys() <= _ENTRY_KEYS:
            raise CorruptCheckpoint(f"safetensors entry {name!r} is malformed", path=path)
        dt = info.get("dtype")
        if dt not in SAFETENSORS_DTYPES:
            raise UnsupportedFormat(f"safetensors tensor {name!r} has dtype {dt!r}, which ckptfit does not know",
                                    path=path)
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs)):
            raise CorruptCheckpoint(f"safetensors entry {name!r} has a malformed shape or offsets", path=path)
        numel = 1
        for s in shape:
            numel *= s
        begin, end = offs
        if end < begin or numel * itemsize(SAFETENSORS_DTYPES[dt]) != end - begin:
            raise CorruptCheckpoint(f"safetensors tensor {name!r} of shape {shape} ({dt}) spans bytes "
                                    f"{begin}..{end}, which does not match its size", path=path)
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CorruptCheckpoint(f"safetensors tensor {name!r} starts at byte {begin}, expected {cursor} "
                                    f"(offsets must be contiguous, without gaps or overlaps)", path=path)
        cursor = end
    if cursor != data_size:
        raise CorruptCheckpoint(f"safetensors data section holds {data_size} bytes but the header accounts for "
                                f"{cursor}" + (" (truncated)" if data_size < cursor else ""), path=path,
                                hint="download or copy the file again")
    return header, metadata, data_start


def tensors_of(path: str, mapped: MappedFile | None = None) -> tuple[dict[str, LazyTensor], dict]:
    """Lazy tensors and string metadata of one safetensors file."""
    header, metadata, start = read_header(path)
    mapped = mapped or MappedFile(path)
    out: dict[str, LazyTensor] = collections.OrderedDict()
    # file order (by offset), like safetensors' own iteration
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        count = (end - begin) // itemsize(dtype)

        def read(off=start + begin, dtype=dtype, count=count, shape=shape):
            return mapped.tensor(off, dtype, count).view(shape)

        read.span = lambda off=start + begin, n=end - begin: ByteSpan(mapped, off, n)  # type: ignore[attr-defined]

        out[name] = LazyTensor(shape, dtype, read, device="cpu")
    return out, metadata


def _plain_metadata(metadata: dict) -> dict:
    """String metadata, with JSON values parsed where they parse within bounds (else kept as text)."""
    from . import check_json_depth

    md: dict = {}
    for k, v in metadata.items():
        md[k] = v
        if v[:1] in "{[" and len(v) <= 16 << 20:
            try:
                value = json.loads(v)
                check_json_depth(value, what="metadata", path=None)
                md[k] = value
            except (ValueError, RecursionError, CorruptCheckpoint):
                pass
    return md


def scan_safetensors(w: ScanWalk, path: str) -> None:
    """The scan hook: a safetensors file holds no pickle; its header is validated as the reader does."""
    w.format = "safetensors"
    try:
        read_header(path)
    except CheckpointError as e:
        w.errors.append(e.detail)


@register("safetensors", sniff=_sniff, priority=8, scan=scan_safetensors)
def open_safetensors(path: str, trust: bool = False) -> Checkpoint:
    """Open a safetensors file lazily (there is no pickle in it, so ``trust`` changes nothing)."""
    mapped = MappedFile(path)
    tensors, metadata = tensors_of(path, mapped)
    return Checkpoint(path=path, format="safetensors", tree=tensors, metadata=_plain_metadata(metadata),
                      closers=(mapped.close,))
