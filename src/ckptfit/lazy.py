"""Tensors described without their bytes, and the mapped files their bytes come from.

A :class:`LazyTensor` knows its shape, dtype, size and saved device; it reads its data only
when :meth:`LazyTensor.load` is called, and then, where the format allows, straight from a
private memory map of the file (no copy until a cast or a device move needs one).

Nothing here imports torch until tensor bytes are read: a lazy tensor's dtype is kept by name
(``dtype_name``) and becomes a ``torch.dtype`` when ``dtype`` is first asked for, so describing
a checkpoint (``ckptfit inspect``, ``scan``, ``diff``) never pays torch's import.

Formats that checksum their records (torch zip archives: a CRC-32 per storage) register each
record on its :class:`MappedFile` (:class:`Record`) and call :func:`note_read` whenever they
hand out a record's bytes: outside a load the whole record is CRC-checked there, once; inside
``ckptfit.load`` (:func:`collecting_reads`) the loader checks it itself, fused with its copy.
"""
from __future__ import annotations

import bisect
import contextlib
import contextvars
import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._crc import crc32
from .dtypes import dtype_name, itemsize, torch_dtype
from .errors import CorruptCheckpoint

if TYPE_CHECKING:
    import torch

__all__ = ["LazyTensor", "MappedFile", "StorageRef", "Record", "ByteSpan", "dtype_name", "strided_reader", "locate",
           "buffer_of", "note_read", "collecting_reads", "checking_reads", "CRC_CHUNK", "register_filler"]


# Live mappings by address: (start, end, weakref to the mmap, MappedFile), sorted by start.
# A tensor viewing one of them can then be read again straight from the file (``pread``)
# instead of through the mapping, which keeps the mapping's pages out of the process's
# resident memory. The weak reference to the mmap object ties an entry to the mapping's
# lifetime: while the mmap object lives its address range cannot be reused.
_MAPPINGS: list[tuple[int, int, weakref.ref, "MappedFile"]] = []
_MAPPINGS_LOCK = threading.Lock()

# One pread asks for at most this much (Linux returns at most 2 GiB - 4 KiB per call).
_MAX_READ = 1 << 30

# Bytes read, then CRC-checked, at a time: small enough that the CRC reads them from the CPU cache
# the read just filled, large enough that the number of reads does not matter.
CRC_CHUNK = 4 << 20


@dataclass(frozen=True, slots=True)
class Record:
    """A checksummed byte range of a file: one zip member's data and its CRC-32."""

    name: str
    offset: int
    size: int
    crc: int


# Inside a load: the records readers hand out are collected here for the loader to check
# (fused with its copy) instead of being checked when read.
_COLLECT: contextvars.ContextVar[list | None] = contextvars.ContextVar("ckptfit_collect_reads", default=None)
# False under ``verify=False``: the caller checked the file itself.
_CHECK: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptfit_check_reads", default=True)


def note_read(mapped: "MappedFile", record: Record) -> None:
    """A reader is handing out bytes of ``record``: check its CRC now (once per file), or leave it to the load.

    Raises:
        CorruptCheckpoint: the record's bytes do not match its CRC-32.
    """
    collected = _COLLECT.get()
    if collected is not None:
        collected.append((mapped, record))
    elif _CHECK.get() and record.offset not in mapped.verified:
        mapped.check_record(record)


@contextlib.contextmanager
def checking_reads(enabled: bool) -> Iterator[None]:
    """Whether :func:`note_read` checks records in this context (``verify=False`` turns it off)."""
    token = _CHECK.set(bool(enabled))
    try:
        yield
    finally:
        _CHECK.reset(token)


@contextlib.contextmanager
def collecting_reads() -> Iterator[list[tuple["MappedFile", Record]]]:
    """Collect, instead of checking, the records read in this context: ``[(mapped_file, record)]``."""
    collected: list[tuple[MappedFile, Record]] = []
    token = _COLLECT.set(collected)
    try:
        yield collected
    finally:
        _COLLECT.reset(token)


_THREAD = threading.local()


def _crc_buffer() -> memoryview:
    """This thread's buffer of :data:`CRC_CHUNK` bytes for checking records (fresh memory costs page faults)."""
    view = getattr(_THREAD, "crc_buffer", None)
    if view is None:
        view = _THREAD.crc_buffer = memoryview(bytearray(CRC_CHUNK))
    return view


def crc_error(record: Record, path: str, tensor: str | None = None) -> CorruptCheckpoint:
    """The error for a record whose bytes do not match its CRC-32 (naming the tensor when known)."""
    what = f"the bytes of tensor {tensor!r}" if tensor else "its bytes"
    return CorruptCheckpoint(f"tensor record {record.name!r} fails its CRC check (CRC-32): {what} differ from what "
                             f"was written (file bytes {record.offset}..{record.offset + record.size})", path=path,
                             hint="the file is damaged; download or copy it again (nothing was changed)")


def buffer_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bf16 included)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("buffer_of needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


# Files whose bytes arrive on demand (a remote checkpoint in a sparse local cache, see ckptfit._remote):
# path -> ``fill(offset, nbytes)``, called before a MappedFile hands out or reads those bytes.
_FILLERS: dict[str, Callable[[int, int], None]] = {}


def register_filler(path: str, fill: Callable[[int, int], None] | None) -> None:
    """Have :class:`MappedFile` objects of ``path`` call ``fill(offset, nbytes)`` before reading (None: stop)."""
    if fill is None:
        _FILLERS.pop(path, None)
    else:
        _FILLERS[path] = fill


class MappedFile:
    """A file mapped privately (copy-on-write) on first use, shared by all its tensors.

    The source file is never written: the mapping is ``ACCESS_COPY``, so a tensor that is
    later modified in place gets private pages and the file on disk stays as it was. Bytes can
    also be read straight into a caller's buffer (:meth:`readinto`) without going through the
    mapping, which is how tensors are copied into an existing model without the mapping's
    pages piling up in resident memory.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.size = os.path.getsize(self.path)
        self._records: list[Record] = []  # sorted by offset
        self.verified: set[int] = set()  # offsets of records checked by note_read
        self._fill = _FILLERS.get(self.path)  # bytes that arrive on demand (a remote file's cache)

    def add_record(self, record: Record) -> None:
        """Declare a checksummed range (a reader does, for each record it may hand out)."""
        records = self._records
        if not records or records[-1].offset < record.offset:  # readers declare records in file order, mostly
            records.append(record)
            return
        i = bisect.bisect_left(records, record.offset, key=_rec_start)
        if i < len(self._records) and self._records[i].offset == record.offset:
            return
        self._records.insert(i, record)

    @property
    def has_checksums(self) -> bool:
        """Whether the format checksums this file's tensor bytes (any record declared)."""
        return bool(self._records)

    def record_at(self, offset: int) -> Record | None:
        """The record whose bytes hold file byte ``offset``, if any."""
        i = bisect.bisect_right(self._records, offset, key=_rec_start) - 1
        if i >= 0:
            r = self._records[i]
            if r.offset <= offset < r.offset + max(r.size, 1):
                return r
        return None

    def check_record(self, record: Record, *, tensor: str | None = None) -> None:
        """Read ``record`` from the file (``pread``, in pieces) and compare its CRC-32.

        Raises:
            CorruptCheckpoint: the bytes differ (naming the record and ``tensor``), or the file
                is shorter than the record.
        """
        view = _crc_buffer()
        crc = 0
        for start in range(0, record.size, CRC_CHUNK):
            piece = view[:min(CRC_CHUNK, record.size - start)]
            self.readinto(record.offset + start, piece)
            crc = crc32(piece, crc)
        if crc != record.crc:
            raise crc_error(record, self.path, tensor)
        self.verified.add(record.offset)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with self._lock:
                if self._mm is None:
                    with open(self.path, "rb") as f:
                        if self.size == 0:
                            raise CorruptCheckpoint("file is empty", path=self.path)
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                        if self._fd is None:
                            self._fd = os.dup(f.fileno())  # the same file as mapped, even if renamed later
                    _register(mm, self)
                    self._mm = mm
        return self._mm

    def tensor(self, offset: int, dtype: torch.dtype | str, count: int) -> torch.Tensor:
        """A 1-D tensor of ``count`` elements viewing the file from byte ``offset`` (zero-copy)."""
        nbytes = count * itemsize(dtype)
        if offset < 0 or offset + nbytes > self.size:
            raise CorruptCheckpoint(
                f"tensor data at bytes {offset}..{offset + nbytes} lies beyond the end of the file "
                f"({self.size} bytes); the file is truncated or damaged", path=self.path,
                hint="download or copy the file again")
        import torch

        dtype = torch_dtype(dtype)
        if count == 0:
            return torch.empty(0, dtype=dtype)
        if self._fill is not None:
            self._fill(offset, nbytes)
        return torch.frombuffer(self._map(), dtype=dtype, count=count, offset=offset)

    def _arrive(self, offset: int, nbytes: int) -> None:
        """Check that bytes ``offset..offset + nbytes`` lie in the file, and fetch them if they arrive on demand."""
        if offset < 0 or offset + nbytes > self.size:
            raise CorruptCheckpoint(f"read of bytes {offset}..{offset + nbytes} beyond the end of the file "
                                    f"({self.size} bytes)", path=self.path)
        if self._fill is not None:
            self._fill(offset, nbytes)

    def read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` raw bytes from ``offset`` (bounds checked)."""
        self._arrive(offset, nbytes)
        mm = self._map()
        return mm[offset:offset + nbytes]

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the file's bytes from ``offset`` (``pread``: no mapping, no seek, thread-safe).

        Raises:
            CorruptCheckpoint: the range lies outside the file, or the file got shorter.
        """
        n = len(buf)
        self._arrive(offset, n)
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                fd = self._fd
        done = 0
        while done < n:
            got = os.preadv(fd, [buf[done:done + _MAX_READ]], offset + done)
            if got <= 0:
                raise CorruptCheckpoint(f"the file ended at byte {offset + done} while reading up to byte "
                                        f"{offset + n}; it was truncated after it was opened", path=self.path,
                                        hint="do not modify a checkpoint while it is being loaded")
            done += got

    def close(self) -> None:
        """Drop this object's reference to the mapping (tensors still using it keep it alive)."""
        self._mm = None
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _register(mm: mmap.mmap, owner: MappedFile) -> None:
    anchor = ctypes.c_char.from_buffer(mm)  # a buffer export, only long enough to read the address
    start = ctypes.addressof(anchor)
    del anchor
    with _MAPPINGS_LOCK:
        _MAPPINGS[:] = [m for m in _MAPPINGS if m[2]() is not None]
        bisect.insort(_MAPPINGS, (start, start + len(mm), weakref.ref(mm), owner), key=_start)


def locate(t: torch.Tensor) -> tuple[MappedFile, int, int] | None:
    """Where a CPU tensor's bytes lie in a file mapped by a :class:`MappedFile`, if they do.

    Returns:
        ``(file, offset, span)``: the byte offset in the file of the tensor's first element
        and the number of bytes from there to the end of its last element; ``None`` for a
        tensor that owns its memory (or views anything but a live mapping).
    """
    if not _MAPPINGS or t.device.type != "cpu":
        return None
    n = t.numel()
    if n == 0:
        return None
    ptr = t.data_ptr()
    with _MAPPINGS_LOCK:
        i = bisect.bisect_right(_MAPPINGS, ptr, key=_start) - 1
        if i < 0:
            return None
        start, end, ref, owner = _MAPPINGS[i]
        if ref() is None or ptr >= end:
            return None
    if t.is_contiguous():
        span = n * t.element_size()
    else:
        last = 0
        for size, step in zip(t.shape, t.stride()):
            if step < 0:
                return None
            last += (size - 1) * step
        span = (last + 1) * t.element_size()
    if ptr + span > end:
        return None
    return owner, ptr - start, span


def _start(m: tuple) -> int:
    return m[0]


def _rec_start(r: Record) -> int:
    return r.offset


@dataclass(frozen=True)
class ByteSpan:
    """The run of a file's bytes that holds a tensor's elements: for comparing tensors without torch.

    The elements lie at ``stride`` (in elements; ``None``: C-contiguous, the run holds exactly
    the tensor) from ``offset``; two tensors of one shape, dtype and stride whose runs hold the
    same bytes are equal. ``record``, when set, is the checksummed record holding them (checked
    by :meth:`chunks`).
    """

    mapped: MappedFile
    offset: int
    nbytes: int
    record: Record | None = None
    stride: tuple[int, ...] | None = None

    def chunks(self, size: int = 16 << 20) -> Iterator[bytes]:
        """The bytes, ``size`` at a time (CRC-checked first when they have a record)."""
        if self.record is not None:
            note_read(self.mapped, self.record)
        for start in range(0, self.nbytes, size):
            yield self.mapped.read(self.offset + start, min(size, self.nbytes - start))


@dataclass(frozen=True, eq=False, slots=True)
class StorageRef:
    """A storage as a pickle references it: dtype, element count, saved device, and where its bytes are.

    ``dtype`` is a name (``"float32"``) or a ``torch.dtype``. ``read`` returns a 1-D CPU tensor of
    ``numel`` elements of ``dtype`` (a view of the file where possible).
    """

    key: str
    dtype: torch.dtype | str
    numel: int
    location: str
    read: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class LazyTensor:
    """A checkpoint tensor whose bytes are read only on :meth:`load`.

    Attributes:
        shape: the tensor's shape.
        dtype: the ``torch.dtype`` it was saved with (asking for it imports torch).
        dtype_name: the same dtype by name (``"float32"``), without torch.
        device: the device it was saved on (``"cpu"``, ``"cuda:0"`` ...); informative only.
        nbytes: bytes of data the tensor itself spans.
        requires_grad: as saved (parameters usually ``True``).
        is_parameter: whether it was saved as an ``nn.Parameter``.
    """

    __slots__ = ("shape", "dtype_name", "_dtype", "device", "requires_grad", "is_parameter", "_reader",
                 "storage_key", "storage_offset", "stride")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype | str, reader: Callable[[], torch.Tensor] | None,
                 *, device: str = "cpu", requires_grad: bool = False, is_parameter: bool = False,
                 storage_key: str | None = None, storage_offset: int = 0,
                 stride: tuple[int, ...] | None = None):
        self.shape = tuple(map(int, shape))
        if isinstance(dtype, str):
            self.dtype_name, self._dtype = dtype_name(dtype), None
        else:
            self.dtype_name, self._dtype = dtype_name(dtype), dtype
        self.device = device
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self._reader = reader
        self.storage_key = storage_key
        self.storage_offset = storage_offset
        self.stride = stride

    @classmethod
    def checked(cls, shape: tuple[int, ...], dtype_name: str, reader: Callable[[], torch.Tensor] | None, device: str,
                requires_grad: bool, storage_key: str | None, storage_offset: int,
                stride: tuple[int, ...] | None) -> "LazyTensor":
        """The lazy tensor ``__init__`` would make from fields its caller has already checked: ``shape`` a tuple
        of ints, ``dtype_name`` a name as :func:`dtype_name` gives it, ``requires_grad`` a bool.

        The pickle interpreter makes one per tensor it rebuilds, after checking each field; this skips
        converting them again.
        """
        t = cls.__new__(cls)
        t.shape = shape
        t.dtype_name = dtype_name
        t._dtype = None
        t.device = device
        t.requires_grad = requires_grad
        t.is_parameter = False
        t._reader = reader
        t.storage_key = storage_key
        t.storage_offset = storage_offset
        t.stride = stride
        return t

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def dtype(self) -> torch.dtype:
        dt = self._dtype
        if dt is None:
            dt = self._dtype = torch_dtype(self.dtype_name)
        return dt

    @dtype.setter
    def dtype(self, value: torch.dtype | str) -> None:
        self.dtype_name, self._dtype = dtype_name(value), None if isinstance(value, str) else value

    @property
    def itemsize(self) -> int:
        return itemsize(self._dtype if self._dtype is not None else self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def load(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read the tensor, as ``dtype`` on ``device`` (defaults: as saved, on the CPU).

        On the CPU with the saved dtype the result views the memory-mapped file (no copy);
        otherwise one conversion copy is made.
        """
        if self._reader is None:
            raise _no_data()
        t = self._reader()
        if tuple(t.shape) != self.shape:
            raise CorruptCheckpoint(f"tensor data has shape {list(t.shape)}, expected {list(self.shape)}")
        return _cast_and_move(t, device, dtype)

    def load_slice(self, index: tuple[slice, ...], device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read only the block ``tensor[index]``, as ``dtype`` on ``device`` (for sharded loading).

        ``index`` holds one ``slice`` (step 1) per leading dimension; dimensions it leaves out
        are taken whole. A reader may carry a ``read_slice(index)`` attribute that reads just
        that block (DCP reads only the chunks that overlap it); otherwise the block is a view
        of the memory-mapped file, so only its pages are touched. Without a cast or a device
        move the result may be such a view (no copy).

        Example:
            >>> lt = LazyTensor.of(torch.arange(12.).view(4, 3))
            >>> lt.load_slice((slice(2, 4),)).tolist()
            [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
        """
        if self._reader is None:
            raise _no_data()
        if len(index) > len(self.shape):
            raise IndexError(f"{len(index)} slices for a tensor of shape {list(self.shape)}")
        block: list[slice] = []
        for i, size in enumerate(self.shape):
            start, stop, step = (index[i] if i < len(index) else slice(None)).indices(size)
            if step != 1:
                raise ValueError(f"load_slice takes slices with step 1, got step {step} in dimension {i}")
            block.append(slice(start, max(start, stop)))
        want = tuple(s.stop - s.start for s in block)
        read_slice = getattr(self._reader, "read_slice", None)
        if read_slice is not None:
            t = read_slice(tuple(block))
        else:
            full = self._reader()
            if tuple(full.shape) != self.shape:
                raise CorruptCheckpoint(f"tensor data has shape {list(full.shape)}, expected {list(self.shape)}")
            t = full[tuple(block)]
        if tuple(t.shape) != want:
            raise CorruptCheckpoint(f"slice of tensor data has shape {list(t.shape)}, expected {list(want)}")
        return _cast_and_move(t, device, dtype)

    def byte_span(self) -> ByteSpan | None:
        """Where the tensor's bytes lie in its file, when they are one C-contiguous run (else ``None``).

        A reader offers it as a ``span()`` attribute; reading through it needs no torch.
        """
        span = getattr(self._reader, "span", None)
        return span() if span is not None else None

    def __repr__(self) -> str:
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype_name}, device={self.device!r})"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "LazyTensor":
        """Wrap an in-memory tensor (a plain state dict handed to ckptfit)."""
        import torch

        t = tensor.detach()
        return cls(tuple(t.shape), t.dtype, lambda: t, device=str(t.device),
                   requires_grad=tensor.requires_grad, is_parameter=isinstance(tensor, torch.nn.Parameter))


def strided_reader(storage: StorageRef, offset: int, shape: tuple[int, ...],
                   stride: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    """A reader that views ``storage`` with the given offset/shape/stride (checked by the caller).

    When the storage's reader offers a ``span()``, so does this one (the run of file bytes the view covers).
    """
    if getattr(storage.read, "span", None) is not None:
        return _StridedSpanRead(storage, offset, shape, stride)
    return _StridedRead(storage, offset, shape, stride)


class _StridedRead:
    """Reads a strided view of a storage. One small object per tensor (no closure cells): a file of 20,000
    tensors keeps 20,000 of them alive, and every object the collector tracks costs at its next pass."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride

    def __call__(self) -> torch.Tensor:
        storage = self.storage
        if storage.read is None:
            raise CorruptCheckpoint(f"storage {storage.key!r} has no data in the file")
        import torch

        return torch.as_strided(storage.read(), self.shape, self.stride, self.offset)


class _StridedSpanRead(_StridedRead):
    """A :class:`_StridedRead` whose storage's reader offers ``span()``: so does it."""

    __slots__ = ()

    def span(self) -> ByteSpan:
        shape, stride = self.shape, self.stride
        whole = self.storage.read.span()  # type: ignore[union-attr]
        size = itemsize(self.storage.dtype)
        count = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))  # elements the view spans
        layout = None if tuple(stride) == _contiguous_strides(shape) else tuple(stride)
        return ByteSpan(whole.mapped, whole.offset + self.offset * size, count * size, whole.record, layout)


def _no_data() -> CorruptCheckpoint:
    return CorruptCheckpoint("this tensor was saved without data (a meta tensor)",
                             hint="the checkpoint holds only shapes for it; it cannot be loaded")


def _cast_and_move(t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as ``dtype`` on ``device`` (either None: as it is); no copy when it already is."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype=dtype)
    if device is not None:
        import torch

        if t.device != torch.device(device):
            t = t.to(device=device)
    return t


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
