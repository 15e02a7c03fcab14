"""Where a checkpoint comes from: a local path, a Hugging Face repo, a URL or an object store.

Every verb that takes a path (``open``, ``load``, ``plan``, ``build``, ``from_checkpoint``, and
the CLI) also takes:

- ``hf://org/name``, ``hf://org/name@revision`` and ``hf://org/name/sub/folder_or_file``:
  resolved by ``huggingface_hub`` in its own cache (``HF_HUB_CACHE`` / ``HF_HOME``), offline
  when ``HF_HUB_OFFLINE=1``; online, only the weights and ``config.json`` are downloaded
  (safetensors when the repo has them, else ``.bin``).
- ``https://...``, ``s3://...``, ``gs://...``: read through ``fsspec`` in byte ranges into a
  local cache (:mod:`ckptfit._remote`): headers first, then only the tensors that are read.

A Git LFS pointer file (what a clone without ``git lfs pull`` holds) is recognised: the real
file is looked for where Git LFS and the Hugging Face cache keep it, checked against the
pointer's sha256 and size, and read instead; if it is not there, the error says so.
``sha256=`` (``--sha256`` on the CLI) checks any source before it is read: a hex digest, or
the path of an LFS pointer file that records one.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from .errors import CheckpointError, CorruptCheckpoint, NotACheckpoint

__all__ = ["is_remote", "open_source", "local_file", "resolve_hf", "LfsPointer", "read_lfs_pointer", "find_lfs_object",
           "check_sha256", "expected_digest"]

LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"
MAX_POINTER = 1024  # the spec caps pointer files well under this
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pth.tar", ".npz", ".npy", ".pkl")


def is_remote(spec: object) -> bool:
    """Whether ``spec`` names a source ckptfit fetches (``hf://``, ``https://``, ``s3://``, ``gs://``)."""
    from ._remote import SCHEMES

    return isinstance(spec, str) and spec.lower().startswith(("hf://",) + SCHEMES)


# ----------------------------------------------------------------------------------- Git LFS

@dataclass(frozen=True)
class LfsPointer:
    """A Git LFS pointer: the sha256 and size of the file it stands for."""

    oid: str
    size: int


def read_lfs_pointer(path: str) -> LfsPointer | None:
    """The pointer in ``path`` if it is a Git LFS pointer file (small, ``version https://git-lfs...``), else None.

    Example:
        >>> import tempfile
        >>> p = tempfile.mktemp()
        >>> _ = open(p, "w").write("version https://git-lfs.github.com/spec/v1\\noid sha256:" + "ab" * 32
        ...                        + "\\nsize 12\\n")
        >>> read_lfs_pointer(p).size
        12
    """
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_POINTER:
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_POINTER)
    except OSError:
        return None
    if not data.startswith(LFS_HEADER):
        return None
    oid = re.search(rb"^oid sha256:([0-9a-f]{64})\s*$", data, re.M)
    size = re.search(rb"^size (\d{1,20})\s*$", data, re.M)
    if oid is None or size is None:
        raise NotACheckpoint("this is a Git LFS pointer, but a damaged one (no 'oid sha256:' or 'size' line)",
                             path=path, hint="run `git lfs pull` in the repository, or download the file itself")
    return LfsPointer(oid.group(1).decode(), int(size.group(1)))


def find_lfs_object(path: str, pointer: LfsPointer) -> str | None:
    """Where the file a pointer stands for is kept, if anywhere ckptfit knows to look.

    Looked for, in order: ``.git/lfs/objects/<aa>/<bb>/<oid>`` of every enclosing directory (what
    ``git lfs fetch`` fills before checkout), a file named after the oid beside the pointer, and
    ``blobs/<oid>`` of an enclosing Hugging Face cache entry.
    """
    oid = pointer.oid
    here = os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(here, oid)]
    d = here
    while True:
        candidates.append(os.path.join(d, ".git", "lfs", "objects", oid[:2], oid[2:4], oid))
        candidates.append(os.path.join(d, "blobs", oid))
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for c in candidates:
        if os.path.isfile(c) and os.path.abspath(c) != os.path.abspath(path):
            return c
    return None


def expected_digest(sha256: str | os.PathLike[str] | None) -> tuple[str, int | None] | None:
    """``(hex digest, size or None)`` from ``sha256=``: 64 hex digits, or the path of an LFS pointer file.

    Raises:
        CheckpointError: neither a sha256 hex digest nor an LFS pointer file.
    """
    if sha256 is None:
        return None
    text = os.fspath(sha256).strip()
    hexdigest = text.lower().removeprefix("sha256:")
    if re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        return hexdigest, None
    if os.path.isfile(text):
        pointer = read_lfs_pointer(text)
        if pointer is not None:
            return pointer.oid, pointer.size
    raise CheckpointError(f"sha256={text[:80]!r} is neither a sha256 digest (64 hex digits) nor a Git LFS pointer "
                          f"file", hint="pass the file's sha256 as 64 hex digits (`sha256sum FILE` prints it)")


def check_sha256(path: str, expected: tuple[str, int | None], *, what: str = "") -> None:
    """Hash ``path`` (a progress bar on long files) and compare with ``expected``.

    Raises:
        CorruptCheckpoint: the size or the digest differs; the message gives both digests.
        CheckpointError: ``path`` is a directory (a digest checks one file).
    """
    from ._progress import progress

    digest, size = expected
    if os.path.isdir(path):
        raise CheckpointError("sha256= checks one file, and this is a folder", path=path,
                              hint="pass the file itself (for example .../model.safetensors)")
    actual_size = os.path.getsize(path)
    label = what or path
    if size is not None and actual_size != size:
        raise CorruptCheckpoint(f"{label} holds {actual_size} bytes but {size} were expected (the LFS pointer's size)",
                                path=path, hint="download or copy the file again")
    h = hashlib.sha256()
    with open(path, "rb") as f, progress(actual_size, f"sha256 {os.path.basename(path)}") as bar:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            bar.advance(len(chunk))
    if h.hexdigest() != digest:
        raise CorruptCheckpoint(f"sha256 mismatch: expected {digest}, the file has {h.hexdigest()}", path=path,
                                hint="the file differs from the one the digest was taken of; download it again "
                                     "(nothing was loaded)")


# ----------------------------------------------------------------------------------- Hugging Face

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf://org/name@rev/sub`` -> ``("org/name", "rev", "sub")``.

    Example:
        >>> parse_hf("hf://google/vit-base@v1.0/onnx")
        ('google/vit-base', 'v1.0', 'onnx')
    """
    rest = spec[len("hf://"):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{spec!r} does not name a Hugging Face repository",
                              hint="write hf://ORG/NAME (optionally @REVISION and /SUBFOLDER)")
    org, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    return f"{org}/{name}", revision or None, "/".join(parts[2:])


def _choose_files(files: list[str], sub: str) -> list[str]:
    """The files a load needs from a repo listing: safetensors (else .bin, else other weights) and config.json."""
    if sub in files:
        chosen = [sub]
        if sub.endswith(".index.json"):
            folder = sub.rsplit("/", 1)[0] + "/" if "/" in sub else ""
            chosen += [f for f in files if f.startswith(folder) and "/" not in f[len(folder):]
                       and f.endswith((".safetensors", ".bin"))]
        return chosen
    prefix = f"{sub}/" if sub else ""
    here = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    for kind in (".safetensors", ".bin"):
        weights = [f for f in here if f.endswith(kind) or f.endswith(kind + ".index.json")]
        if weights:
            break
    else:
        weights = [f for f in here if f.endswith(_WEIGHTS)]
    return weights + [f for f in here if f.endswith("config.json")]


def resolve_hf(spec: str) -> str:
    """The local path (a snapshot folder, a subfolder or a file) that ``hf://...`` names.

    Online, lists the repository and downloads only what a load reads; offline
    (``HF_HUB_OFFLINE=1``, or the hub unreachable) uses the cache as it is.

    Raises:
        CheckpointError: not cached while offline, no such repo/revision/subfolder.
    """
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise CheckpointError("hf:// sources need huggingface_hub", path=spec,
                              hint='pip install "ckptfit[hf]"') from e
    repo, revision, sub = parse_hf(spec)
    cache = _hf_cache_dir()
    offline = _env_flag("HF_HUB_OFFLINE") or bool(getattr(hub.constants, "HF_HUB_OFFLINE", False))
    folder = None
    online_error: Exception | None = None
    if not offline:
        try:
            files = hub.list_repo_files(repo, revision=revision)
            wanted = _choose_files(files, sub)
            if not wanted:
                raise CheckpointError(f"{repo}{f'/{sub}' if sub else ''} holds no weights ckptfit reads "
                                      f"({', '.join(files[:8])}{' ...' if len(files) > 8 else ''})", path=spec,
                                      hint="name the folder or file that holds the weights: hf://ORG/NAME/SUBFOLDER")
            folder = hub.snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=wanted)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - no network, hub down, auth: fall back to the cache
            online_error = e
    if folder is None:
        try:
            folder = hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends
            why = ("HF_HUB_OFFLINE is set" if offline else
                   f"the hub could not be reached ({type(online_error).__name__}: {str(online_error)[:120]})")
            raise CheckpointError(f"{repo}{f'@{revision}' if revision else ''} is not in the Hugging Face cache "
                                  f"({cache or hub.constants.HF_HUB_CACHE}) and {why}", path=spec,
                                  hint=f"download it first (`hf download {repo}`), or unset HF_HUB_OFFLINE") from e
    path = os.path.join(folder, sub) if sub else folder
    if not os.path.exists(path):
        raise CheckpointError(f"the cached snapshot of {repo} has no {sub!r}", path=folder,
                              hint="check the subfolder or file name (it is case-sensitive)")
    return path


# ----------------------------------------------------------------------------------- opening

def local_file(spec: str) -> str:
    """A local path holding all of ``spec``'s bytes: the hub cache's for ``hf://``, ckptfit's cache for a URL."""
    if spec.lower().startswith("hf://"):
        return resolve_hf(spec)
    if is_remote(spec):
        from ._remote import RemoteFile

        remote = RemoteFile(spec)
        remote.fetch_all()
        return remote.local
    return spec


def open_source(source: str | os.PathLike[str], *, trust: bool = False, sha256: str | None = None):
    """Open any source (local path, LFS pointer, ``hf://``, URL) as a :class:`~ckptfit.checkpoint.Checkpoint`.

    Raises:
        CheckpointError: the source cannot be resolved or fetched (and the subclasses a local
            open raises: corrupt, not a checkpoint, unsafe).
    """
    from .formats import open_local

    spec = os.fspath(source)
    expected = expected_digest(sha256)
    if spec.lower().startswith("hf://"):
        spec = resolve_hf(spec)
    elif is_remote(spec):
        return _open_remote(spec, trust=trust, expected=expected)
    pointer = read_lfs_pointer(spec)
    if pointer is not None:
        real = find_lfs_object(spec, pointer)
        if real is None:
            raise NotACheckpoint(f"this is a Git LFS pointer, not the checkpoint: the LFS object was never fetched "
                                 f"(sha256 {pointer.oid}, {pointer.size} bytes; not in .git/lfs/objects nor beside "
                                 f"the pointer)", path=spec,
                                 hint="run `git lfs pull` (or `git lfs fetch && git lfs checkout`) in the repository, "
                                      "or download the file itself and pass it with --sha256 POINTER_FILE")
        if expected is not None and expected[0] != pointer.oid:
            raise CorruptCheckpoint(f"sha256 mismatch: expected {expected[0]}, the LFS pointer records {pointer.oid}",
                                    path=spec, hint="check which file the digest belongs to")
        check_sha256(real, (pointer.oid, pointer.size), what=f"the LFS object of {spec}")
        spec = real
    elif expected is not None:
        check_sha256(spec, expected)
    return open_local(spec, trust=trust)


def _open_remote(url: str, *, trust: bool, expected: tuple[str, int | None] | None):
    from ._remote import RemoteFile, fetch_plan_for_open
    from .formats import open_local
    from .lazy import register_filler

    remote = RemoteFile(url, sha256=expected[0] if expected else None)
    if expected is not None and expected[1] is not None and remote.size != expected[1]:
        raise CorruptCheckpoint(f"the server says the file holds {remote.size} bytes but {expected[1]} were expected "
                                f"(the LFS pointer's size)", path=url, hint="check the URL")
    # a digest needs every byte, and so does real unpickling; other loads fetch only what they read
    if expected is not None or trust or not fetch_plan_for_open(remote):
        remote.fetch_all()
    if expected is not None:
        check_sha256(remote.local, expected, what=url)
    register_filler(remote.local, None if remote.complete else remote.ensure)
    ckpt = open_local(remote.local, trust=trust)
    ckpt._size = remote.size  # noqa: SLF001 - the size is the remote file's; its path, below, is not a local one
    ckpt.path = url  # reports name the URL; the bytes come from the cache file (ckpt.remote.local)
    ckpt.remote = remote  # bytes fetched so far, the cache file: for reports and tests
    return ckpt
