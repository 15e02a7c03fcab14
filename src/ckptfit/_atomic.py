"""Atomic file writes: a temporary file beside the destination, fsynced, then renamed into place.

Every file ckptfit writes (``convert``, ``load --save``) goes through :func:`atomic_write`, so an
interrupted write (an exception, Ctrl-C, a full disk) leaves either the old file or nothing,
never a partial one, and the source a file was read from is never modified.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from .errors import CheckpointError

__all__ = ["atomic_write"]


def _creation_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, source: str | os.PathLike[str] | None = None,
                 overwrite: bool = True, **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write ``path`` all at once: yield a temporary file in the same directory, then rename it into place.

    On leaving the block the temporary file is flushed, fsynced and renamed over ``path``
    (``os.replace``, atomic on POSIX and Windows); on any exception, including
    ``KeyboardInterrupt``, it is removed and ``path`` is left exactly as it was.

    Args:
        path: the destination file.
        mode: ``"wb"`` (default) or ``"w"`` for text.
        source: the file the data comes from, if any; writing over it is refused, so a
            conversion can never destroy its input.
        overwrite: whether an existing ``path`` may be replaced.
        **open_kwargs: passed to :func:`open` (``encoding=`` for text).

    Raises:
        CheckpointError: ``path`` is ``source``, is a directory, its directory does not exist,
            or it exists and ``overwrite`` is false.

    Example:
        >>> with atomic_write("model.safetensors") as f:          # doctest: +SKIP
        ...     f.write(safetensors.torch.save(state_dict))
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    dest = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(dest)
    if not os.path.isdir(directory):
        raise CheckpointError("the destination folder does not exist", path=directory,
                              hint="create it first, or choose another output path")
    if os.path.isdir(dest):
        raise CheckpointError("the destination is a directory", path=dest, hint="pass a file name")
    if source is not None and os.path.exists(dest) and os.path.exists(source) and os.path.samefile(dest, source):
        raise CheckpointError("refusing to write over the file being read", path=dest,
                              hint="choose another output path; ckptfit never modifies its input")
    if not overwrite and os.path.lexists(dest):
        raise CheckpointError("the destination already exists", path=dest,
                              hint="remove it first or choose another output path")
    try:
        perms = os.stat(dest).st_mode & 0o7777  # keep an existing file's permissions
    except OSError:
        perms = _creation_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".partial", dir=directory)
    os.close(fd)  # reopened by name, so ``f.name`` is the temporary file's path
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
