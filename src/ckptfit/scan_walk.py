"""What ``ckptfit scan`` accumulates over a file or folder, and the steps each reader's scan hook takes.

:func:`ckptfit.scanning.scan` asks the format registry which reader opens a path and calls that
reader's scan hook (``register(..., scan=hook)``) with a :class:`ScanWalk`; the hook interprets
every pickle its reader would (``walk.run``), on the same restricted interpreter the loader uses,
and follows the other files its reader would open (``walk.scan_path``). Persistent ids become
storages with their declared dtype and size and no bytes (:func:`storage_stub`).
"""
from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .dtypes import itemsize
from .errors import CheckpointError
from .lazy import StorageRef
from .safety import GlobalRef, PickleScan, Placeholder, PlaceholderClass, StorageType, interpret, is_inert

__all__ = ["ScanWalk", "Reference", "RefKind", "fold_references", "storage_stub", "recording_stub",
           "looks_like_pickle", "CRC_MISMATCH", "MAX_SCAN_PICKLE"]

RefKind = Literal["tensor", "data", "inert", "unknown", "dangerous"]
_KIND_ORDER: dict[str, int] = {"dangerous": 0, "unknown": 1, "inert": 2, "data": 3, "tensor": 4}
CRC_MISMATCH = "CRC mismatch"  # the anomaly that makes a file ``damaged``
MAX_SCAN_PICKLE = 1 << 31  # bytes of one pickle a scan reads


@dataclass(frozen=True)
class Reference:
    """One distinct global the file's pickles name, folded over all its uses.

    Attributes:
        module, name: as in the pickle (aliases such as ``__builtin__`` normalised).
        kind: ``tensor``, ``data``, ``inert`` (known to be safe to import and build),
            ``unknown`` (not known to be safe) or ``dangerous``.
        count: how many times it is named.
        calls: how many of those were called or instantiated (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST).
        opcodes: the opcodes that named it (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``EXT1`` ...).
        members: the pickles it appears in (``archive/data.pkl``, ``pickle #4 (object)`` ...).
        first_position: byte offset of its first mention in the first of those pickles.
    """

    module: str
    name: str
    kind: RefKind
    count: int
    calls: int
    opcodes: tuple[str, ...]
    members: tuple[str, ...]
    first_position: int

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def to_dict(self) -> dict:
        return {"global": self.qualname, "module": self.module, "name": self.name, "kind": self.kind,
                "count": self.count, "calls": self.calls, "opcodes": list(self.opcodes),
                "members": list(self.members), "first_position": self.first_position}


@dataclass
class ScanWalk:
    """What the scan of one file or folder accumulates; each reader's scan hook adds to it.

    A hook interprets pickles with :meth:`run` (a damaged one becomes an error, and what it
    named before the damage is kept), records ``anomalies`` / ``errors`` / ``concerns``, sets
    ``format``, and follows the other files its reader would open with :meth:`scan_path`.
    """

    path: str
    format: str = ""
    scans: list[PickleScan] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    concerns: list[str] = field(default_factory=list)
    crc_checked: int = 0
    script_scans: set[int] = field(default_factory=set)  # id() of TorchScript pickles: their __torch__ classes
    seen: set[str] = field(default_factory=set)  # real paths already scanned (symlinks, shared shards)

    def run(self, data: Any, member: str, *, start: int = 0, allow_trailing: bool = False,
            persistent_load: Any = None) -> tuple[Any, PickleScan | None]:
        """Interpret one pickle; a damaged one is an error, and what it named before the damage is kept."""
        sc = PickleScan(member=member)
        try:
            value, _ = interpret(data, start=start, member=member, path=self.path, allow_trailing=allow_trailing,
                                 persistent_load=persistent_load or storage_stub, scan=sc)
        except CheckpointError as e:
            self.scans.append(sc)  # what it named before the damage
            self.errors.append(f"{member}: {e.detail}")
            return None, None
        self.scans.append(sc)
        return value, sc

    def absorb(self, sub: ScanWalk, label: str) -> None:
        """Take in the scan of one file of a folder (or one archive of a file), its names prefixed by ``label``."""
        _relabel(sub.scans, label)
        self.scans.extend(sub.scans)
        self.script_scans |= sub.script_scans
        self.anomalies.extend(f"{label}{a}" for a in sub.anomalies)
        self.errors.extend(f"{label}{e}" for e in sub.errors)
        self.concerns.extend(f"{label}{c}" for c in sub.concerns)
        self.crc_checked += sub.crc_checked
        self.seen |= sub.seen

    def scan_path(self, p: str, label: str) -> str | None:
        """Scan ``p`` as the loader would open it (a file, or a folder through its reader), its findings
        prefixed by ``label``; returns its real path (for the folder walk to skip it)."""
        from .scanning import scan_path

        return scan_path(self, p, label)

    def references(self) -> tuple[Reference, ...]:
        """Every distinct global of every pickle, folded over its uses, most dangerous first."""
        return fold_references(self.scans, self.script_scans)

    def all_anomalies(self) -> tuple[str, ...]:
        return tuple(self.anomalies) + tuple(f"{s.member}: {a}" for s in self.scans for a in s.anomalies)

    def all_concerns(self) -> tuple[str, ...]:
        return tuple(self.concerns) + tuple(f"{s.member}: {u}" for s in self.scans for u in s.unsafe_uses)


def _relabel(scans: Iterable[PickleScan], label: str) -> None:
    if not label:
        return
    for sc in scans:
        sc.member = label + sc.member
        sc.globals[:] = [GlobalRef(g.module, g.name, g.kind, g.opcode, g.position, g.called, label + g.member)
                         for g in sc.globals]


def _ref_kind(g: GlobalRef, script: bool) -> RefKind:
    if g.kind != "unknown":
        return g.kind
    if is_inert(g.module, g.name):
        return "inert"
    if script and (g.module == "__torch__" or g.module.startswith("__torch__.")):
        # a TorchScript archive's own classes, compiled from its code/ and never imported by Python
        return "inert"
    return "unknown"


def fold_references(scans: Iterable[PickleScan], script_scans: set[int] = frozenset()) -> tuple[Reference, ...]:  # type: ignore[assignment]
    groups: dict[tuple[str, str, str], list[GlobalRef]] = collections.OrderedDict()
    calls: collections.Counter = collections.Counter()
    for sc in scans:
        script = id(sc) in script_scans
        for i, g in enumerate(sc.globals):
            key = (g.module, g.name, _ref_kind(g, script))
            groups.setdefault(key, []).append(g)
            calls[key] += sc.calls_of(i)
    refs = []
    for (module, name, kind), gs in groups.items():
        refs.append(Reference(module, name, kind, len(gs), calls[(module, name, kind)],  # type: ignore[arg-type]
                              tuple(dict.fromkeys(g.opcode for g in gs)), tuple(dict.fromkeys(g.member for g in gs)),
                              gs[0].position))
    refs.sort(key=lambda r: (_KIND_ORDER[r.kind], r.qualname))
    return tuple(refs)


def storage_stub(pid: Any) -> Any:
    """Persistent ids as storages with their declared dtype and size, and no bytes."""
    if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
            and type(pid[4]) is int and pid[4] >= 0):
        numel = pid[4]
        dtype = pid[1].dtype
        return StorageRef(pid[2] if isinstance(pid[2], str) else "?", dtype, numel,
                          pid[3] if isinstance(pid[3], str) else "?", None)
    return Placeholder(PlaceholderClass("<persistent id>", "ref"), ())


def recording_stub(records: dict[str, tuple[Any, int]]):
    """:func:`storage_stub`, noting each storage's ``(dtype, bytes)`` in ``records`` (checked against the records)."""

    def load(pid: Any) -> Any:
        ref = storage_stub(pid)
        if isinstance(ref, StorageRef):
            nbytes = ref.numel * (1 if pid[1].name == "UntypedStorage" else itemsize(ref.dtype))
            prev = records.get(ref.key)
            records[ref.key] = (ref.dtype, max(nbytes, prev[1]) if prev else nbytes)
        return ref
    return load


def looks_like_pickle(head: bytes) -> bool:
    """Whether a file starting with ``head`` is one torch.load would unpickle (any protocol, 0 and 1 included)."""
    if head[:1] == b"\x80":
        return len(head) > 1 and head[1] <= 5
    # protocol 0/1 pickles start with an opcode such as MARK, GLOBAL, EMPTY_DICT/LIST, ...
    return head[:1] in (b"(", b"c", b"}", b"]", b"N", b"I", b"S", b"V", b"l", b"d", b"i")
