"""``ckptfit scan`` of zip archives: torch zip and TorchScript archives (every pickle member), ``.npz``
archives, zip archives back to back (read both ways: torch's reader and Python's disagree), and a
DCP ``.distcp`` file's embedded archives. The scan hook of the ``torch-zip`` and ``npz`` readers.
"""
from __future__ import annotations

import struct
from typing import Any

from ..errors import CheckpointError
from ..scan_walk import CRC_MISMATCH, ScanWalk, recording_stub

__all__ = ["scan_zip", "scan_zip_region", "zip_concat"]


def zip_concat(path: str) -> tuple[int, int]:
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


def scan_zip(w: ScanWalk, path: str) -> None:
    """The scan hook of zip-based readers: every archive in ``path`` as torch.load and Python would read it."""
    if path.endswith(".distcp"):
        spans = _embedded_archives(path)
        if len(spans) > 1:
            for base, length in spans:
                scan_zip_region(w, path, base, length, label=f"@{base}:")
            return
    concat, cd_offset = zip_concat(path)
    if concat > 0:
        # Zip archives back to back: Python's zipfile (and ckptfit's reader) reads the last one, torch's
        # reader follows the end record's offsets from the start of the file, into the first. Both are read.
        w.concerns.append(f"the file holds zip archives back to back (the last starts at byte {concat}): torch.load "
                          f"reads the central directory at byte {cd_offset} from the start of the file, Python's "
                          f"zipfile the last archive; ckptfit scanned both")
        scan_zip_region(w, path, 0, concat, label="@0:")
        scan_zip_region(w, path, 0, None, label=f"@{concat}:")
        return
    scan_zip_region(w, path, 0, None)


def scan_zip_region(w: ScanWalk, path: str, base: int, length: int | None, label: str = "") -> None:
    """The zip archive at ``[base, base + length)`` of ``path`` (to its end when ``length`` is None)."""
    from ._zip import ZipArchive

    sub = ScanWalk(path)
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
            from .torch_zip import prefix_of  # the data.pkl the loader reads

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
            from .numpy_file import scan_npy_bytes

            sub.format = "npz"
            for n in names:
                try:
                    data = archive.read(n)
                except CheckpointError as e:
                    sub.errors.append(f"{n}: {e.detail}")
                    continue
                scan_npy_bytes(sub, data, n)
        else:
            sub.format = "zip"
            sub.anomalies.append("a zip archive without data.pkl: not written by torch.save or torch.jit.save")
            for n in names:
                if n.endswith("pkl"):
                    _read_and_run(sub, archive, n)
        bad = archive.verify_all()
        sub.crc_checked += len(archive.members)
        sub.anomalies.extend(f"{n}: {CRC_MISMATCH} (the bytes differ from what was written)" for n in bad)
    finally:
        archive.close()
    w.format = w.format or sub.format
    w.absorb(sub, label)


def _check_script_code(w: ScanWalk, archive: Any, prefix: str) -> None:
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


def _read_and_run(w: ScanWalk, archive: Any, name: str, persistent_load: Any = None) -> None:
    try:
        data = archive.read(name)
    except CheckpointError as e:
        w.errors.append(f"{name}: {e.detail}")
        return
    w.run(data, name, persistent_load=persistent_load)


def _scan_torch_members(w: ScanWalk, archive: Any, prefix: str) -> None:
    records: dict[str, tuple[Any, int]] = {}
    for name in archive.members:
        if name.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl, and any stray pickle
            _read_and_run(w, archive, name, recording_stub(records) if name == prefix + "data.pkl" else None)
    for key, (_dtype, nbytes) in records.items():
        m = archive.members.get(f"{prefix}data/{key}")
        if m is None:
            w.anomalies.append(f"data.pkl refers to storage {key!r} but the archive has no record for it")
        elif m.size < nbytes:
            w.anomalies.append(f"storage {key!r} declares {nbytes} bytes but its record holds {m.size}")
