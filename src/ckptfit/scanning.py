"""``ckptfit scan``: everything a file's pickles would import, call or build, and what is odd about it.

The scan runs every pickle of the file on the same restricted interpreter the loader uses
(:func:`ckptfit.safety.interpret`), so the scanner and the loader can never disagree about a
file. Which bytes are pickles is decided the way the loaders decide it: the format comes from
the readers' registry (:func:`ckptfit.formats.detect`), folders are read through the files
their reader would open (a shard index's shards, a DCP ``.metadata``'s storage records,
whatever their names, at their offsets), and a file is also read the way ``torch.load``
would read it where that differs (a tar archive, zip archives back to back). It covers torch
zip archives (every pickle member: ``data.pkl``, TorchScript's ``constants.pkl`` and
``*.debug_pkl``, and any other), legacy torch files (every pickle, and the storage section),
plain pickles, numpy ``.npy`` (an object array is a pickle) and ``.npz`` files, safetensors
(no pickle: its header is validated) and checkpoint folders. Nothing in the file runs, and no
module it names is imported.

The verdict comes from an allowlist. Each global is classed as ``tensor`` (torch's rebuild
machinery), ``data`` (rebuilt as plain data), ``inert`` (a class known to be inert under real
unpickling too: ``argparse.Namespace``, ``pathlib`` paths, ``torch.nn`` modules ...),
``dangerous`` (known to run code) or ``unknown`` (anything else: real unpickling would import
it, and nothing says that is safe). ``clean`` means every global is tensor, data or inert and
nothing else would run code; ckptfit itself loads ``unknown`` classes as inert placeholders.
Anomalies are oddities that are not in themselves code: CRC mismatches, trailing data, extra
pickles, storages larger than their records.

Example:
    >>> report = ckptfit.scan("downloaded.pth")                        # doctest: +SKIP
    >>> report.verdict, [r.qualname for r in report.dangerous]    # doctest: +SKIP
    ('dangerous', ['posix.system'])
"""
from __future__ import annotations

import ast
import collections
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .dtypes import itemsize
from .errors import CheckpointError, NotACheckpoint
from .lazy import StorageRef
from .safety import GlobalRef, PickleScan, StorageType, interpret, is_inert

__all__ = ["scan", "ScanReport", "Reference", "render_text", "render_rich", "EXIT_CODES"]

RefKind = Literal["tensor", "data", "inert", "unknown", "dangerous"]
_KIND_ORDER: dict[str, int] = {"dangerous": 0, "unknown": 1, "inert": 2, "data": 3, "tensor": 4}
# The CLI's exit status for each verdict (as in ckptfit._cli_common.EXIT_CODES, the CLI's one table)
EXIT_CODES: dict[str, int] = {"clean": 0, "error": 1, "not known to be safe": 3, "damaged": 4, "dangerous": 5}
_CRC_MISMATCH = "CRC mismatch"  # the anomaly that makes a file ``damaged``
MAX_DIR_FILES = 100_000  # files a folder scan looks at
MAX_NPY_HEADER = 10_000  # as numpy's own default for np.load
MAX_SCAN_PICKLE = 1 << 31


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


@dataclass(frozen=True)
class ScanReport:
    """What :func:`scan` found in one file or folder.

    Attributes:
        path: the file or folder scanned.
        format: ``torch-zip``, ``torchscript``, ``torch-legacy``, ``pickle``, ``npy``, ``npz``,
            ``safetensors``, ``zip`` or ``directory``.
        pickles: every pickle interpreted, by member name.
        references: every distinct global, most dangerous first.
        anomalies: oddities found (CRC mismatch, trailing data, extra pickles ...).
        errors: parts of the file that could not be read (damaged pickles, bombs); what they
            referenced before the damage is still listed.
        crc_checked: zip records whose CRC was verified.
        concerns: what would run code under real unpickling besides the globals themselves (a
            class's ``__init__`` called by ``copyreg._reconstructor``, a tar archive torch.load
            would read instead, zip archives back to back that readers pick differently).
    """

    path: str
    format: str
    pickles: tuple[str, ...] = ()
    references: tuple[Reference, ...] = ()
    anomalies: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    crc_checked: int = 0
    concerns: tuple[str, ...] = ()

    @property
    def dangerous(self) -> list[Reference]:
        return [r for r in self.references if r.kind == "dangerous"]

    @property
    def unknown(self) -> list[Reference]:
        """Globals not known to be safe: real unpickling would import them (ckptfit keeps them inert)."""
        return [r for r in self.references if r.kind == "unknown"]

    @property
    def inert(self) -> list[Reference]:
        """Classes known to be inert, read as placeholders: argparse.Namespace, pathlib paths, torch.nn modules ..."""
        return [r for r in self.references if r.kind == "inert"]

    @property
    def damaged(self) -> list[str]:
        """Records whose bytes fail their CRC check (the anomalies that say so)."""
        return [a for a in self.anomalies if _CRC_MISMATCH in a]

    @property
    def verdict(self) -> str:
        """``dangerous`` (would run code), ``damaged`` (bytes fail their CRC check: the file is not
        what was written), ``error`` (unreadable parts, nothing dangerous seen),
        ``not known to be safe`` (would import something outside the allowlist, or run code in another
        way) or ``clean`` (only tensors, plain data and known inert classes)."""
        if self.dangerous:
            return "dangerous"
        if self.damaged:
            return "damaged"
        if self.errors:
            return "error"
        if self.unknown or self.concerns:
            return "not known to be safe"
        return "clean"

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 0 clean, 1 error, 3 not known to be safe, 4 damaged, 5 dangerous."""
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "verdict": self.verdict, "exit_code": self.exit_code,
                "pickles": list(self.pickles), "references": [r.to_dict() for r in self.references],
                "dangerous": [r.qualname for r in self.dangerous], "unknown": [r.qualname for r in self.unknown],
                "inert": [r.qualname for r in self.inert], "concerns": list(self.concerns),
                "anomalies": list(self.anomalies), "errors": list(self.errors), "crc_checked": self.crc_checked,
                "damaged": self.damaged}

    def __str__(self) -> str:
        return render_text(self)

    def __rich__(self) -> Any:
        return render_rich(self)


# ------------------------------------------------------------------------------------------- rendering

def _row(r: Reference) -> tuple[str, str, str, str]:
    uses = f"named {r.count}x" + (f", {r.calls} call(s)" if r.calls else ", never called")
    where = ", ".join(r.members[:3]) + (f" +{len(r.members) - 3}" if len(r.members) > 3 else "")
    return r.kind, r.qualname, uses, where


_VERDICT_TEXT = {
    "dangerous": "DANGEROUS: loading this with pickle / torch.load(weights_only=False) would run code",
    "error": "ERROR: parts of the file could not be read",
    "damaged": "DAMAGED: some bytes differ from what was written (CRC mismatch); ckptfit refuses to load them: "
               "download or copy the file again",
    "not known to be safe": "NOT KNOWN TO BE SAFE: {what}; do not pass --trust (ckptfit loads it without "
                            "importing anything)",
    "clean": "clean: only tensors, plain data and known inert classes; torch.load(weights_only=False) would "
             "run no code from this file",
}


def _verdict_text(report: ScanReport) -> str:
    text = _VERDICT_TEXT[report.verdict]
    if report.verdict == "not known to be safe":
        names = [r.qualname for r in report.unknown]
        what = [f"would import {', '.join(names[:5])}{f' +{len(names) - 5}' if len(names) > 5 else ''}: not known "
                f"to be safe"] if names else []
        what += [c.splitlines()[0] for c in report.concerns[:2]]
        text = text.format(what="; ".join(what))
    return text


def render_text(report: ScanReport) -> str:
    """The report as plain text (one line per distinct global, grouped by kind)."""
    lines = [f"{report.path}: {report.format}, {len(report.pickles)} pickle(s)"
             + (f", {report.crc_checked} CRC(s) checked" if report.crc_checked else ""),
             f"verdict: {_verdict_text(report)}"]
    for r in report.references:
        kind, q, uses, where = _row(r)
        lines.append(f"  {kind:<9} {q}  ({uses}; in {where})")
    for c in report.concerns:
        lines.append(f"  concern: {c}")
    for a in report.anomalies:
        lines.append(f"  anomaly: {a}")
    for e in report.errors:
        lines.append(f"  error: {e.splitlines()[0]}")
    from .report import printable

    return printable("\n".join(lines))


# A person reads the table: the riskiest globals first, and no more rows than fit on a few screens.
_ROW_ORDER = {"dangerous": 0, "unknown": 1, "inert": 2, "data": 3, "tensor": 4}
_MAX_ROWS = 60


def render_rich(report: ScanReport) -> Any:
    """The report as a rich renderable (a table of globals, then anomalies and errors)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text as _Text

    from .report import printable

    def Text(text: str = "", **kw: Any) -> _Text:  # noqa: N802 - names from the file, never markup or escapes
        return _Text(printable(text), **kw)

    style = {"dangerous": "bold red", "unknown": "yellow", "inert": "green", "data": "green", "tensor": "cyan"}
    head = Text(f"{report.path}: {report.format}, {len(report.pickles)} pickle(s)"
                + (f", {report.crc_checked} CRC(s) checked" if report.crc_checked else ""))
    verdict = Text(f"verdict: {_verdict_text(report)}",
                   style={"dangerous": "bold red", "damaged": "bold red", "error": "red",
                          "not known to be safe": "bold yellow"}.get(
                       report.verdict, "green"))
    parts: list[Any] = [head, verdict]
    if report.references:
        table = Table("Kind", "Global", "Uses", "Where")
        rows = sorted((_row(r) for r in report.references), key=lambda row: _ROW_ORDER.get(row[0], len(_ROW_ORDER)))
        for kind, q, uses, where in rows[:_MAX_ROWS]:
            table.add_row(Text(kind, style=style[kind]), *(Text(printable(x, newlines=False)) for x in (q, uses, where)))
        parts.append(table)
        if len(rows) > _MAX_ROWS:
            parts.append(Text(f"... and {len(rows) - _MAX_ROWS} more globals, the riskiest shown first "
                              "(--json lists every one)"))
    parts.extend(Text(f"concern: {c}", style="yellow") for c in report.concerns)
    parts.extend(Text(f"anomaly: {a}", style="yellow") for a in report.anomalies)
    parts.extend(Text(f"error: {e.splitlines()[0]}", style="red") for e in report.errors)
    return Group(*parts)


# ------------------------------------------------------------------------------------------- the walk

@dataclass
class _Walk:
    """What the scan of one file or folder accumulates."""

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
                                 persistent_load=persistent_load or _storage_stub, scan=sc)
        except CheckpointError as e:
            self.scans.append(sc)  # what it named before the damage
            self.errors.append(f"{member}: {e.detail}")
            return None, None
        self.scans.append(sc)
        return value, sc

    def absorb(self, sub: _Walk, label: str) -> None:
        """Take in the scan of one file of a folder (or one archive of a file), its names prefixed by ``label``."""
        _relabel(sub.scans, label)
        self.scans.extend(sub.scans)
        self.script_scans |= sub.script_scans
        self.anomalies.extend(f"{label}{a}" for a in sub.anomalies)
        self.errors.extend(f"{label}{e}" for e in sub.errors)
        self.concerns.extend(f"{label}{c}" for c in sub.concerns)
        self.crc_checked += sub.crc_checked
        self.seen |= sub.seen

    def report(self) -> ScanReport:
        return ScanReport(self.path, self.format, tuple(s.member for s in self.scans),
                          _fold(self.scans, self.script_scans),
                          tuple(self.anomalies) + tuple(f"{s.member}: {a}" for s in self.scans for a in s.anomalies),
                          tuple(self.errors), self.crc_checked,
                          tuple(self.concerns) + tuple(f"{s.member}: {u}" for s in self.scans for u in s.unsafe_uses))


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


def _fold(scans: Iterable[PickleScan], script_scans: set[int] = frozenset()) -> tuple[Reference, ...]:  # type: ignore[assignment]
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


def _storage_stub(pid: Any) -> Any:
    """Persistent ids as storages with their declared dtype and size, and no bytes."""
    if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
            and type(pid[4]) is int and pid[4] >= 0):
        numel = pid[4]
        dtype = pid[1].dtype
        return StorageRef(pid[2] if isinstance(pid[2], str) else "?", dtype, numel,
                          pid[3] if isinstance(pid[3], str) else "?", None)
    from .safety import Placeholder, PlaceholderClass

    return Placeholder(PlaceholderClass("<persistent id>", "ref"), ())


def _recording_stub(records: dict[str, tuple[Any, int]]):
    def load(pid: Any) -> Any:
        ref = _storage_stub(pid)
        if isinstance(ref, StorageRef):
            nbytes = ref.numel * (1 if pid[1].name == "UntypedStorage" else itemsize(ref.dtype))
            prev = records.get(ref.key)
            records[ref.key] = (ref.dtype, max(nbytes, prev[1]) if prev else nbytes)
        return ref
    return load


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Scan a checkpoint file or folder without running or importing anything it names.

    The file is read as ckptfit's loaders read it (the reader the format registry picks, and
    for a folder the files and byte ranges that reader opens) and, where ``torch.load`` would
    read it otherwise (a tar archive, zip archives back to back), that way too.

    Args:
        path: a torch zip / TorchScript archive, legacy torch file, plain pickle, ``.npy``,
            ``.npz``, safetensors file, or a checkpoint folder.

    Returns:
        A :class:`ScanReport`: every global with its kind and uses, anomalies and errors, and a
        verdict: ``clean`` only when every global is known to be safe.

    Raises:
        NotACheckpoint: the input is none of the above (empty, HTML, LFS pointer, archive ...).
        CheckpointError: the path does not exist.

    Example:
        >>> print(ckptfit.scan("model.pth"))                          # doctest: +SKIP
        model.pth: torch-zip, 1 pickle(s), 123 CRC(s) checked
        verdict: clean: only tensors, plain data and known inert classes; ...
    """
    from .sources import is_remote, local_file

    path = os.fspath(path)
    if is_remote(path):  # scan reads every byte: the whole file is fetched into ckptfit's cache first
        path = local_file(path)
    if not os.path.exists(path):
        raise CheckpointError("no such file or directory", path=path, hint="check the path")
    from .formats import check_regular

    check_regular(path, directory_ok=True)  # a FIFO or a device is refused, never opened (it could block)
    w = _Walk(path)
    w.seen.add(os.path.realpath(path))
    if os.path.isdir(path):
        _scan_dir(w, path)
    else:
        _scan_file(w, path)
    return w.report()


def _head(path: str, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _reader(path: str) -> Any:
    """The registered reader ckptfit's loader would use for ``path``, or None when none claims it."""
    from .formats import detect

    try:
        return detect(path)
    except NotACheckpoint:
        return None


def _scan_file(w: _Walk, path: str) -> None:
    """One file, read by the reader the registry picks (and by torch.load's own rules where they differ)."""
    from .formats import not_a_checkpoint

    head = _head(path)
    reader = _reader(path)
    name = reader.name if reader is not None else None
    if name in ("torch-zip", "npz"):
        _scan_zip(w, path)
        return  # torch.load reads a file that starts like a zip as a zip, never as a tar
    if name == "torch-legacy":
        _scan_legacy(w, path)
    elif name == "safetensors":
        from .formats.safetensors_file import read_header

        w.format = "safetensors"
        try:
            read_header(path)
        except CheckpointError as e:
            w.errors.append(e.detail)
    elif name == "pickle" or (name is None and _looks_like_pickle(head)):
        # torch.load unpickles any non-zip, non-tar file with the real unpickler: protocol 0/1 included
        _scan_plain_pickle(w, path)
    elif name in (None, "npy") and head.startswith(b"\x93NUMPY"):
        w.format = "npy"
        with open(path, "rb") as f:
            _scan_npy(w, f.read(), os.path.basename(path))
    elif name is None and head.startswith(b"PK\x05\x06"):
        _scan_zip(w, path)
    elif name is not None:  # a reader registered by someone else: scan cannot tell what it reads
        w.format = name
        w.concerns.append(f"read by the {name!r} reader, whose pickles ckptfit scan does not know how to find")
    else:
        if not _scan_tar(w, path):
            raise not_a_checkpoint(path, head)
        return
    _scan_tar(w, path)


def _scan_plain_pickle(w: _Walk, path: str) -> None:
    w.format = "pickle"
    if os.path.getsize(path) > MAX_SCAN_PICKLE:
        w.errors.append(f"a {os.path.getsize(path)}-byte pickle is beyond what ckptfit scans")
        return
    with open(path, "rb") as f:
        data = f.read()
    w.run(data, "pickle")


def _looks_like_pickle(head: bytes) -> bool:
    if head[:1] == b"\x80":
        return len(head) > 1 and head[1] <= 5
    # protocol 0/1 pickles start with an opcode such as MARK, GLOBAL, EMPTY_DICT/LIST, ...
    return head[:1] in (b"(", b"c", b"}", b"]", b"N", b"I", b"S", b"V", b"l", b"d", b"i")


MAX_TAR_MEMBERS = 10_000


def _scan_tar(w: _Walk, path: str) -> bool:
    """torch.load tries every non-zip file as a tar archive first (torch's pre-0.4 format) and, when it is
    one, unpickles its ``storages``, ``tensors`` and ``pickle`` members with the real unpickler. A file
    that is both a tar and something else is read here the way torch.load would read it."""
    import tarfile

    if os.path.getsize(path) < 512:
        return False
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False
    with tar:
        w.format = f"{w.format}+tar" if w.format else "tar"
        w.concerns.append("the file is a tar archive: torch.load reads it as torch's old tar format, unpickling "
                          "its 'storages', 'tensors' and 'pickle' members with the real unpickler, and ckptfit "
                          "reads no such format")
        try:
            members = []
            for m in tar:
                members.append(m)
                if len(members) > MAX_TAR_MEMBERS:
                    w.errors.append(f"the tar archive holds more than {MAX_TAR_MEMBERS} members")
                    return True
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            w.errors.append(f"the tar archive is damaged ({type(e).__name__}: {e})")
        for m in members:
            if not m.isfile() or os.path.basename(m.name) not in ("storages", "tensors", "pickle"):
                continue
            if m.size > MAX_SCAN_PICKLE:
                w.errors.append(f"tar member {m.name!r} of {m.size} bytes is beyond what ckptfit scans")
                continue
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            value, sc = w.run(data, f"tar:{m.name}", allow_trailing=True)
            if sc is not None and sc.end < len(data):
                from .safety import scan_trailing

                w.scans.extend(scan_trailing(data, sc.end, member=f"tar:{m.name}", path=path))
    return True


def _zip_concat(path: str) -> tuple[int, int]:
    """``(concat, cd_offset)`` of the zip end record Python's zipfile uses: ``concat`` bytes precede the
    archive it reads (0 for a file written by torch.save); the end record says its central directory is
    at ``cd_offset``, which torch's reader takes as an absolute position."""
    import zipfile

    try:
        with open(path, "rb") as f:
            endrec = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the stdlib's own reading
    except (OSError, struct.error, ValueError):
        return 0, 0
    if not endrec:
        return 0, 0
    size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # type: ignore[attr-defined]
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    return concat, offset_cd


def _embedded_archives(path: str) -> list[tuple[int, int]]:
    """``(base, length)`` of each torch archive concatenated in a DCP ``.distcp`` file, in order."""
    with open(path, "rb") as f:
        data = f.read()
    spans = []
    base = 0
    while base < len(data):
        i = data.find(b"PK\x05\x06", base)
        if i < 0 or i + 22 > len(data):
            break
        (clen,) = struct.unpack_from("<H", data, i + 20)
        end = i + 22 + clen
        spans.append((base, end - base))
        base = end
    return spans if base == len(data) else []


def _scan_zip(w: _Walk, path: str) -> None:
    if path.endswith(".distcp"):
        spans = _embedded_archives(path)
        if len(spans) > 1:
            for base, length in spans:
                _scan_one_zip(w, path, base, length, label=f"@{base}:")
            return
    concat, cd_offset = _zip_concat(path)
    if concat > 0:
        # Zip archives back to back: Python's zipfile (and ckptfit's reader) reads the last one, torch's
        # reader follows the end record's offsets from the start of the file, into the first. Both are read.
        w.concerns.append(f"the file holds zip archives back to back (the last starts at byte {concat}): torch.load "
                          f"reads the central directory at byte {cd_offset} from the start of the file, Python's "
                          f"zipfile the last archive; ckptfit scanned both")
        _scan_one_zip(w, path, 0, concat, label="@0:")
        _scan_one_zip(w, path, 0, None, label=f"@{concat}:")
        return
    _scan_one_zip(w, path, 0, None)


def _scan_one_zip(w: _Walk, path: str, base: int, length: int | None, label: str = "") -> None:
    from .formats._zip import ZipArchive

    sub = _Walk(path)
    try:
        archive = ZipArchive(path, base=base, length=length, what="zip archive")
    except CheckpointError as e:
        w.format = w.format or "zip"
        w.errors.append(label + e.detail)
        return
    try:
        sub.anomalies.extend(archive.anomalies)
        names = list(archive.members)
        if any(n.endswith("data.pkl") for n in names):
            from .formats.torch_zip import prefix_of  # the data.pkl the loader reads

            try:
                prefix, is_script = prefix_of(archive)
            except CheckpointError:
                prefix, is_script = "", False
            sub.format = "torchscript" if is_script else "torch-zip"
            _scan_torch_members(sub, archive, prefix)
            if is_script:
                sub.script_scans |= {id(sc) for sc in sub.scans}
                _check_script_code(sub, archive, prefix)
        elif names and all(n.endswith(".npy") for n in names):
            sub.format = "npz"
            for n in names:
                try:
                    data = archive.read(n)
                except CheckpointError as e:
                    sub.errors.append(f"{n}: {e.detail}")
                    continue
                _scan_npy(sub, data, n)
        else:
            sub.format = "zip"
            sub.anomalies.append("a zip archive without data.pkl: not written by torch.save or torch.jit.save")
            for n in names:
                if n.endswith("pkl"):
                    _read_and_run(sub, archive, n)
        bad = archive.verify_all()
        sub.crc_checked += len(archive.members)
        sub.anomalies.extend(f"{n}: {_CRC_MISMATCH} (the bytes differ from what was written)" for n in bad)
    finally:
        archive.close()
    w.format = w.format or sub.format
    w.absorb(sub, label)


def _check_script_code(w: _Walk, archive: Any, prefix: str) -> None:
    """TorchScript classes may define ``__setstate__``, which torch.jit.load runs while loading."""
    for n in archive.members:
        if n.startswith(prefix + "code/") and n.endswith(".py"):
            try:
                code = archive.read(n, max_size=64 << 20)
            except CheckpointError as e:
                w.errors.append(f"{n}: {e.detail}")
                continue
            if b"__setstate__" in code:
                w.concerns.append(f"{n} defines __setstate__: TorchScript code that torch.jit.load runs on load")


def _read_and_run(w: _Walk, archive: Any, name: str, persistent_load: Any = None) -> None:
    try:
        data = archive.read(name)
    except CheckpointError as e:
        w.errors.append(f"{name}: {e.detail}")
        return
    w.run(data, name, persistent_load=persistent_load)


def _scan_torch_members(w: _Walk, archive: Any, prefix: str) -> None:
    records: dict[str, tuple[Any, int]] = {}
    for name in archive.members:
        if name.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl, and any stray pickle
            _read_and_run(w, archive, name, _recording_stub(records) if name == prefix + "data.pkl" else None)
    for key, (_dtype, nbytes) in records.items():
        m = archive.members.get(f"{prefix}data/{key}")
        if m is None:
            w.anomalies.append(f"data.pkl refers to storage {key!r} but the archive has no record for it")
        elif m.size < nbytes:
            w.anomalies.append(f"storage {key!r} declares {nbytes} bytes but its record holds {m.size}")


def _scan_legacy(w: _Walk, path: str) -> None:
    from .formats.legacy import LEGACY_MAGIC

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
                          persistent_load=_recording_stub(records) if i == 3 else None)
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
        from .safety import scan_trailing

        w.anomalies.append(f"{len(data) - pos} byte(s) of trailing data after the last storage")
        w.scans.extend(scan_trailing(data, pos, member="after the last storage:", path=path))


def _scan_npy(w: _Walk, data: bytes, member: str) -> None:
    """A ``.npy``: header validated; an object array's data is a pickle and is interpreted."""
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


def _scan_dir(w: _Walk, path: str) -> None:
    """A checkpoint folder: the files (and byte ranges) its reader would open, then every other file in it."""
    reader = _reader(path)
    w.format = reader.name if reader is not None else "directory"
    covered: set[str] = set()
    if reader is not None and reader.name == "dcp":
        covered = _scan_dcp(w, path)
    elif reader is not None and reader.name == "hf-folder":
        covered = _scan_hf(w, path)
    elif reader is not None:
        w.concerns.append(f"read by the {reader.name!r} reader, whose files ckptfit scan does not know how to find")
    scanned = bool(covered)
    count = 0
    root_real = os.path.realpath(path)
    for root, dirs, files in os.walk(path):
        for d in sorted(dirs):
            dp = os.path.join(root, d)
            if os.path.islink(dp):  # not walked; a reader that opens it by name was followed above
                _note_link(w, dp, path, root_real)
        for fn in sorted(files):
            fp = os.path.join(root, fn)
            rel = os.path.relpath(fp, path)
            if os.path.islink(fp):
                _note_link(w, fp, path, root_real)
            real = os.path.realpath(fp)
            if real in covered or real in w.seen:
                continue
            count += 1
            if count > MAX_DIR_FILES:
                w.errors.append(f"the folder holds more than {MAX_DIR_FILES} files; the rest were not scanned")
                return
            if not os.path.isfile(fp):  # a FIFO, a device, a dangling link: no reader opens it
                continue
            sub = _Walk(fp)
            try:
                _scan_file(sub, fp)
            except NotACheckpoint:
                continue  # config.json, README ...
            except (CheckpointError, OSError) as e:
                w.errors.append(f"{rel}: {e}")
                continue
            w.seen.add(real)
            scanned = True
            w.absorb(sub, f"{rel}:")
    if not scanned and not w.errors:
        raise NotACheckpoint("this directory holds no checkpoint file ckptfit can scan", path=path,
                             hint="pass the checkpoint file itself")


def _note_link(w: _Walk, p: str, top: str, root_real: str) -> None:
    target = os.path.realpath(p)
    if os.path.commonpath([root_real, target]) != root_real:
        w.anomalies.append(f"{os.path.relpath(p, top)} is a symbolic link to {target}, outside the folder")


def _scan_any(w: _Walk, p: str, label: str) -> str | None:
    """Scan ``p`` as the loader would open it (a file, or a folder through its reader); its real path."""
    real = os.path.realpath(p)
    if real in w.seen:
        return real
    w.seen.add(real)
    sub = _Walk(p)
    sub.seen = w.seen
    try:
        if os.path.isdir(p):
            sub_reader = _reader(p)
            if sub_reader is None:
                w.errors.append(f"{label}is a folder that no reader opens")
                return real
            _scan_dir(sub, p)
        elif os.path.isfile(p):
            _scan_file(sub, p)
        else:
            w.errors.append(f"{label}is not a regular file")
            return real
    except (CheckpointError, OSError) as e:
        w.errors.append(f"{label}{e}")
        return real
    w.absorb(sub, label)
    return real


def _scan_hf(w: _Walk, path: str) -> set[str]:
    """The shards an ``*.index.json`` names (or the single weights file), as the folder reader opens them."""
    import json

    from .formats.hf_dir import SINGLE_FILES, index_files

    covered: set[str] = set()
    indexes = index_files(path)
    if indexes:
        try:
            from .formats import read_json

            weight_map = read_json(os.path.join(path, indexes[0]), what=indexes[0], folder=path)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError) as e:
            w.errors.append(f"{indexes[0]} is not a valid shard index ({e})")
            return covered
    else:
        names = os.listdir(path)
        shards = [next(n for n in SINGLE_FILES if n in names)]
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            w.errors.append(f"the index names a shard outside the folder: {shard!r}")
            continue
        sp = os.path.join(path, shard)
        if not os.path.lexists(sp):
            w.errors.append(f"shard {shard} is missing")
            continue
        covered.add(_scan_any(w, sp, f"{shard}:") or "")
    return covered


def _scan_dcp(w: _Walk, path: str) -> set[str]:
    """A DCP folder: its ``.metadata``, then every byte range its storage records point at, in whatever file."""
    from .safety import Placeholder

    covered: set[str] = set()
    mpath = os.path.join(path, ".metadata")
    covered.add(os.path.realpath(mpath))
    try:
        if not os.path.isfile(mpath):
            raise OSError("not a regular file")
        with open(mpath, "rb") as f:
            data = f.read(MAX_SCAN_PICKLE + 1)
    except OSError as e:
        w.errors.append(f".metadata: {e}")
        return covered
    md, _ = w.run(data, ".metadata")
    storage = md.attributes().get("storage_data") if isinstance(md, Placeholder) else None
    if not isinstance(storage, dict):
        if md is not None:
            w.errors.append(".metadata lacks storage_data: the storage records cannot be followed")
        return covered
    regions: dict[tuple[str, int, int], None] = {}
    for info in storage.values():
        fa = info.attributes() if isinstance(info, Placeholder) else {}
        rel, off, length = fa.get("relative_path"), fa.get("offset"), fa.get("length")
        if not isinstance(rel, str) or os.path.basename(rel) != rel or type(off) is not int \
                or type(length) is not int or off < 0 or length < 0:
            w.errors.append(f".metadata has a malformed storage record ({str(rel)[:60]!r}, {off!r}, {length!r})")
            continue
        regions[(rel, off, length)] = None
    for rel, off, length in regions:
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            w.errors.append(f"DCP data file {rel} is missing or not a regular file")
            continue
        covered.add(os.path.realpath(fp))
        if off + length > os.path.getsize(fp):
            w.errors.append(f"DCP data file {rel} is shorter than its records say (truncated)")
            continue
        with open(fp, "rb") as f:
            f.seek(off)
            head = f.read(min(length, 64))
        label = f"{rel}@{off}:"
        if head.startswith(b"PK\x03\x04"):
            _scan_one_zip(w, fp, off, length, label=label)
        elif _looks_like_pickle(head):  # torch.load of the record's bytes would unpickle them
            with open(fp, "rb") as f:
                f.seek(off)
                region = f.read(min(length, MAX_SCAN_PICKLE))
            sub = _Walk(fp)
            sub.run(region, "record", allow_trailing=True)
            w.absorb(sub, label)
    w.format = "dcp"
    return covered
