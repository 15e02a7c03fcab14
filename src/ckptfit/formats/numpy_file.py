"""Numpy weights: ``.npy`` and ``.npz`` files, and numpy arrays inside pickles and torch files.

An ``.npy`` file is a magic string, a small header (a Python literal giving ``descr``,
``fortran_order`` and ``shape``) and the raw array bytes; an ``.npz`` is a zip of ``.npy``
members (``np.savez`` stores them, ``np.savez_compressed`` deflates them). Headers are parsed
with numpy's own reader (``ast.literal_eval``, size-capped), never with ``np.load``: an object
array is a pickle, and it is read by the restricted interpreter like every other pickle.

Arrays become tensors without copies where the layout allows: a little-endian array in C or
Fortran order is a view of the memory-mapped file (Fortran order as transposed strides). A
big-endian array is byte-swapped into native order (one copy). Dtypes torch has no equivalent
for (strings, structured records, ``|V2`` bfloat16 from JAX without its dtype) are not tensors
and are listed as such by ``inspect``.
"""
from __future__ import annotations

import ast
import io
import os
import struct
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpoint
from ..lazy import LazyTensor, MappedFile, Record, note_read
from . import register
from .zip_scan import scan_zip

if TYPE_CHECKING:
    import torch

    from ..scan_walk import ScanWalk

__all__ = ["open_npy", "open_npz", "array_to_tensor", "torch_dtype_of", "numpy_to_tensors", "NPY_MAGIC"]

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 10_000  # numpy's own default for np.load

# numpy (kind, itemsize) -> torch dtype name (torch is imported only when a tensor is made)
_DTYPES: dict[tuple[str, int], str] = {
    ("f", 2): "float16", ("f", 4): "float32", ("f", 8): "float64",
    ("i", 1): "int8", ("i", 2): "int16", ("i", 4): "int32", ("i", 8): "int64",
    ("u", 1): "uint8", ("b", 1): "bool", ("c", 8): "complex64", ("c", 16): "complex128",
    ("u", 2): "uint16", ("u", 4): "uint32", ("u", 8): "uint64",
}


def dtype_name_of(dt: Any) -> str | None:
    """The torch dtype name of a numpy dtype (any byte order), or ``None`` when torch has none; no torch import."""
    if dt.names is not None or dt.subdtype is not None:
        return None
    if dt.name == "bfloat16":  # ml_dtypes' bfloat16, as JAX writes it when ml_dtypes is imported
        return "bfloat16"
    return _DTYPES.get((dt.kind, dt.itemsize))


def torch_dtype_of(dt: Any) -> torch.dtype | None:
    """The torch dtype of a numpy dtype (any byte order), or ``None`` when torch has none.

    Example:
        >>> import numpy as np
        >>> torch_dtype_of(np.dtype(">f4")), torch_dtype_of(np.dtype("U3"))
        (torch.float32, None)
    """
    from ..dtypes import torch_dtype

    name = dtype_name_of(dt)
    return torch_dtype(name) if name is not None else None


def _native(dt: Any) -> bool:
    return dt.byteorder in "=|" or (dt.byteorder == "<") == (__import__("sys").byteorder == "little")


def array_to_tensor(arr: Any) -> torch.Tensor | None:
    """A tensor holding ``arr``'s values: a view of its memory where the layout allows, else one copy.

    Native byte order and non-negative strides (C or Fortran order, slices) are viewed; a
    big-endian array is byte-swapped into a new tensor. ``None`` for dtypes torch cannot hold.

    Example:
        >>> import numpy as np
        >>> a = np.arange(6, dtype=">i4").reshape(2, 3)
        >>> array_to_tensor(a).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    import numpy as np
    import torch

    dtype = torch_dtype_of(arr.dtype)
    if dtype is None:
        return None
    if dtype is torch.bfloat16:
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    if not _native(arr.dtype):
        arr = arr.astype(arr.dtype.newbyteorder("="))  # the one copy a byte swap needs
    if any(s < 0 for s in arr.strides) or any(s % arr.itemsize for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch warns on read-only memory; the file mapping is copy-on-write anyway
        arr = arr.copy()
    return torch.from_numpy(arr)


def numpy_to_tensors(obj: Any, *, beside_tensors: bool = False) -> Any:
    """Replace numpy arrays in a tree (dicts and lists, as a pickle rebuilt them) by lazy tensors.

    Arrays of dtypes torch cannot hold stay as they are. With ``beside_tensors`` (a torch file,
    where tensors are the weights), only arrays in a container that holds nothing but arrays,
    tensors and containers are converted: an array beside ``epoch`` and ``args`` is metadata.
    Walks iteratively, each container once.
    """
    import sys

    np = sys.modules.get("numpy")
    if np is None:  # no numpy array can have been rebuilt (and numpy's import is not paid for nothing)
        return obj
    from ..pickle_numpy import NumpyArray

    def conv(v: Any) -> Any:
        if isinstance(v, NumpyArray):
            v = v.value
        if isinstance(v, np.ndarray):
            name = dtype_name_of(v.dtype)
            if name is not None:  # the tensor is made (importing torch) when it is read
                return LazyTensor(tuple(v.shape), name, lambda v=v: array_to_tensor(v), device="cpu")
        return v

    def weights_only(values: list[Any]) -> bool:
        return all(isinstance(v, NumpyArray | np.ndarray | LazyTensor | dict | list | tuple) for v in values)

    root = [obj]
    stack: list[Any] = [root]
    seen: set[int] = set()
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        items = list(c.items() if isinstance(c, dict) else enumerate(c) if isinstance(c, list) else ())
        convert = not beside_tensors or c is root or weights_only([v for _, v in items])
        for k, v in items:
            nv = conv(v) if convert else v
            if nv is not v:
                c[k] = nv
            elif isinstance(v, dict | list):
                stack.append(v)
    return root[0]


# ------------------------------------------------------------------------------------------ .npy

def _read_header(data: bytes, *, path: str, member: str | None = None) -> tuple[tuple[int, ...], bool, Any, int]:
    """``(shape, fortran_order, dtype, header_length)`` of the ``.npy`` bytes starting ``data``."""
    import numpy as np
    from numpy.lib import format as npformat

    where = f"{member!r} " if member else ""
    f = io.BytesIO(data)
    try:
        major, _minor = npformat.read_magic(f)
        read = {1: npformat.read_array_header_1_0, 2: npformat.read_array_header_2_0}.get(major)
        if read is None:  # version 3 is version 2 with a UTF-8 header
            if major != 3:
                raise ValueError(f"unknown .npy format version {major}")
            read = npformat.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError, MemoryError, RecursionError) as e:
        truncated = len(data) < 128 or "EOF" in str(e)
        raise CorruptCheckpoint(f"the .npy header of {where}cannot be read ({type(e).__name__}: {str(e)[:160]})"
                                + ("; the file is truncated" if truncated else ""), path=path,
                                hint="download or copy the file again") from e
    if not isinstance(dtype, np.dtype):
        raise CorruptCheckpoint(f"the .npy header of {where}has no valid dtype", path=path)
    return tuple(int(s) for s in shape), bool(fortran), dtype, f.tell()


def _lazy(mapped: MappedFile, path: str, offset: int, shape: tuple[int, ...], fortran: bool, dt: Any,
          record: Record | None, *, what: str) -> LazyTensor:
    """A lazy tensor over ``.npy`` data at ``offset`` of ``mapped`` (bounds checked when read)."""
    import numpy as np

    dtype = dtype_name_of(dt)  # a name: torch is imported when the tensor is read
    if dtype is None:
        raise CorruptCheckpoint(f"{what} has dtype {dt.str}, which torch has no equivalent for", path=path)
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dt.itemsize
    if offset + nbytes > mapped.size:
        raise CorruptCheckpoint(f"{what} of shape {list(shape)} ({dt.str}) needs bytes {offset}..{offset + nbytes} "
                                f"but the file holds only {mapped.size}: truncated", path=path,
                                hint="download or copy the file again")
    order = tuple(reversed(shape)) if fortran else shape
    native = _native(dt) and dtype != "bfloat16"

    def read() -> torch.Tensor:
        if record is not None:
            note_read(mapped, record)
        if native:
            t = mapped.tensor(offset, dtype, count)  # a view of the file: no copy
        else:
            raw = np.frombuffer(mapped.read(offset, nbytes), dtype=dt)
            t = array_to_tensor(raw)
        t = t.view(order)
        return t.permute(*reversed(range(len(shape)))) if fortran and len(shape) > 1 else t

    return LazyTensor(shape, dtype, read, device="cpu")


def _object_array(data: memoryview, *, path: str, member: str) -> tuple[Any, Any]:
    """An object array is a pickle after the header: read by the restricted interpreter."""
    from ..safety import load_pickle

    value, scan = load_pickle(data, member=member, path=path)
    from ..pickle_numpy import NumpyArray

    if isinstance(value, NumpyArray):
        value = value.value
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.hasobject and value.shape == ():
        value = value.item()  # np.save of a dict: a 0-d object array holding it
    return numpy_to_tensors(value), scan


def _npy_head(mapped: MappedFile, offset: int, size: int) -> bytes:
    """The bytes of an ``.npy`` header at ``offset`` (of a member of ``size`` bytes): no more than it spans."""
    first = mapped.read(offset, min(size, 12))  # magic, version, header length (2 or 4 bytes)
    if len(first) >= 10 and first.startswith(NPY_MAGIC):
        n = 10 + int.from_bytes(first[8:10], "little") if first[6] == 1 else \
            12 + int.from_bytes(first[8:12], "little")
        return mapped.read(offset, min(size, n, MAX_NPY_HEADER + 64))
    return first


def _sniff_npy(path: str, head: bytes) -> bool:
    return head.startswith(NPY_MAGIC)


def scan_npy(w: ScanWalk, path: str) -> None:
    """The ``npy`` reader's scan hook (and scan's own for a file no reader claims that starts like one)."""
    w.format = "npy"
    with open(path, "rb") as f:
        scan_npy_bytes(w, f.read(), os.path.basename(path))


def scan_npy_bytes(w: ScanWalk, data: bytes, member: str) -> None:
    """A ``.npy``'s bytes: header validated; an object array's data is a pickle and is interpreted."""
    if len(data) < 10 or not data.startswith(b"\x93NUMPY"):
        w.errors.append(f"{member}: not a .npy array (bad magic)")
        return
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif major in (2, 3) and len(data) >= 12:
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        w.errors.append(f"{member}: unknown .npy format version {major}")
        return
    if hlen > MAX_NPY_HEADER or start + hlen > len(data):
        w.errors.append(f"{member}: .npy header of {hlen} bytes is too long or runs past the end")
        return
    try:
        header = ast.literal_eval(data[start:start + hlen].decode("latin1" if major < 3 else "utf-8"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError) as e:
        w.errors.append(f"{member}: .npy header is not a Python literal ({type(e).__name__})")
        return
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        w.errors.append(f"{member}: .npy header lacks descr/fortran_order/shape")
        return
    body = start + hlen
    descr = header["descr"]
    if _has_object(descr):
        w.run(data, f"{member} (object array pickle)", start=body)
        return
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        w.errors.append(f"{member}: .npy shape {str(shape)[:60]} is invalid")
        return
    try:
        import numpy as np

        itemsize = np.dtype(descr).itemsize
    except (TypeError, ValueError) as e:
        w.errors.append(f"{member}: .npy dtype is invalid ({e})")
        return
    n = itemsize
    for s in shape:
        n *= s
    if n != len(data) - body:
        w.anomalies.append(f"{member}: holds {len(data) - body} data bytes but its header describes {n}")


def _has_object(descr: Any) -> bool:
    stack = [descr]
    budget = 1000
    while stack and budget:
        budget -= 1
        d = stack.pop()
        if isinstance(d, str):
            if "O" in d:
                return True
        elif isinstance(d, list | tuple):
            stack.extend(d)
    return bool(stack)  # too complex to tell: treat as object (interpreting it is safe)


@register("npy", sniff=_sniff_npy, priority=7, scan=scan_npy)
def open_npy(path: str, trust: bool = False) -> Checkpoint:
    """Open a ``.npy`` file: one array, offered as a one-tensor state dict keyed by the file's stem."""
    import os

    mapped = MappedFile(path)
    head = _npy_head(mapped, 0, mapped.size)
    shape, fortran, dt, start = _read_header(head, path=path)
    key = os.path.basename(path).rsplit(".", 1)[0] or "array"
    scans: tuple = ()
    if dt.hasobject:
        with open(path, "rb") as f:
            body = f.read()[start:]
        tree, scan = _object_array(memoryview(body), path=path, member="object array")
        scans = (scan,)
    elif dtype_name_of(dt) is None:
        tree = {key: _untensor(dt, shape)}
    else:
        tree = {key: _lazy(mapped, path, start, shape, fortran, dt, None, what="the array")}
    return Checkpoint(path=path, format="npy", tree=tree, scans=scans, closers=(mapped.close,))


def _untensor(dt: Any, shape: tuple[int, ...]) -> str:
    """An array of a dtype torch cannot hold (strings, records): described, never loaded."""
    return f"<ndarray {dt.str} {list(shape)}: no torch dtype>"


# ------------------------------------------------------------------------------------------ .npz

def _sniff_npz(path: str, head: bytes) -> bool:
    # a zip whose first member is named *.npy (np.savez names each member after its key)
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return False
    nlen = int.from_bytes(head[26:28], "little")
    name = head[30:30 + nlen]
    return name.endswith(b".npy") or (30 + nlen > len(head) and _first_name(path).endswith(".npy"))


def _first_name(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(26)
        nlen = int.from_bytes(f.read(2), "little")
        f.seek(30)
        return f.read(nlen).decode("utf-8", "replace")


@register("npz", sniff=_sniff_npz, priority=11, scan=scan_zip)
def open_npz(path: str, trust: bool = False) -> Checkpoint:
    """Open an ``.npz`` archive: one tensor per ``.npy`` member, keyed by the member name without ``.npy``.

    Stored members (``np.savez``) are views of the mapped file, their CRC-32 checked when read;
    deflated members (``np.savez_compressed``) are inflated when read (sizes capped, CRC checked).
    """
    from ._zip import ZipArchive
    from .polyglot import refuse_two_archives

    refuse_two_archives(path)  # zip archives back to back: readers disagree on which one is the file
    archive = ZipArchive(path, what="npz archive")
    mapped = MappedFile(path)
    tree: dict[str, Any] = {}
    scans: list = []
    try:
        for name, m in archive.members.items():
            key = name[:-4] if name.endswith(".npy") else name
            if m.compress_type == zipfile.ZIP_STORED:
                head = _npy_head(mapped, m.data_offset, m.size)
            else:
                head = archive.read(name, max_size=MAX_NPY_HEADER + 64) if m.size <= MAX_NPY_HEADER + 64 else \
                    _inflate_head(mapped, archive.members[name], path)
            if not head.startswith(NPY_MAGIC):
                raise CorruptCheckpoint(f"npz member {name!r} is not an .npy array", path=path,
                                        hint="an .npz holds only .npy members; check the file")
            shape, fortran, dt, start = _read_header(head, path=path, member=name)
            if dt.hasobject:
                value, scan = _object_array(memoryview(archive.read(name))[start:], path=path, member=name)
                tree[key] = value
                scans.append(scan)
            elif dtype_name_of(dt) is None:
                tree[key] = _untensor(dt, shape)
            elif m.compress_type == zipfile.ZIP_STORED:
                record = Record(name, m.data_offset, m.size, m.crc)
                mapped.add_record(record)
                tree[key] = _lazy(mapped, path, m.data_offset + start, shape, fortran, dt, record,
                                  what=f"npz member {name!r}")
                if start + _nbytes(shape, dt) != m.size:
                    raise CorruptCheckpoint(f"npz member {name!r} holds {m.size - start} data bytes but its header "
                                            f"describes {_nbytes(shape, dt)}", path=path,
                                            hint="download or copy the file again")
            else:
                tree[key] = LazyTensor(shape, dtype_name_of(dt), _inflated(path, name, start, shape, fortran, dt),
                                       device="cpu")
    finally:
        archive.close()
    return Checkpoint(path=path, format="npz", tree=tree, scans=tuple(scans), closers=(mapped.close,))


def _nbytes(shape: tuple[int, ...], dt: Any) -> int:
    n = dt.itemsize
    for s in shape:
        n *= s
    return n


def _inflate_head(mapped: MappedFile, m: Any, path: str) -> bytes:
    """The first bytes of a deflated member (its .npy header), inflating no more than a header's worth."""
    import zlib

    raw = mapped.read(m.data_offset, min(m.compressed_size, 1 << 16))
    try:
        return zlib.decompressobj(-15).decompress(raw, MAX_NPY_HEADER + 64)
    except zlib.error as e:
        raise CorruptCheckpoint(f"npz member {m.name!r} cannot be inflated ({e})", path=path,
                                hint="the file is damaged; download or copy it again") from e


def _inflated(path: str, name: str, start: int, shape: tuple[int, ...], fortran: bool,
              dt: Any) -> Callable[[], torch.Tensor]:
    """A reader that inflates one deflated member when called (through the checked zip reader)."""
    import numpy as np

    from ._zip import MAX_INFLATED, ZipArchive

    def read() -> torch.Tensor:
        archive = ZipArchive(path, what="npz archive")
        try:
            data = archive.read(name, max_size=MAX_INFLATED)
        finally:
            archive.close()
        if len(data) - start != _nbytes(shape, dt):
            raise CorruptCheckpoint(f"npz member {name!r} holds {len(data) - start} data bytes but its header "
                                    f"describes {_nbytes(shape, dt)}", path=path)
        arr = np.frombuffer(data, dtype=dt, offset=start).reshape(shape, order="F" if fortran else "C")
        return array_to_tensor(arr)

    return read
