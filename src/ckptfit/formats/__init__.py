"""Format readers behind one registry; a format is recognised by content, never by extension.

Each reader module registers itself with :func:`register`: a ``sniff(path, head)`` that looks
at the first bytes (or the directory listing) and an ``open(path, trust)`` that returns a
:class:`~ckptfit.checkpoint.Checkpoint`. :func:`open_checkpoint` tries readers by priority
and, when none claims the input, says what the input looks like instead.
"""
from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .._gc import gc_paused
from ..checkpoint import Checkpoint
from ..errors import CheckpointError, CorruptCheckpoint, NotACheckpoint

__all__ = ["Reader", "register", "readers", "open_checkpoint", "open_local", "detect", "check_regular", "read_json",
           "not_a_checkpoint"]

HEAD_BYTES = 64


@dataclass(frozen=True)
class Reader:
    """One on-disk format: how to recognise it, how to open it, and how ``ckptfit scan`` reads it.

    ``scan(walk, path)``, when given, interprets every pickle the reader would read (and checks
    what else it would trust) into a :class:`~ckptfit.scan_walk.ScanWalk`; for a folder it returns
    the real paths of the files it covered. A reader without one is reported by ``ckptfit scan``
    as one whose pickles it cannot find.
    """

    name: str
    sniff: Callable[[str, bytes], bool]
    open: Callable[[str, bool], Checkpoint]
    priority: int = 0
    directory: bool = False
    scan: Callable[..., object] | None = None


_READERS: dict[str, Reader] = {}


def register(name: str, *, sniff: Callable[[str, bytes], bool], priority: int = 0, directory: bool = False,
             scan: Callable[..., object] | None = None,
             ) -> Callable[[Callable[[str, bool], Checkpoint]], Callable[[str, bool], Checkpoint]]:
    """Decorator registering ``open(path, trust) -> Checkpoint`` as the reader of ``name``, with its
    ``scan(walk, path)`` hook for ``ckptfit scan`` (see :class:`Reader`)."""

    def deco(fn: Callable[[str, bool], Checkpoint]) -> Callable[[str, bool], Checkpoint]:
        if name in _READERS:
            warnings.warn(f"ckptfit format reader {name!r} registered twice; the later one wins", stacklevel=2)
        _READERS[name] = Reader(name, sniff, fn, priority, directory, scan)
        return fn

    return deco


def readers() -> list[Reader]:
    """Registered readers, highest priority first."""
    _load_builtin()
    return sorted(_READERS.values(), key=lambda r: -r.priority)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular(path: str, *, what: str = "", directory_ok: bool = False) -> bool:
    """Refuse anything but a regular file (or a directory, when allowed) before it is opened.

    Opening a FIFO blocks until a writer appears, a device can be endless: both are refused from
    ``os.stat`` alone, never opened. A symbolic link is followed (Hugging Face caches are links
    to blobs) and its target is checked the same way; a dangling or looping link is an error.

    Returns:
        Whether ``path`` is a directory.
    """
    label = f"{what} " if what else "this "
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise CheckpointError(f"{label}{'is a dangling symbolic link' if dangling else 'does not exist'}",
                              path=path, hint="check the path") from None
    except OSError as e:  # a symlink loop, a name too long, no permission
        raise CheckpointError(f"{label}cannot be read ({e.strerror or e})", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        if directory_ok:
            return True
        raise CorruptCheckpoint(f"{label}is a directory, not a file", path=path)
    if stat.S_ISREG(st.st_mode):
        return False
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise NotACheckpoint(f"{label}is {kind}, not a regular file; ckptfit does not open it", path=path,
                         hint="pass the checkpoint file itself (reading a pipe or device could block or never end)")


MAX_JSON_BYTES = 64 << 20  # an index or config.json; real ones are a few MB at most
MAX_JSON_DEPTH = 64


def read_json(path: str, *, what: str, folder: str) -> object:
    """A small JSON file of a checkpoint folder, parsed within bounds (size, nesting depth).

    Raises:
        CorruptCheckpoint: not a regular file, too large, not JSON, or nested beyond :data:`MAX_JSON_DEPTH`.
    """
    check_regular(path, what=what)
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise CorruptCheckpoint(f"{what} is larger than {MAX_JSON_BYTES >> 20} MiB; no real one is", path=folder)
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise CorruptCheckpoint(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:120]})", path=folder,
                                hint=f"download {what} again") from e
    check_json_depth(value, what=what, path=folder)
    return value


def check_json_depth(value: object, *, what: str, path: str | None, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse parsed JSON nested deeper than ``limit`` (walked iteratively: renderings recurse)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise CorruptCheckpoint(f"{what} nests more than {limit} levels deep; no real one does", path=path)
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, dict | list)] \
            if level else []


def detect(path: str | os.PathLike[str]) -> Reader:
    """The reader for ``path``, or a :class:`NotACheckpoint` that says what the input is instead."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError("no such file or directory", path=path, hint="check the path")
    is_dir = check_regular(path, directory_ok=True)
    head = b"" if is_dir else _head(path)
    for r in readers():
        if r.directory != is_dir:
            continue
        try:
            if r.sniff(path, head):
                return r
        except OSError:
            continue
    if is_dir:
        names = sorted(os.listdir(path))[:8]
        raise NotACheckpoint(
            f"this directory is not a checkpoint ckptfit knows: no *.index.json, model.safetensors, "
            f"pytorch_model.bin or torch.distributed .metadata (it holds: {', '.join(names) or 'nothing'})",
            path=path, hint="pass the checkpoint file itself, or the folder save_pretrained/dcp.save wrote")
    raise not_a_checkpoint(path, head)


def not_a_checkpoint(path: str, head: bytes) -> CheckpointError:
    size = os.path.getsize(path)
    low = head.lstrip().lower()
    if size == 0:
        return NotACheckpoint("the file is empty (0 bytes)", path=path,
                              hint="the download or copy failed; fetch the file again")
    from .legacy import LEGACY_MAGIC

    # the first bytes every file of a format starts with: a shorter file that begins like one is cut off
    magics = ((b"PK\x03\x04", "a torch zip archive"),
              (b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little"), "a legacy torch file"))
    for magic, what in magics:
        if len(head) < len(magic) and magic.startswith(head):
            return CorruptCheckpoint(f"the file holds only {size} byte(s), the start of {what}: truncated",
                                     path=path, hint="download or copy the file again")
    if size == 8 and 2 <= int.from_bytes(head, "little") <= 100_000_000:
        return CorruptCheckpoint("the file holds only a safetensors header size (8 bytes) and nothing after it: "
                                 "truncated", path=path, hint="download or copy the file again")
    if head.startswith(b"version https://git-lfs"):
        return NotACheckpoint("this is a Git LFS pointer, not the checkpoint: the LFS object was never fetched",
                              path=path, hint="run `git lfs pull` (or `git lfs fetch && git lfs checkout`) in the "
                                              "repository, or download the file itself")
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return NotACheckpoint("this is an HTML/XML page, not a checkpoint (a download link that returned a web "
                              "page: a login, a quota or a 404 page)", path=path,
                              hint="download the file itself (for Google Drive or a hub, use its direct link)")
    if head.startswith(b"\x1f\x8b"):
        return NotACheckpoint("this is a gzip-compressed file", path=path,
                              hint="decompress it first (`gunzip` or `tar xzf`), then pass the checkpoint inside")
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return NotACheckpoint("this is a 7-Zip archive", path=path, hint="extract it first (`7z x`), then pass "
                                                                         "the checkpoint inside")
    if head.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")):
        return NotACheckpoint("this is a compressed archive (bzip2/xz/zstd)", path=path,
                              hint="decompress it first, then pass the checkpoint inside")
    if head.startswith(b"Rar!"):
        return NotACheckpoint("this is a RAR archive", path=path, hint="extract it first")
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head.startswith(b"GIF8"):
        return NotACheckpoint("this is an image (PNG/JPEG/GIF), not a checkpoint", path=path,
                              hint="check that you passed the weights file")
    if head.startswith(b"\x89HDF"):
        return NotACheckpoint("this is an HDF5 file (Keras/TensorFlow .h5 weights), not a PyTorch checkpoint",
                              path=path, hint="convert it to PyTorch first")
    if head.startswith(b"\x08") and b"onnx" in head.lower() or head[:4] == b"\x08\x07\x12\x07":
        return NotACheckpoint("this looks like an ONNX model", path=path, hint="ONNX files are not PyTorch checkpoints")
    if head.startswith(b"GGUF"):
        return NotACheckpoint("this is a GGUF file (llama.cpp), not a PyTorch checkpoint", path=path)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return NotACheckpoint("this is a zip archive, but not one written by torch.save or torch.jit.save "
                              "(no data.pkl inside)", path=path,
                              hint="unzip it and pass the checkpoint inside, or check it is the right file")
    from .polyglot import is_tar

    if is_tar(path):  # torch.load would read it as torch's oldest (tar) format, with the real unpickler
        return NotACheckpoint("this is a tar archive: torch's oldest checkpoint format (early torch releases) or a "
                              "tarball holding files; ckptfit reads neither", path=path,
                              hint=f"list its members with `tar tvf {os.path.basename(path)}`; extract a checkpoint "
                                   f"inside with `tar xf` and pass that file; a file in torch's tar format must be "
                                   f"loaded with torch.load(weights_only=False), only if you trust it, and saved "
                                   f"again with torch.save")
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return NotACheckpoint("this looks like pickle data but it is not readable as a checkpoint", path=path)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and printable == len(head):
        return NotACheckpoint(f"this is a text file, not a checkpoint (it starts with {head[:40]!r})", path=path,
                              hint="check that you passed the weights file")
    return NotACheckpoint(f"unrecognised content (first bytes {head[:16].hex(' ')}): not a torch, safetensors, "
                          f"TorchScript or Hugging Face checkpoint", path=path,
                          hint="the file may be truncated, corrupt, or another kind of file altogether")


def open_checkpoint(path: str | os.PathLike[str], *, trust: bool = False, sha256: str | None = None) -> Checkpoint:
    """Recognise ``path``'s format by content and open it lazily.

    ``path`` may also be ``hf://...``, a URL or an object-store path, and a Git LFS pointer is
    followed to its object (:mod:`ckptfit.sources`); ``sha256`` checks the file first.
    """
    from ..sources import is_remote, open_source, read_lfs_pointer

    path = os.fspath(path)
    if sha256 is not None or is_remote(path) or read_lfs_pointer(path) is not None:
        return open_source(path, trust=trust, sha256=sha256)
    return open_local(path, trust=trust)


def open_local(path: str, *, trust: bool = False) -> Checkpoint:
    """Open a local file or folder with the reader its content calls for."""
    reader = detect(path)
    with gc_paused():
        return reader.open(path, trust)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import dcp, hf_dir, legacy, numpy_file, pickle_file, safetensors_file, torch_zip  # noqa: F401
