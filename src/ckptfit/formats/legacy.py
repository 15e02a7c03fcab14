"""torch.save's legacy (pre-1.6, non-zip) format, and plain pickle files.

A legacy file is a sequence of pickles: a magic number, the protocol version, system info,
the object itself (storages as persistent ids), then the list of storage keys, then each
storage's raw bytes preceded by its element count. All pickles run on the restricted
interpreter (every one of them is scanned, not only the first); storage offsets are found by
walking the size headers and checked against the file's size, so tensors are read lazily
straight from a memory map.
"""
from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING, Any


from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpoint, UnsupportedFormat
from ..dtypes import itemsize
from ..lazy import ByteSpan, MappedFile, StorageRef
from ..safety import (PlaceholderClass, StorageType, check_depth, interpret, merge_extra, refuse_if_dangerous,
                      scan_trailing, short_repr)
from . import register
from .polyglot import refuse_tar

if TYPE_CHECKING:
    from ..scan_walk import ScanWalk

__all__ = ["open_legacy", "LEGACY_MAGIC"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAGIC_PICKLE = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")


def _sniff(path: str, head: bytes) -> bool:
    # the first pickle is the magic number as a 10-byte LONG1 (b"\x8a\x0a"), after PROTO 2..5
    # (torch.save's pickle_protocol) and, from protocol 4, a FRAME opcode with its 8-byte size
    if len(head) < 4 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if body[:1] == b"\x95":
        body = body[9:]
    return body.startswith(b"\x8a\x0a")


def scan_legacy(w: ScanWalk, path: str) -> None:
    """The ``torch-legacy`` reader's scan hook: its five pickles, then the storage section against them."""
    from ..scan_walk import recording_stub

    w.format = "torch-legacy"
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    records: dict[str, tuple[Any, int]] = {}
    keys: Any = None
    labels = ("magic number", "protocol version", "system info", "object", "storage keys")
    values = []
    for i, what in enumerate(labels):
        value, sc = w.run(data, f"pickle #{i + 1} ({what})", start=pos, allow_trailing=True,
                          persistent_load=recording_stub(records) if i == 3 else None)
        if sc is None:
            return
        values.append(value)
        pos = sc.end
    if values[0] != LEGACY_MAGIC:
        w.anomalies.append("the legacy header has a wrong magic number")
    keys = values[4]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        w.errors.append("the legacy storage key list is malformed")
        return
    for key in keys:
        if pos + 8 > len(data):
            w.errors.append(f"the file ends before storage {key!r} (truncated)")
            return
        (numel,) = struct.unpack_from("<q", data, pos)
        rec = records.get(key)
        if rec is None:
            w.anomalies.append(f"storage {key!r} is listed but never referenced")
            return
        size = itemsize(rec[0])
        if numel < 0 or numel * size != rec[1]:
            w.anomalies.append(f"storage {key!r} declares {numel} elements in the data section, not "
                               f"{rec[1] // max(size, 1)} as in the pickle")
        pos += 8 + max(numel, 0) * size
        if pos > len(data):
            w.errors.append(f"storage {key!r} runs {pos - len(data)} bytes past the end of the file (truncated)")
            return
    if pos < len(data):
        w.anomalies.append(f"{len(data) - pos} byte(s) of trailing data after the last storage")
        w.scans.extend(scan_trailing(data, pos, member="after the last storage:", path=path))


@register("torch-legacy", sniff=_sniff, priority=9, scan=scan_legacy)
def open_legacy(path: str, trust: bool = False) -> Checkpoint:
    """Open a legacy torch.save file lazily."""
    if trust:
        from .torch_zip import open_trusted

        ck = open_trusted(path)
        ck.format = "torch-legacy"
        return ck
    refuse_tar(path, "a legacy torch file")  # torch.load would read it as a tar archive instead
    mapped = MappedFile(path)
    if mapped.size <= len(_MAGIC_PICKLE):
        raise CorruptCheckpoint(f"the file holds only {mapped.size} bytes, the start of a legacy torch file: "
                                f"truncated", path=path, hint="download or copy the file again")
    with open(path, "rb") as f:  # the pickles sit at the front, storages follow; sizes are validated below
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = memoryview(mm)
    scans = []
    pos = 0
    header: list[Any] = []
    for i, what in enumerate(("magic number", "protocol version", "system info")):
        value, scan = interpret(data, start=pos, member=f"pickle #{i + 1} ({what})", path=path, allow_trailing=True)
        scans.append(scan)
        header.append(value)
        pos = scan.end
    refuse_if_dangerous(scans, path=path)
    if header[0] != LEGACY_MAGIC:
        raise CorruptCheckpoint("the legacy torch header has a wrong magic number", path=path)
    if header[1] != 1001:
        raise UnsupportedFormat(f"legacy torch protocol version {header[1]!r} is not supported", path=path)
    if isinstance(header[2], dict) and header[2].get("little_endian") is False:
        raise UnsupportedFormat("this checkpoint was written on a big-endian machine", path=path)

    records: dict[str, tuple[str, int, str]] = {}  # key -> (dtype name, numel, location)
    views: list[tuple[str, str, int, int]] = []
    refs: dict[str, StorageRef] = {}
    offsets: dict[str, int] = {}

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            return PlaceholderClass("legacy_module_source", str(pid[1]) if len(pid) > 1 else "?")
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CorruptCheckpoint(f"unexpected persistent id {short_repr(pid)}", path=path)
        _, stype, key, location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if (not isinstance(stype, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0
                or not isinstance(location, str)):
            raise CorruptCheckpoint(f"malformed storage record {short_repr(pid)}", path=path)
        if numel * itemsize(stype.dtype) > len(data):  # bounds before anything is built on it
            raise CorruptCheckpoint(f"storage {key!r} declares {numel} elements ({numel * itemsize(stype.dtype)} "
                                    f"bytes) but the whole file holds {len(data)} bytes (truncated or damaged)",
                                    path=path, hint="download or copy the file again")
        records.setdefault(key, (stype.dtype, numel, location))
        ref = refs.get(key)
        if ref is None:
            dtype = stype.dtype
            ref = StorageRef(key, dtype, numel, str(location), _LegacyRead(mapped, offsets, records, key, dtype))
            refs[key] = ref
        if view is not None:
            if not isinstance(view, tuple) or len(view) != 3:
                raise CorruptCheckpoint("malformed storage view record", path=path)
            view_key, off, size = view
            if (not isinstance(view_key, str) or type(off) is not int or type(size) is not int or off < 0
                    or size < 0 or off + size > ref.numel):
                raise CorruptCheckpoint(f"storage view record of {key!r} is malformed or lies outside its storage",
                                        path=path)
            base = ref

            def read_view(base=base, off=off, size=size):
                return base.read()[off:off + size]

            return StorageRef(view_key, base.dtype, size, base.location, read_view)
        return ref

    value, scan = interpret(data, start=pos, persistent_load=persistent_load, member="pickle #4 (object)",
                            path=path, allow_trailing=True)
    scans.append(scan)
    pos = scan.end
    keys, scan = interpret(data, start=pos, member="pickle #5 (storage keys)", path=path, allow_trailing=True)
    scans.append(scan)
    refuse_if_dangerous(scans, path=path)
    check_depth(value, path=path, member="pickle #4 (object)")
    pos = scan.end
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptCheckpoint("the legacy storage key list is malformed", path=path)
    for key in keys:
        if key not in records:
            raise CorruptCheckpoint(f"storage {key!r} is listed but never referenced", path=path)
        dtype, numel, _ = records[key]
        if pos + 8 > len(data):
            raise CorruptCheckpoint(f"the file ends before storage {key!r} (truncated)", path=path,
                                    hint="download or copy the file again")
        (declared,) = struct.unpack_from("<q", data, pos)
        if declared != numel:
            raise CorruptCheckpoint(f"storage {key!r} declares {declared} elements in the data section but "
                                    f"{numel} in the pickle", path=path)
        pos += 8
        offsets[key] = pos
        pos += numel * itemsize(dtype)
        if pos > len(data):
            raise CorruptCheckpoint(f"storage {key!r} needs {numel * itemsize(dtype)} bytes but the file ends "
                                    f"{pos - len(data)} bytes early (truncated)", path=path,
                                    hint="download or copy the file again")
    missing = set(records) - set(offsets)
    if missing:
        raise CorruptCheckpoint(f"storages {sorted(missing)[:5]} have no data in the file", path=path)
    if pos < len(data):
        scans[-1].anomalies.append(f"{len(data) - pos} byte(s) of trailing data after the last storage")
        merge_extra(scans[-1], scan_trailing(data, pos, member="after the last storage:", path=path))
        refuse_if_dangerous(scans, path=path)
    md = {"sys_info": header[2]} if isinstance(header[2], dict) else {}
    if any(sc.names_numpy for sc in scans):  # (only numpy's reconstructors rebuild arrays)
        from .numpy_file import numpy_to_tensors

        value = numpy_to_tensors(value, beside_tensors=True)
    return Checkpoint(path=path, format="torch-legacy", tree=value, scans=tuple(scans), metadata=md,
                      closers=(mapped.close,))


class _LegacyRead:
    """Reads one storage of a legacy file, from where the data section puts it (known once the whole
    pickle is read); ``span()`` is where its bytes lie. One small object per storage, not closures."""

    __slots__ = ("mapped", "offsets", "records", "key", "dtype")

    def __init__(self, mapped: MappedFile, offsets: dict[str, int], records: dict[str, tuple[str, int, str]],
                 key: str, dtype: str):
        self.mapped = mapped
        self.offsets = offsets
        self.records = records
        self.key = key
        self.dtype = dtype

    def __call__(self) -> Any:
        return self.mapped.tensor(self.offsets[self.key], self.dtype, self.records[self.key][1])

    def span(self) -> ByteSpan:
        return ByteSpan(self.mapped, self.offsets[self.key], self.records[self.key][1] * itemsize(self.dtype))
