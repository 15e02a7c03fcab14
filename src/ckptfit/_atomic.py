"""Atomic writes: a temporary file (or folder) beside the destination, fsynced, then renamed into place.

Every file ckptfit writes (``convert``, ``load --save``, the ``identify`` cache) goes through
:func:`atomic_write` (a file object) or :func:`atomic_path` (a path, for writers that open the
file themselves), and every folder through :func:`atomic_dir`, so an interrupted write (an
exception, Ctrl-C, a full disk) leaves either the old file or nothing, never a partial one,
and the source a file was read from is never modified.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from .errors import CheckpointError

__all__ = ["atomic_write", "atomic_path", "atomic_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _creation_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    return 0o666 & ~_umask()


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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_destination(dest: str, source: str | os.PathLike[str] | None, overwrite: bool) -> None:
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None,
                overwrite: bool = True) -> Iterator[str]:
    """Write ``path`` all at once through a writer that takes a file name: yield a temporary path beside it.

    The block writes the temporary file by name (``safetensors.torch.save_file(tensors, tmp)``)
    and may read it back; on leaving the block it is fsynced and renamed over ``path``; on any
    exception, including ``KeyboardInterrupt``, it is removed and ``path`` is left as it was.

    Args:
        path: the destination file.
        source: the file the data comes from, if any; writing over it is refused.
        overwrite: whether an existing ``path`` may be replaced.

    Raises:
        CheckpointError: as :func:`atomic_write`.

    Example:
        >>> with atomic_path("model.safetensors") as tmp:          # doctest: +SKIP
        ...     safetensors.torch.save_file(state_dict, tmp)
    """
    dest = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(dest)
    _check_destination(dest, source, overwrite)
    try:
        perms = os.stat(dest).st_mode & 0o7777  # keep an existing file's permissions
    except OSError:
        perms = _creation_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, perms)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


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
    with atomic_path(path, source=source, overwrite=overwrite) as tmp:
        with open(tmp, mode, **open_kwargs) as f:  # by name, so ``f.name`` is the temporary file's path
            yield f
            f.flush()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[str]:
    """Fill a new folder all at once: yield a temporary folder beside ``path``, renamed into place at the end.

    ``path`` must not exist or be an empty folder (it is replaced). The result gets the
    permissions :func:`os.mkdir` would give it; on any exception the temporary folder and
    everything in it are removed.

    Raises:
        CheckpointError: the parent folder does not exist, or ``path`` is a non-empty folder or a file.
    """
    dest = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise CheckpointError("the destination's parent folder does not exist", path=parent,
                              hint="create it first, or choose another output path")
    if os.path.isdir(dest) and os.listdir(dest):
        raise CheckpointError("the destination folder is not empty", path=dest,
                              hint="remove it or choose a new folder name")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise CheckpointError("the destination exists and is not a folder", path=dest,
                              hint="remove it or choose a new folder name")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0o700)
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
