"""torch.save's zip archives (``.pt``, ``.pth``, Lightning ``.ckpt``, ``pytorch_model.bin``) and TorchScript.

Both are zip archives with a ``data.pkl`` and one stored member per storage
(``data/<key>``). The pickle runs on ckptfit's restricted interpreter; each storage becomes a
view of the memory-mapped file at the member's data offset, so nothing is copied until a
tensor is loaded. A TorchScript archive (``torch.jit.save``) is recognised by its ``code/``
folder; its module tree is read as data (parameters and buffers by attribute name) and its
code is never run.
"""
from __future__ import annotations

import collections
from typing import Any

from ..checkpoint import Checkpoint, StateDictCandidate
from ..errors import CorruptCheckpoint, UnsupportedFormat
from ..dtypes import itemsize
from ..lazy import ByteSpan, LazyTensor, MappedFile, Record, StorageRef, note_read
from ..safety import (PickleScan, Placeholder, PlaceholderClass, StorageType, interpret, load_pickle, merge_extra,
                      refuse_if_dangerous, short_repr)
from . import register
from ._zip import ZipArchive
from .polyglot import refuse_two_archives
from .zip_scan import scan_zip

__all__ = ["open_torch_zip", "read_torch_zip_at", "scan_other_pickles"]

def _sniff(path: str, head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


def prefix_of(archive: ZipArchive) -> tuple[str, bool]:
    """The archive's top folder (``archive/``) and whether it is TorchScript."""
    pkls = [n for n in archive.members if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        if "data.pkl" in archive.members:
            return "", any(n.startswith("code/") for n in archive.members)
        raise _not_torch(archive.path)
    prefix = pkls[0][: -len("data.pkl")]
    is_script = any(n.startswith(prefix + "code/") for n in archive.members) or (prefix + "constants.pkl") in archive.members
    return prefix, is_script


def _not_torch(path: str):
    from ..errors import NotACheckpoint

    return NotACheckpoint("this is a zip archive, but not one written by torch.save or torch.jit.save (no data.pkl "
                          "inside)", path=path, hint="unzip it and pass the checkpoint inside, or check the file")


def _persistent_loader(archive: ZipArchive, prefix: str, mapped: MappedFile, path: str):
    storages: dict[str, StorageRef] = {}
    members = archive.members
    sizes: dict[str, int] = {}  # itemsize by dtype name

    def persistent_load(pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CorruptCheckpoint(f"unexpected persistent id in data.pkl: {short_repr(pid)}", path=path)
        _, stype, key, location, numel = pid[:5]
        if (not isinstance(stype, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0
                or not isinstance(location, str)):
            raise CorruptCheckpoint(f"malformed storage record {short_repr(pid)}", path=path)
        if key in storages:
            return storages[key]
        name = f"{prefix}data/{key}"
        member = members.get(name)
        if member is None:
            raise CorruptCheckpoint(f"data.pkl refers to storage {key!r} but the archive has no {name!r} "
                                    f"(truncated or damaged)", path=path, hint="download or copy the file again")
        dtype = stype.dtype  # a dtype name: torch is imported only when the bytes are read
        size = sizes.get(dtype)
        if size is None:
            size = sizes[dtype] = itemsize(dtype)
        untyped = stype.name == "UntypedStorage"
        nbytes = numel * (size if not untyped else 1)
        if untyped:
            dtype, size = "uint8", 1
        if member.size < nbytes:
            raise CorruptCheckpoint(f"storage {key!r} declares {nbytes} bytes but its record holds {member.size}",
                                    path=path, hint="the file is damaged; download or copy it again")
        if member.compress_type != 0:
            read: Any = _inflating_reader(archive, member, mapped, path, dtype, nbytes // max(size, 1))
        else:
            record = Record(member.name, member.data_offset, member.size, member.crc)
            mapped.add_record(record)
            read = _StoredRead(mapped, record, dtype, nbytes // size, size)
        ref = StorageRef(key, dtype, nbytes // size, str(location), read)
        storages[key] = ref
        return ref

    return persistent_load


class _StoredRead:
    """Reads one stored (uncompressed) storage record: a view of the mapped file, its CRC checked by
    :func:`~ckptfit.lazy.note_read`; ``span()`` is where its bytes lie. (One small object per storage,
    not closures: a file of 20,000 tensors keeps all of them alive.)"""

    __slots__ = ("mapped", "record", "dtype", "count", "size")

    def __init__(self, mapped: MappedFile, record: Record, dtype: str, count: int, size: int):
        self.mapped = mapped
        self.record = record
        self.dtype = dtype
        self.count = count
        self.size = size

    def __call__(self) -> Any:
        note_read(self.mapped, self.record)  # CRC-32 of the whole record: now, or by the loader with its copy
        return self.mapped.tensor(self.record.offset, self.dtype, self.count)

    def span(self) -> ByteSpan:
        return ByteSpan(self.mapped, self.record.offset, self.count * self.size, self.record)


# Compressed tensor records (torch never writes them; a re-zipped archive has them) are inflated when
# the tensor is read, never at open; what all of them may inflate to together is capped per file.
MAX_INFLATE_TOTAL_RATIO = 16  # total inflated / total compressed, beyond a fixed allowance
INFLATE_ALLOWANCE = 64 << 20


def _inflating_reader(archive: ZipArchive, member: Any, mapped: MappedFile, path: str, dtype: str,
                      count: int):
    """A reader that inflates one deflated tensor record when called (CRC checked), after checking the
    file's total: a 10 MB archive of deflated records may not ask for gigabytes."""
    import zlib

    from ..errors import ResourceLimitExceeded
    from ._zip import MAX_INFLATED

    totals = getattr(archive, "_inflate_totals", None)
    if totals is None:
        packed = [m for m in archive.members.values() if m.compress_type != 0]
        totals = (sum(m.size for m in packed), sum(m.compressed_size for m in packed))
        archive._inflate_totals = totals  # type: ignore[attr-defined]
    inflated, compressed = totals
    if inflated > min(MAX_INFLATED, MAX_INFLATE_TOTAL_RATIO * compressed + INFLATE_ALLOWANCE):
        raise ResourceLimitExceeded(
            f"the archive's compressed records would inflate from {compressed} to {inflated} bytes in all (a zip "
            f"bomb?)", path=path, hint="ckptfit refuses it; no data was inflated. Real torch archives store tensors "
                                       "uncompressed: re-save it with torch.save")
    name, offset, csize, size, crc = member.name, member.data_offset, member.compressed_size, member.size, member.crc

    def read():
        import torch

        from ..dtypes import torch_dtype

        raw = mapped.read(offset, csize)
        d = zlib.decompressobj(-15)
        try:
            data = d.decompress(raw, size + 1)
        except zlib.error as e:
            raise CorruptCheckpoint(f"member {name!r} cannot be inflated ({e})", path=path,
                                    hint="the file is damaged; download or copy it again") from e
        if len(data) != size or d.unconsumed_tail:
            raise CorruptCheckpoint(f"member {name!r} does not inflate to its declared {size} bytes", path=path)
        if zlib.crc32(data) != crc:
            raise CorruptCheckpoint(f"member {name!r} fails its CRC check: the bytes differ from what was written",
                                    path=path, hint="the file is damaged; download or copy it again")
        if not count:
            return torch.empty(0, dtype=torch_dtype(dtype))
        return torch.frombuffer(bytearray(data[: count * itemsize(dtype)]), dtype=torch_dtype(dtype), count=count)

    return read


def read_torch_zip_at(path: str, *, base: int = 0, length: int | None = None, mapped: MappedFile | None = None,
                      what: str = "zip archive") -> tuple[Any, Any, ZipArchive]:
    """Interpret the torch zip at ``[base, base+length)`` of ``path``: (value, scan, archive)."""
    archive = ZipArchive(path, base=base, length=length, what=what)
    try:
        prefix, is_script = prefix_of(archive)
        bo = archive.members.get(prefix + "byteorder")
        if bo is not None and archive.read(bo.name, max_size=16).strip() not in (b"little", b""):
            raise UnsupportedFormat("this checkpoint was written on a big-endian machine", path=path,
                                    hint="load it with torch.load on that kind of machine and re-save it")
        mapped = mapped or MappedFile(path)
        data = archive.read(prefix + "data.pkl")
        value, scan = load_pickle(data, persistent_load=_persistent_loader(archive, prefix, mapped, path),
                                  member=prefix + "data.pkl", path=path)
        scan.anomalies.extend(archive.anomalies)
        others = scan_other_pickles(archive, skip=(prefix + "data.pkl",), path=path)
        refuse_if_dangerous(others, path=path)
        merge_extra(scan, others)  # TorchScript's constants.pkl & co: unknown classes and oddities reported too
    finally:
        archive.close()
    return value, scan, (archive, prefix, is_script)


def _inert_storage(pid: Any) -> Any:
    """A storage record of a side pickle: its declared dtype and size, no bytes."""
    if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
            and type(pid[4]) is int and pid[4] >= 0):
        return StorageRef(str(pid[2]) if isinstance(pid[2], str) else "?", pid[1].dtype, pid[4],
                          pid[3] if isinstance(pid[3], str) else "cpu", None)
    return Placeholder(PlaceholderClass("<persistent id>", "ref"), (short_repr(pid),))


def scan_other_pickles(archive: ZipArchive, *, skip: tuple[str, ...] = (), path: str) -> list[PickleScan]:
    """Interpret every pickle member (``*.pkl``, ``*.debug_pkl``) but ``skip`` (TorchScript's ``constants.pkl``, stray pickles).

    torch.jit.load reads them, and a pickle hidden beside ``data.pkl`` is exactly what a
    scanner that reads only ``data.pkl`` would miss; storages they reference stay inert.
    """
    scans = []
    for name in archive.members:
        if name in skip or not name.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl ...
            continue
        data = archive.read(name)
        _, sc = interpret(data, persistent_load=_inert_storage, member=name, path=path)
        scans.append(sc)
    return scans


def _script_state(obj: Any) -> dict[str, LazyTensor]:
    """Parameters and buffers of a TorchScript module tree (attributes in order, depth first)."""
    out: dict[str, LazyTensor] = collections.OrderedDict()
    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while stack:
        prefix, o = stack.pop()
        if id(o) in seen or not isinstance(o, Placeholder):
            continue
        seen.add(id(o))
        children = []
        for k, v in o.attributes().items():
            if isinstance(v, LazyTensor):
                out[prefix + str(k)] = v
            elif isinstance(v, Placeholder) and v.qualname.startswith("__torch__."):
                children.append((prefix + str(k) + ".", v))
        stack.extend(reversed(children))
    return out


@register("torch-zip", sniff=_sniff, priority=10, scan=scan_zip)
def open_torch_zip(path: str, trust: bool = False) -> Checkpoint:
    """Open a torch.save zip archive or a TorchScript archive lazily."""
    if trust:
        return open_trusted(path)  # torch.load itself: what it reads is what is loaded
    refuse_two_archives(path)  # zip archives back to back: torch.load and zipfile read different ones
    mapped = MappedFile(path)
    value, scan, (archive, prefix, is_script) = read_torch_zip_at(path, mapped=mapped, what="torch zip archive")
    if is_script:
        sd = _script_state(value)
        cand = [StateDictCandidate("", sd, "module")]
        tree = sd
        return Checkpoint(path=path, format="torchscript", tree=tree, scans=(scan,), candidates=cand,
                          metadata={"torchscript_class": value.qualname if isinstance(value, Placeholder) else None},
                          closers=(mapped.close,))
    if scan.names_numpy:  # (only numpy's reconstructors rebuild arrays)
        from .numpy_file import numpy_to_tensors  # numpy arrays saved with torch.save are weights too

        value = numpy_to_tensors(value, beside_tensors=True)
    return Checkpoint(path=path, format="torch-zip", tree=value, scans=(scan,), closers=(mapped.close,))



def open_trusted(path: str) -> Checkpoint:
    """Real unpickling (``trust=True``): torch.load with weights_only=False, memory-mapped."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as e:
        if "jit" in str(e).lower() or "TorchScript" in str(e):
            obj = torch.jit.load(path, map_location="cpu")
        else:
            raise CorruptCheckpoint(f"torch.load failed: {e}", path=path) from e
    from .numpy_file import numpy_to_tensors

    return Checkpoint(path=path, format="torch-zip", tree=numpy_to_tensors(wrap_real(obj), beside_tensors=True),
                      trusted=True)


def wrap_real(obj: Any) -> Any:
    """Real objects from a trusted unpickle -> a tree of LazyTensor leaves (modules as state dicts)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return LazyTensor.of(obj)
    if isinstance(obj, torch.nn.Module) or isinstance(obj, torch.jit.ScriptModule):
        return collections.OrderedDict((k, LazyTensor.of(v)) for k, v in obj.state_dict().items())
    if isinstance(obj, dict):
        return type(obj)((k, wrap_real(v)) for k, v in obj.items()) if type(obj) in (dict, collections.OrderedDict) \
            else {k: wrap_real(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(wrap_real(v) for v in obj) if type(obj) in (list, tuple) else [wrap_real(v) for v in obj]
    return obj
