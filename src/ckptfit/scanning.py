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

import os
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, NotACheckpoint
from .scan_walk import CRC_MISMATCH, MAX_SCAN_PICKLE, Reference, ScanWalk, looks_like_pickle

__all__ = ["scan", "ScanReport", "Reference", "render_text", "render_rich", "EXIT_CODES", "scan_path"]

# The CLI's exit status for each verdict (as in ckptfit._cli_common.EXIT_CODES, the CLI's one table)
EXIT_CODES: dict[str, int] = {"clean": 0, "error": 1, "not known to be safe": 3, "damaged": 4, "dangerous": 5}
MAX_DIR_FILES = 100_000  # files a folder scan looks at


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
        return [a for a in self.anomalies if CRC_MISMATCH in a]

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
    from .rendering import printable

    return printable("\n".join(lines))


# A person reads the table: the riskiest globals first, and no more rows than fit on a few screens.
_ROW_ORDER = {"dangerous": 0, "unknown": 1, "inert": 2, "data": 3, "tensor": 4}
_MAX_ROWS = 60


def render_rich(report: ScanReport) -> Any:
    """The report as a rich renderable (a table of globals, then anomalies and errors)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text as _Text

    from .rendering import printable

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
    w = ScanWalk(path)
    w.seen.add(os.path.realpath(path))
    if os.path.isdir(path):
        _scan_dir(w, path)
    else:
        _scan_file(w, path)
    return ScanReport(w.path, w.format, tuple(s.member for s in w.scans), w.references(), w.all_anomalies(),
                      tuple(w.errors), w.crc_checked, w.all_concerns())


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


def _scan_file(w: ScanWalk, path: str) -> None:
    """One file, read by the reader the registry picks (its scan hook), and by torch.load's own rules
    where they differ: a file no reader claims that torch.load would still unpickle, and a tar archive."""
    from .formats import not_a_checkpoint

    head = _head(path)
    reader = _reader(path)
    if reader is not None and reader.scan is not None:
        reader.scan(w, path)
    elif reader is not None:  # a reader registered by someone else, without a scan hook
        w.format = reader.name
        w.concerns.append(f"read by the {reader.name!r} reader, whose pickles ckptfit scan does not know how to find")
    elif looks_like_pickle(head):  # torch.load unpickles any non-zip, non-tar file: protocol 0/1 included
        from .formats.pickle_file import scan_pickle

        scan_pickle(w, path)
    elif head.startswith(b"\x93NUMPY"):
        from .formats.numpy_file import scan_npy

        scan_npy(w, path)
    elif head.startswith(b"PK\x05\x06"):  # an empty zip archive
        from .formats.zip_scan import scan_zip

        scan_zip(w, path)
    else:
        if not _scan_tar(w, path):
            raise not_a_checkpoint(path, head)
        return
    if not head.startswith(b"PK\x03\x04"):  # torch.load reads a file that starts like a zip as a zip, never as a tar
        _scan_tar(w, path)


MAX_TAR_MEMBERS = 10_000


def _scan_tar(w: ScanWalk, path: str) -> bool:
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


def _scan_dir(w: ScanWalk, path: str) -> None:
    """A checkpoint folder: the files (and byte ranges) its reader would open, then every other file in it."""
    reader = _reader(path)
    w.format = reader.name if reader is not None else "directory"
    covered: set[str] = set()
    if reader is not None and reader.scan is not None:
        covered = set(reader.scan(w, path) or ())  # the files (and byte ranges) the reader opens
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
            sub = ScanWalk(fp)
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


def _note_link(w: ScanWalk, p: str, top: str, root_real: str) -> None:
    target = os.path.realpath(p)
    if os.path.commonpath([root_real, target]) != root_real:
        w.anomalies.append(f"{os.path.relpath(p, top)} is a symbolic link to {target}, outside the folder")


def scan_path(w: ScanWalk, p: str, label: str) -> str | None:
    """Scan ``p`` as the loader would open it (a file, or a folder through its reader) into ``w``, its
    findings prefixed by ``label``; its real path. (Readers' scan hooks call it as ``w.scan_path``.)"""
    real = os.path.realpath(p)
    if real in w.seen:
        return real
    w.seen.add(real)
    sub = ScanWalk(p)
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


