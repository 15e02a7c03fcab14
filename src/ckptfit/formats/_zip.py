"""A zip reader that checks before it trusts: torch archives, and the ones embedded in DCP files.

It refuses duplicate or overlapping members, absolute or ``..`` names, encrypted members and
names that differ between the local and central headers; it checks that every member lies
inside the file; it caps inflated sizes and compression ratios before inflating anything;
and it verifies the CRC of every member it reads whole (pickles). Tensor data members are
stored uncompressed by torch and are memory-mapped in place; their CRC-32 is checked by
whoever reads their bytes (the loader fuses it with its copy, see :mod:`ckptfit.lazy`), and
``ckptfit scan`` checks every one (:meth:`ZipArchive.verify_all`).
Oddities that are not errors (bytes before the first member or after the end record, unused
gaps) are kept in :attr:`ZipArchive.anomalies`.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

from .._crc import crc32
from ..errors import CorruptCheckpoint, ResourceLimitExceeded, UnsupportedFormat

__all__ = ["ZipArchive", "Member", "Window"]

MAX_INFLATED = 4 << 30  # bytes one compressed member may inflate to
MAX_RATIO = 200  # inflated / compressed
MAX_MEMBERS = 1_000_000  # checked from the end record before zipfile builds one object per member
NAME_GUESS = 256  # bytes read after a local header along with it (its name, if no longer)
_HAS_PREAD = hasattr(os, "pread")
_HH = struct.Struct("<HH").unpack_from

_CD = struct.Struct(zipfile.structCentralDir)  # type: ignore[attr-defined]  # one central directory record


def _plain_directory(src: io.BufferedReader) -> tuple[list[tuple], int, bytes] | None:
    """The central directory exactly as Python's zipfile reads it, for the plain archives torch writes: entries
    ``(name, flag_bits, compress_type, header_offset, compress_size, file_size, CRC)``, where the directory
    starts, the archive's comment. ``None`` for anything zipfile reads with a special case (zip64 extra fields)
    or refuses (a short or damaged directory, a version it does not support): zipfile then reads it and says
    what is wrong, as before.

    It is zipfile's ``_RealGetContents`` without a ``ZipInfo`` per member (the same end record, offsets, name
    decoding and extra-field checks), at a third of its cost: an archive of 20,000 small tensors has 20,000.
    """
    try:
        endrec = zipfile._EndRecData(src)  # type: ignore[attr-defined]
        if not endrec:
            return None
        size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
        concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # type: ignore[attr-defined]
        if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        start_dir = offset_cd + concat
        if start_dir < 0:
            return None
        src.seek(start_dir, 0)
        data = src.read(size_cd)
        if len(data) != size_cd:
            return None
        entries = []
        unpack, fixed = _CD.unpack_from, _CD.size
        magic, max_version = zipfile.stringCentralDir, zipfile.MAX_EXTRACT_VERSION  # type: ignore[attr-defined]
        at = 0
        while at < size_cd:
            if at + fixed > size_cd:
                return None
            cd = unpack(data, at)
            nlen, elen, clen = cd[12], cd[13], cd[14]
            if cd[0] != magic or cd[3] > max_version or at + fixed + nlen + elen + clen > size_cd:
                return None
            at += fixed
            e, e_end = at + nlen, at + nlen + elen
            while e_end - e >= 4:  # extra fields: zipfile reads only zip64's (0x0001); any other is skipped
                tp, ln = _HH(data, e)
                if tp == 1 or e + 4 + ln > e_end:
                    return None
                e += 4 + ln
            name = data[at:at + nlen].decode("utf-8" if cd[5] & 0x800 else "cp437")
            nul = name.find("\0")
            if nul >= 0:
                name = name[:nul]
            if os.sep != "/" and os.sep in name:
                name = name.replace(os.sep, "/")
            entries.append((name, cd[5], cd[6], cd[18] + concat, cd[10], cd[11], cd[9]))
            at = e_end + clen
        return entries, start_dir, endrec[zipfile._ECD_COMMENT]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - anything unusual: zipfile reads it, and says what is wrong
        return None


class Window(io.RawIOBase):
    """A read-only file-like view of ``[base, base + length)`` of an open binary file."""

    def __init__(self, f, base: int, length: int):
        self._f = f
        self._base = base
        self._len = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = self._len + offset
        if self._pos < 0:
            raise OSError("negative seek")
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self._len:
            return b""
        if n is None or n < 0 or self._pos + n > self._len:
            n = self._len - self._pos
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:  # pragma: no cover - zipfile uses read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class Member:
    """One zip member: where its data starts (absolute in the file), sizes, CRC, compression."""

    name: str
    data_offset: int
    compressed_size: int
    size: int
    crc: int
    compress_type: int


class ZipArchive:
    """The members of a zip (or of a zip embedded at ``base`` in a larger file), validated.

    Raises:
        CorruptCheckpoint: truncated or malformed archive, overlapping/duplicate members,
            bad names, members reaching past the end.
        UnsupportedFormat: encrypted members.
    """

    def __init__(self, path: str, *, base: int = 0, length: int | None = None, what: str = "zip archive"):
        self.path = path
        self.base = base
        file_size = os.path.getsize(path)
        self.length = file_size - base if length is None else length
        if base < 0 or base + self.length > file_size:
            raise CorruptCheckpoint(f"{what} at bytes {base}..{base + self.length} lies beyond the end of the file",
                                    path=path)
        self.anomalies: list[str] = []
        self._f = open(path, "rb")
        try:
            self._check_entry_count(what)
            self.members = self._read_members(what)
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def _pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes of the file from ``offset`` (fewer at its end), without a buffered read.

        A seek and a 30-byte read through the buffered file would read (and copy) 8 KiB each time:
        one local header per tensor, 20,000 of them in a model of small layers.
        """
        if _HAS_PREAD:
            return os.pread(self._f.fileno(), n, offset)
        self._f.seek(offset)  # pragma: no cover - platforms without pread
        return self._f.read(n)  # pragma: no cover

    def _check_entry_count(self, what: str) -> None:
        """Refuse absurd member counts before ``zipfile`` allocates an object for each of them."""
        tail_len = min(self.length, 65536 + 22)
        self._f.seek(self.base + self.length - tail_len)
        tail = self._f.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or i + 22 > len(tail):
            return  # zipfile reports the missing end record in its own words
        (count,) = struct.unpack_from("<H", tail, i + 10)
        (comment_len,) = struct.unpack_from("<H", tail, i + 20)
        after = len(tail) - (i + 22 + comment_len)
        if after > 0:
            self.anomalies.append(f"{after} byte(s) of trailing data after the end of the zip archive")
        if count == 0xFFFF:  # zip64: the real count is in the zip64 end record, 56 bytes + locator before
            j = tail.rfind(b"PK\x06\x06", 0, i)
            if j >= 0 and j + 56 <= len(tail):
                (count,) = struct.unpack_from("<Q", tail, j + 32)
        if count > MAX_MEMBERS:
            raise ResourceLimitExceeded(f"the {what} declares {count} members (more than {MAX_MEMBERS}); no "
                                        f"checkpoint has that many", path=self.path,
                                        hint="ckptfit refuses it before reading its directory")

    def _read_members(self, what: str) -> dict[str, Member]:
        src = io.BufferedReader(Window(self._f, self.base, self.length), buffer_size=1 << 16)
        plain = _plain_directory(src)
        if plain is not None:
            entries, start_dir, comment = plain
        else:
            entries, start_dir, comment = self._zipfile_directory(src, what)
        if len(entries) > MAX_MEMBERS:
            raise ResourceLimitExceeded(f"the {what} has {len(entries)} members", path=self.path)
        return self._check_members(what, entries, start_dir, comment)

    def _zipfile_directory(self, src: io.BufferedReader, what: str) -> tuple[list[tuple], int, bytes]:
        """The central directory as Python's zipfile reads it (entries as :func:`_plain_directory` gives them)."""
        try:
            zf = zipfile.ZipFile(src)
            infos = zf.infolist()
        except zipfile.BadZipFile as e:
            raise CorruptCheckpoint(
                f"the {what} is truncated or damaged: its central directory cannot be read ({e}); typically the "
                f"file was cut off by an interrupted download or copy", path=self.path,
                hint="download or copy the file again and compare its size with the original") from e
        except (OSError, EOFError, ValueError, struct.error, NotImplementedError, OverflowError, KeyError,
                IndexError, TypeError) as e:
            raise CorruptCheckpoint(f"the {what} is damaged ({type(e).__name__}: {e})", path=self.path,
                                    hint="download or copy the file again") from e
        entries = [(i.filename, i.flag_bits, i.compress_type, i.header_offset, i.compress_size, i.file_size, i.CRC)
                   for i in infos]
        return entries, getattr(zf, "start_dir", self.length), zf.comment

    def _check_members(self, what: str, entries: list[tuple], start_dir: int, comment: bytes) -> dict[str, Member]:
        members: dict[str, Member] = {}
        spans: list[tuple[int, int, str]] = []
        fd = self._f.fileno() if _HAS_PREAD else None  # (one pread per member, without a method call)
        base, length, stored, deflated = self.base, self.length, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
        for name, flag_bits, method, header_offset, csize, size, crc in entries:
            if name in members:
                raise CorruptCheckpoint(f"the {what} has the member {name!r} twice", path=self.path,
                                        hint="a zip with duplicate names is ambiguous; ckptfit refuses it")
            if (name.startswith(("/", "\\")) or (".." in name and ".." in name.replace("\\", "/").split("/"))
                    or ":" in name[:3]):
                raise CorruptCheckpoint(f"the {what} has a member with an absolute or '..' path: {name!r}",
                                        path=self.path)
            if flag_bits & 0x1:
                raise UnsupportedFormat(f"the {what} member {name!r} is encrypted", path=self.path,
                                        hint="torch never writes encrypted archives; decrypt it with the tool "
                                             "that made it")
            if method != stored and method != deflated:
                raise UnsupportedFormat(f"the {what} member {name!r} uses compression method "
                                        f"{method}", path=self.path)
            # local header: fixed 30 bytes, then name and extra field
            if not 0 <= header_offset <= length - 30:
                raise CorruptCheckpoint(f"the {what} member {name!r} has its header at byte {header_offset}, "
                                        f"outside the archive (truncated or damaged)", path=self.path,
                                        hint="download or copy the file again")
            at = base + header_offset
            # the fixed header and, usually, the name after it
            head = os.pread(fd, 30 + NAME_GUESS, at) if fd is not None else self._pread(30 + NAME_GUESS, at)
            if len(head) < 30 or not head.startswith(b"PK\x03\x04"):
                raise CorruptCheckpoint(f"the {what} member {name!r} has no valid local header (the archive is "
                                        f"truncated or damaged)", path=self.path, hint="download the file again")
            lflags, lmethod = _HH(head, 6)
            if lflags & 0x1:
                raise UnsupportedFormat(f"the {what} member {name!r} is encrypted", path=self.path)
            if lmethod != method:
                raise CorruptCheckpoint(f"the {what} member {name!r} is compressed with method {lmethod} in its "
                                        f"local header but {method} in the directory", path=self.path,
                                        hint="the archive was tampered with or damaged; ckptfit refuses it")
            nlen, elen = _HH(head, 26)
            local_name = head[30:30 + nlen] if 30 + nlen <= len(head) else self._pread(nlen, at + 30)
            try:
                local_name_s = local_name.decode("utf-8" if flag_bits & 0x800 else "cp437")
            except UnicodeDecodeError:
                local_name_s = ""
            if local_name_s != name and local_name.decode("utf-8", "replace") != name:
                raise CorruptCheckpoint(f"the {what} member {name!r} is named {local_name_s!r} in its local header",
                                        path=self.path, hint="the archive was tampered with or damaged")
            data_off = header_offset + 30 + nlen + elen
            end = data_off + csize
            if end > start_dir and end <= length:
                raise CorruptCheckpoint(f"the {what} member {name!r} runs into the archive's central directory "
                                        f"(bytes {data_off}..{end}, directory at {start_dir})", path=self.path,
                                        hint="the archive was tampered with or damaged; ckptfit refuses it")
            if end > length:
                raise CorruptCheckpoint(
                    f"the {what} member {name!r} reaches byte {end} but the archive holds only {length} bytes "
                    f"(truncated)", path=self.path, hint="download or copy the file again")
            if method == stored and csize != size:
                raise CorruptCheckpoint(f"the {what} member {name!r} is stored with {csize} bytes "
                                        f"but declares {size}", path=self.path)
            if method == deflated:
                if size > MAX_INFLATED or size > MAX_RATIO * max(csize, 1) + 4096:
                    raise ResourceLimitExceeded(
                        f"the {what} member {name!r} would inflate from {csize} to {size} "
                        f"bytes (a zip bomb?)", path=self.path, hint="ckptfit refuses it; no data was inflated")
            spans.append((header_offset, end, name))
            members[name] = Member(name, base + data_off, csize, size, crc, method)
        spans.sort()
        for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise CorruptCheckpoint(f"the {what} members {n0!r} and {n1!r} overlap", path=self.path,
                                        hint="overlapping members are a zip trick; ckptfit refuses the file")
        if spans and spans[0][0] > 0:
            self.anomalies.append(f"{spans[0][0]} byte(s) before the first zip member")
        if comment:
            self.anomalies.append(f"the zip end record carries a {len(comment)}-byte comment")
        return members

    def read(self, name: str, *, max_size: int = 1 << 31) -> bytes:
        """A member's bytes, inflated if needed, CRC checked."""
        m = self.members[name]
        if m.size > max_size:
            raise ResourceLimitExceeded(f"member {name!r} is {m.size} bytes, more than the {max_size} allowed",
                                        path=self.path)
        self._f.seek(m.data_offset)
        raw = self._f.read(m.compressed_size)
        if len(raw) != m.compressed_size:
            raise CorruptCheckpoint(f"member {name!r} is truncated", path=self.path)
        if m.compress_type == zipfile.ZIP_DEFLATED:
            d = zlib.decompressobj(-15)
            try:
                data = d.decompress(raw, m.size + 1)
            except zlib.error as e:
                raise CorruptCheckpoint(f"member {name!r} cannot be inflated ({e})", path=self.path,
                                        hint="the file is damaged; download or copy it again") from e
            if len(data) != m.size or d.unconsumed_tail:
                raise CorruptCheckpoint(f"member {name!r} inflates to more than its declared {m.size} bytes",
                                        path=self.path)
        else:
            data = raw
        if crc32(data) != m.crc:
            raise CorruptCheckpoint(f"member {name!r} fails its CRC check: the bytes differ from what was written",
                                    path=self.path, hint="the file is damaged; download or copy it again")
        return data

    def verify_all(self) -> list[str]:
        """Names of the members whose bytes do not match their CRC (reads every member once)."""
        bad = []
        for name, m in self.members.items():
            if m.compress_type == zipfile.ZIP_STORED:
                ok = self.verify_crc(name)
            else:
                try:
                    self.read(name, max_size=MAX_INFLATED)
                    ok = True
                except CorruptCheckpoint:
                    ok = False
            if not ok:
                bad.append(name)
        return bad

    def verify_crc(self, name: str) -> bool:
        """Whether a stored member's bytes match its CRC (reads the member once, in chunks)."""
        m = self.members[name]
        crc = 0
        done = 0
        while done < m.compressed_size:
            chunk = self._pread(min(m.compressed_size - done, 1 << 22), m.data_offset + done)
            if not chunk:
                return False
            crc = crc32(chunk, crc)
            done += len(chunk)
        return crc == m.crc
