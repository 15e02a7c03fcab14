"""CRC-32 (the zip polynomial) at memory speed: ISA-L's SIMD implementation, else zlib's.

``torch.save`` writes a CRC-32 for every record of its zip archives; checking every byte that
is read costs one pass over it. zlib's table-driven ``crc32`` runs at about 1 GB/s; ISA-L
(the ``isal`` package, a maintained binding of Intel's ISA-L library, installed with ckptfit)
folds with carry-less multiplication at several GB/s. Both give the same values, so the
fallback changes only the speed.
"""
from __future__ import annotations

import zlib

__all__ = ["crc32", "CRC_IMPL", "checksum_note"]

try:  # the same function and result as zlib.crc32, vectorised
    from isal.isal_zlib import crc32 as _fast_crc32

    if _fast_crc32(b"123456789") != 0xCBF43926:  # pragma: no cover - a broken build: do not trust it
        raise ImportError("isal crc32 gives wrong values")
    CRC_IMPL = "isal"
except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel still works
    _fast_crc32 = zlib.crc32
    CRC_IMPL = "zlib"


def crc32(data, value: int = 0) -> int:
    """CRC-32 of ``data`` (any contiguous buffer: bytes, memoryview, mmap slice), continuing ``value``.

    Example:
        >>> crc32(b"123456789") == 0xCBF43926
        True
        >>> crc32(b"6789", crc32(b"12345")) == crc32(b"123456789")
        True
    """
    return _fast_crc32(data, value)


# What each format stores to check its tensor bytes against (``ckptfit inspect``'s ``bytes:`` line)
_CHECKSUMS = {
    "torch-zip": "CRC-32 per record, checked as they are loaded (`ckptfit scan` checks every one)",
    "torchscript": "CRC-32 per record, checked as they are loaded (`ckptfit scan` checks every one)",
    "dcp": "CRC-32 per record, checked as they are loaded",
    "safetensors": "no checksum (safetensors has none: damaged bytes cannot be detected)",
    "torch-legacy": "no checksum (legacy torch files have none: damaged bytes cannot be detected)",
}


def checksum_note(fmt: str | None) -> str | None:
    """How a format's tensor bytes can be checked, for a person (``None`` when it varies or is unknown)."""
    return _CHECKSUMS.get(fmt or "")
