"""Files that two readers read differently: refused by the loaders, never read one way in silence.

- **Zip archives back to back** (or any bytes before the archive the last end record describes):
  Python's ``zipfile``, and so ckptfit's zip reader, reads the last archive; torch's reader takes the
  end record's offsets from the start of the file, which lands in the first archive (or nowhere).
- **A tar archive that is also a pickle** (or a legacy torch file): ``torch.load`` tries every
  non-zip file as a tar first (torch's oldest format) and reads its ``storages``, ``tensors`` and
  ``pickle`` members; a pickle reader reads the pickle at the start of the file.

No writer makes such a file by accident, and which content the user means cannot be told: the
readers of the ``torch-zip``, ``npz``, ``pickle`` and ``torch-legacy`` formats refuse them, naming
both parts and how to split them. ``ckptfit scan`` reads both ways (:mod:`.zip_scan`,
:func:`ckptfit.scanning.scan`).
"""
from __future__ import annotations

import os
import struct

from ..errors import CorruptCheckpoint

__all__ = ["refuse_two_archives", "refuse_tar", "is_tar"]


def refuse_two_archives(path: str) -> None:
    """Refuse a zip file whose last archive does not start at byte 0 (zip archives back to back).

    Raises:
        CorruptCheckpoint: naming both parts, what torch.load and Python's zipfile would each read,
            and how to split the file.
    """
    from .zip_scan import zip_concat

    concat, cd_offset = zip_concat(path)
    if concat <= 0:
        return
    size = os.path.getsize(path)
    name = os.path.basename(path)
    first = ("a zip archive" if _ends_with_end_record(path, concat) else "data that is not one complete zip archive")
    where = "inside the first part" if cd_offset < concat else "beyond the first part"
    if path.endswith(".distcp"):
        hint = ("a torch.distributed checkpoint's .distcp file holds one archive per tensor record: pass the "
                "checkpoint's folder (the one with .metadata), not the .distcp file")
    else:
        hint = (f"split the file and pass the part you mean: `head -c {concat} {name} > first.pt` and "
                f"`tail -c +{concat + 1} {name} > second.pt`, then check each with `ckptfit scan`")
    raise CorruptCheckpoint(
        f"the file holds two zip archives back to back: bytes 0..{concat} ({first}) and bytes {concat}..{size} (a zip "
        f"archive, whose end record closes the file). torch.load takes that end record's offsets from the start of "
        f"the file (it looks for the central directory at byte {cd_offset}: {where}), Python's zipfile reads the "
        f"second part; which one is the checkpoint cannot be told, so ckptfit reads neither", path=path, hint=hint)


def _ends_with_end_record(path: str, end: int) -> bool:
    """Whether ``[0, end)`` of ``path`` ends with a zip end record (a complete archive, comment included)."""
    tail_len = min(end, 65536 + 22)
    with open(path, "rb") as f:
        f.seek(end - tail_len)
        tail = f.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    while i >= 0:
        if i + 22 <= len(tail) and i + 22 + struct.unpack_from("<H", tail, i + 20)[0] == len(tail):
            return True
        i = tail.rfind(b"PK\x05\x06", 0, i)
    return False


def is_tar(path: str) -> bool:
    """Whether ``tarfile`` opens ``path`` as a tar archive (one header block read), as torch.load tries first."""
    import tarfile

    if os.path.getsize(path) < 512:
        return False
    try:
        with tarfile.open(path, mode="r:") as tar:
            return tar.firstmember is not None
    except Exception:  # noqa: BLE001 - any failure of the tar reader: not a tar, as for torch.load
        return False


def refuse_tar(path: str, what: str) -> None:
    """Refuse a file read as ``what`` (a pickle, a legacy torch file) that is also a tar archive.

    Raises:
        CorruptCheckpoint: saying what each reader would read, and what to do.
    """
    if not is_tar(path):
        return
    raise CorruptCheckpoint(
        f"the file is both {what} and a tar archive: torch.load reads every file that is not a zip as a tar first "
        f"(torch's oldest format: its 'storages', 'tensors' and 'pickle' members, with the real unpickler), while "
        f"{what} reader reads the pickle at the start of the file; which one is the checkpoint cannot be told, so "
        f"ckptfit reads neither", path=path,
        hint=f"list the tar's members with `tar tvf {os.path.basename(path)}`; run `ckptfit scan` on the file before "
             f"anything else opens it (both readings are scanned); if you made it, save the weights again with "
             f"torch.save or safetensors")
