"""Tensors described without their bytes, and the mapped files their bytes come from.

A :class:`LazyTensor` knows its shape, dtype, size and saved device; it reads its data only
when :meth:`LazyTensor.load` is called, and then, where the format allows, straight from a
private memory map of the file (no copy until a cast or a device move needs one).
"""
from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpoint

__all__ = ["LazyTensor", "MappedFile", "StorageRef", "dtype_name", "strided_reader"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype.is_complex else dtype.itemsize


class MappedFile:
    """A file mapped privately (copy-on-write) on first use, shared by all its tensors.

    The source file is never written: the mapping is ``ACCESS_COPY``, so a tensor that is
    later modified in place gets private pages and the file on disk stays as it was.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()
        self.size = os.path.getsize(self.path)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with self._lock:
                if self._mm is None:
                    with open(self.path, "rb") as f:
                        if self.size == 0:
                            raise CorruptCheckpoint("file is empty", path=self.path)
                        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def tensor(self, offset: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        """A 1-D tensor of ``count`` elements viewing the file from byte ``offset`` (zero-copy)."""
        nbytes = count * _itemsize(dtype)
        if offset < 0 or offset + nbytes > self.size:
            raise CorruptCheckpoint(
                f"tensor data at bytes {offset}..{offset + nbytes} lies beyond the end of the file "
                f"({self.size} bytes); the file is truncated or damaged", path=self.path,
                hint="download or copy the file again")
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._map(), dtype=dtype, count=count, offset=offset)

    def read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` raw bytes from ``offset`` (bounds checked)."""
        if offset < 0 or offset + nbytes > self.size:
            raise CorruptCheckpoint(f"read of bytes {offset}..{offset + nbytes} beyond the end of the file "
                                    f"({self.size} bytes)", path=self.path)
        mm = self._map()
        return mm[offset:offset + nbytes]

    def close(self) -> None:
        """Drop this object's reference to the mapping (tensors still using it keep it alive)."""
        self._mm = None


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage as a pickle references it: dtype, element count, saved device, and where its bytes are.

    ``read`` returns a 1-D CPU tensor of ``numel`` elements of ``dtype`` (a view of the file
    where possible).
    """

    key: str
    dtype: torch.dtype
    numel: int
    location: str
    read: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


class LazyTensor:
    """A checkpoint tensor whose bytes are read only on :meth:`load`.

    Attributes:
        shape: the tensor's shape.
        dtype: the dtype it was saved with.
        device: the device it was saved on (``"cpu"``, ``"cuda:0"`` ...); informative only.
        nbytes: bytes of data the tensor itself spans.
        requires_grad: as saved (parameters usually ``True``).
        is_parameter: whether it was saved as an ``nn.Parameter``.
    """

    __slots__ = ("shape", "dtype", "device", "requires_grad", "is_parameter", "_reader", "storage_key",
                 "storage_offset", "stride")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, reader: Callable[[], torch.Tensor] | None,
                 *, device: str = "cpu", requires_grad: bool = False, is_parameter: bool = False,
                 storage_key: str | None = None, storage_offset: int = 0,
                 stride: tuple[int, ...] | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.device = device
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self._reader = reader
        self.storage_key = storage_key
        self.storage_offset = storage_offset
        self.stride = stride

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def load(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read the tensor, as ``dtype`` on ``device`` (defaults: as saved, on the CPU).

        On the CPU with the saved dtype the result views the memory-mapped file (no copy);
        otherwise one conversion copy is made.
        """
        if self._reader is None:
            raise CorruptCheckpoint("this tensor was saved without data (a meta tensor)",
                                    hint="the checkpoint holds only shapes for it; it cannot be loaded")
        t = self._reader()
        if tuple(t.shape) != self.shape:
            raise CorruptCheckpoint(f"tensor data has shape {list(t.shape)}, expected {list(self.shape)}")
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype=dtype)
        if device is not None and t.device != torch.device(device):
            t = t.to(device=device)
        return t

    def __repr__(self) -> str:
        return f"LazyTensor(shape={list(self.shape)}, dtype={dtype_name(self.dtype)}, device={self.device!r})"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "LazyTensor":
        """Wrap an in-memory tensor (a plain state dict handed to ckptfit)."""
        t = tensor.detach()
        return cls(tuple(t.shape), t.dtype, lambda: t, device=str(t.device),
                   requires_grad=tensor.requires_grad, is_parameter=isinstance(tensor, torch.nn.Parameter))


def strided_reader(storage: StorageRef, offset: int, shape: tuple[int, ...],
                   stride: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    """A reader that views ``storage`` with the given offset/shape/stride (checked by the caller)."""

    def read() -> torch.Tensor:
        if storage.read is None:
            raise CorruptCheckpoint(f"storage {storage.key!r} has no data in the file")
        return torch.as_strided(storage.read(), shape, stride, offset)

    return read
