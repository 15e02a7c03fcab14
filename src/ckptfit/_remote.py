"""Checkpoints at a URL or in an object store, read through ``fsspec`` one byte range at a time.

A remote file becomes a local *sparse* cache file of its full size plus a record of which byte
ranges have arrived. Opening fetches only what a reader looks at to describe the file (a
safetensors header; a zip's end records, central directory, local headers and pickles); the
tensor bytes are fetched when a tensor is read (:func:`ckptfit.lazy.register_filler`), so a
load with ``include=`` fetches only the tensors it loads. Formats whose metadata is spread
through the file (legacy torch files, plain pickles, DCP) are fetched whole.

The cache lives in ``$CKPTFIT_CACHE`` (default ``$XDG_CACHE_HOME/ckptfit``, else
``~/.cache/ckptfit``; :mod:`ckptfit.cache_dirs`), under ``remote/<key>/``: the key is the expected sha256 when one is given
(the entry is then shared by every URL of that content), else a hash of the URL, the server's
ETag (or Last-Modified) and the size, so a changed file is a new entry. A file fetched whole
and checked is reused without asking the server for its bytes again.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import threading
from typing import Any

from .cache_dirs import REMOTE, cache_dir, cache_root
from .errors import CheckpointError, CorruptCheckpoint

# cache_root (ckptfit.cache_dirs) stays importable from here.
__all__ = ["RemoteFile", "cache_root", "fetch_plan_for_open", "SCHEMES"]

SCHEMES = ("http://", "https://", "s3://", "s3a://", "gs://", "gcs://")
_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "remote", "https": "remote"}
PIECE = 8 << 20  # bytes per request when a long range is fetched (the progress bar moves per batch)
BATCH = 8  # pieces fetched concurrently
_MERGE_GAP = 4096  # two wanted ranges closer than this are fetched as one


def _filesystem(url: str) -> Any:
    scheme = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError as e:
        raise CheckpointError(f"reading {scheme}:// needs fsspec", path=url,
                              hint='pip install "ckptfit[remote]"') from e
    try:
        return fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        extra = _EXTRA.get(scheme, "remote")
        raise CheckpointError(f"reading {scheme}:// needs an fsspec backend that is not installed ({e})", path=url,
                              hint=f'pip install "ckptfit[{extra}]"') from e


def _connection_error(e: BaseException) -> BaseException | None:
    """A connection failure (refused, reset, DNS) among the causes of ``e``, if any."""
    seen = 0
    while e is not None and seen < 16:
        seen += 1
        if isinstance(e, ConnectionError) or "Connect" in type(e).__name__:
            return e
        e = e.__cause__ or e.__context__
    return None


def _truncated(url: str, at: int, size: int, cause: str = "") -> CorruptCheckpoint:
    return CorruptCheckpoint(f"the download stopped at byte {at} of {size}{f' ({cause})' if cause else ''}: the file "
                             f"is truncated", path=url, hint="download or copy the file again (nothing was changed)")


class RemoteFile:
    """One remote file behind a sparse local cache file; :meth:`ensure` fetches byte ranges on demand.

    Attributes:
        url: the file's URL.
        size: its size in bytes, as the server reports it.
        local: the cache file (full size; ranges not yet fetched read as zeros until :meth:`ensure`).
        fetched: bytes fetched from the server by this object (for reports and tests).
    """

    def __init__(self, url: str, *, sha256: str | None = None):
        self.url = url
        self.fs = _filesystem(url)
        try:
            info = self.fs.info(url)
        except FileNotFoundError as e:
            cause = _connection_error(e)
            if cause is not None:  # fsspec's HTTP backend reports a refused connection as "not found"
                raise CheckpointError(f"cannot reach the file ({type(cause).__name__}: {str(cause)[:200]})", path=url,
                                      hint="check the URL, the network and the credentials") from e
            raise CheckpointError("no such file at this URL (the server answered 404 / not found)", path=url,
                                  hint="check the URL") from e
        except Exception as e:  # noqa: BLE001 - a backend's own error: connection refused, auth, DNS
            raise CheckpointError(f"cannot reach the file ({type(e).__name__}: {str(e)[:200]})", path=url,
                                  hint="check the URL, the network and the credentials") from e
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise CheckpointError("the server does not say how large the file is, so it cannot be read in ranges",
                                  path=url, hint="download the file and pass the local path")
        self.size = size
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("Last-Modified") or ""
        key = f"sha256-{sha256.lower()}" if sha256 else hashlib.sha256(
            f"{url}\n{version}\n{size}".encode()).hexdigest()[:40]
        self.dir = os.path.join(cache_dir(REMOTE), key)
        os.makedirs(self.dir, exist_ok=True)
        name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or "file"
        self.local = os.path.join(self.dir, name if name not in ("ranges.json", "lock") else "data")
        self._state = os.path.join(self.dir, "ranges.json")
        self._lock = threading.Lock()
        self.fetched = 0
        self._ranges: list[tuple[int, int]] = []  # fetched [start, end), sorted, disjoint
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(self._state) as f:
                saved = json.load(f)
            if saved.get("size") == size and os.path.getsize(self.local) == size:
                self._ranges = [(int(a), int(b)) for a, b in saved["ranges"]]
        if not self._ranges or not os.path.exists(self.local):
            self._ranges = []
            with open(self.local, "wb") as f:
                f.truncate(size)  # sparse: blocks are allocated as ranges arrive

    # ------------------------------------------------------------------ ranges
    @property
    def complete(self) -> bool:
        return self._ranges == [(0, self.size)] or self.size == 0

    def _missing(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        cur = start
        i = bisect.bisect_right(self._ranges, (start, float("inf"))) - 1
        i = max(i, 0)
        for a, b in self._ranges[i:]:
            if a >= end:
                break
            if b <= cur:
                continue
            if a > cur:
                out.append((cur, a))
            cur = max(cur, b)
        if cur < end:
            out.append((cur, end))
        return out

    def _add(self, start: int, end: int) -> None:
        rs = self._ranges + [(start, end)]
        rs.sort()
        merged: list[tuple[int, int]] = []
        for a, b in rs:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._ranges = merged

    def ensure(self, offset: int, nbytes: int) -> None:
        """Make bytes ``[offset, offset + nbytes)`` of the cache file real (fetching what is missing).

        Raises:
            CorruptCheckpoint: the server sent fewer bytes than asked (the download was cut short).
        """
        self.ensure_many([(offset, offset + nbytes)])

    def ensure_many(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch every missing part of ``ranges`` (close ranges merged, long ones in pieces, concurrently)."""
        with self._lock:
            want: list[tuple[int, int]] = []
            for a, b in sorted(ranges):
                a, b = max(a, 0), min(b, self.size)
                if b > a:
                    want.extend(self._missing(a, b))
            if not want:
                return
            merged: list[tuple[int, int]] = []
            for a, b in sorted(want):
                if merged and a - merged[-1][1] <= _MERGE_GAP:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                else:
                    merged.append((a, b))
            pieces = [(s, min(s + PIECE, b)) for a, b in merged for s in range(a, b, PIECE)]
            self._fetch(pieces)

    def _fetch(self, pieces: list[tuple[int, int]]) -> None:
        from ._progress import progress

        total = sum(b - a for a, b in pieces)
        name = os.path.basename(self.local)
        with progress(total, f"fetching {name}") as bar, open(self.local, "r+b") as f:
            for i in range(0, len(pieces), BATCH):
                batch = pieces[i:i + BATCH]
                try:
                    datas = self.fs.cat_ranges([self.url] * len(batch), [a for a, _ in batch], [b for _, b in batch],
                                               on_error="raise")
                except Exception as e:  # noqa: BLE001 - aiohttp/botocore errors: a payload cut short, a reset
                    raise _truncated(self.url, batch[0][0], self.size, f"{type(e).__name__}: {str(e)[:160]}") from e
                for (a, b), data in zip(batch, datas):
                    if isinstance(data, BaseException):
                        raise _truncated(self.url, a, self.size, f"{type(data).__name__}: {str(data)[:160]}")
                    if len(data) == self.size and b - a != self.size:  # the server ignored Range: keep it all
                        a, b = 0, self.size
                    if len(data) != b - a:
                        raise _truncated(self.url, a + len(data), self.size,
                                         f"asked for bytes {a}..{b}, the server sent {len(data)}")
                    f.seek(a)
                    f.write(data)
                    self.fetched += len(data)
                    self._add(a, b)
                    bar.advance(len(data))
            f.flush()
        self._save()

    def _save(self) -> None:
        tmp = self._state + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"url": self.url, "size": self.size, "ranges": self._ranges}, f)
        os.replace(tmp, self._state)

    def fetch_all(self) -> None:
        """Fetch every byte not yet in the cache."""
        self.ensure(0, self.size)

    def head(self, n: int) -> bytes:
        self.ensure(0, min(n, self.size))
        with open(self.local, "rb") as f:
            return f.read(min(n, self.size))

    def read(self, offset: int, n: int) -> bytes:
        self.ensure(offset, n)
        with open(self.local, "rb") as f:
            f.seek(offset)
            return f.read(n)


def fetch_plan_for_open(remote: RemoteFile) -> bool:
    """Fetch what the format's reader reads when it opens the file; False when the whole file is needed.

    safetensors: the 8-byte size and the JSON header. A zip (torch archive, npz): the end
    records and central directory, every local header, and every member outside ``data/``
    (pickles, ``version``, ``byteorder``). Tensor records arrive when tensors are read.
    """
    import struct

    head = remote.head(64)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= remote.size:
            remote.ensure(0, 8 + n)
            return True
        return False  # a header past the end: the reader says the file is truncated
    if head.startswith(b"PK\x03\x04"):
        return _fetch_zip_metadata(remote)
    return False


def _fetch_zip_metadata(remote: RemoteFile) -> bool:
    import io
    import zipfile

    tail = min(remote.size, 4096)  # the end record (22 bytes, more with a comment or zip64) and usually the directory
    remote.ensure(remote.size - tail, tail)

    class _Ranged(io.RawIOBase):  # zipfile reads the directory through this, fetching what it reads
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else remote.size + offset
            return self.pos

        def tell(self) -> int:
            return self.pos

        def readinto(self, b: Any) -> int:
            n = max(0, min(len(b), remote.size - self.pos))
            data = remote.read(self.pos, n)
            b[:len(data)] = data
            self.pos += len(data)
            return len(data)

    try:
        infos = zipfile.ZipFile(io.BufferedReader(_Ranged(), buffer_size=4096)).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, IndexError, NotImplementedError) as e:
        if isinstance(e, CheckpointError):
            raise
        return False  # the reader reports it in its own words, on the whole file
    from .formats._zip import NAME_GUESS

    ranges = []
    for info in infos:
        # the local header with its name and extra field (and, for an .npz member, its .npy header)
        ranges.append((info.header_offset, info.header_offset + 30 + 2 * NAME_GUESS))
        parts = info.filename.split("/")
        tensor_record = "data" in parts[:-1] or info.filename.endswith(".npy")
        if info.compress_type != zipfile.ZIP_STORED or not tensor_record or info.filename.endswith(".pkl"):
            ranges.append((info.header_offset, info.header_offset + 30 + 2 * NAME_GUESS + info.compress_size))
    remote.ensure_many(ranges)
    return True
