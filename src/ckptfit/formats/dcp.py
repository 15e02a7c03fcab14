"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``*.distcp`` files.

``.metadata`` is a pickle of dataclasses (read as inert placeholders by the restricted
interpreter, nothing imported): for every tensor its global size, dtype and chunks (DTensor
shards written by several ranks), and where each chunk's bytes are (file, offset, length).
Each chunk is itself a small ``torch.save`` archive embedded in a ``.distcp`` file; it is
parsed when the tensor is loaded, and a tensor written as one chunk is a zero-copy view of
the memory-mapped file.
"""
from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpoint, UnsupportedFormat
from ..lazy import LazyTensor, MappedFile
from ..pickle_rebuild import check_dtype
from ..safety import Placeholder, load_pickle, short_repr
from . import check_regular, register

if TYPE_CHECKING:
    import torch

    from ..scan_walk import ScanWalk

__all__ = ["open_dcp", "DcpChunk", "read_region"]


def _sniff(path: str, head: bytes) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


class DcpChunk:
    """One saved piece of a tensor: its offsets/sizes in the global tensor and where its bytes are."""

    __slots__ = ("offsets", "sizes", "file", "offset", "length")

    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...], file: str, offset: int, length: int):
        self.offsets, self.sizes, self.file, self.offset, self.length = offsets, sizes, file, offset, length


def _attrs(obj: Any, what: str, path: str) -> dict:
    if not isinstance(obj, Placeholder):
        raise CorruptCheckpoint(f"DCP .metadata: {what} is not an object", path=path)
    return obj.attributes()


def _tuple_ints(x: Any) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or len(x) > 64 or not all(type(i) is int and 0 <= i < 1 << 62 for i in x):
        raise CorruptCheckpoint(f"DCP .metadata: expected a tuple of sizes, got {short_repr(x, 60)}")
    return tuple(x)


MAX_METADATA_BYTES = 1 << 30


def read_chunk(path: str, chunk: DcpChunk, mapped: dict[str, MappedFile], dtype: torch.dtype) -> torch.Tensor:
    """The tensor stored for ``chunk`` (a view of the mapped file where possible)."""
    from .torch_zip import read_torch_zip_at

    fpath = os.path.join(path, chunk.file)
    mf = mapped.get(fpath)
    if mf is None:
        mf = mapped[fpath] = MappedFile(fpath)
    head = mf.read(chunk.offset, min(4, chunk.length))
    if head == b"PK\x03\x04":
        value, _scan, _ = read_torch_zip_at(fpath, base=chunk.offset, length=chunk.length, mapped=mf,
                                            what="DCP chunk")
        if not isinstance(value, LazyTensor):
            raise CorruptCheckpoint(f"DCP chunk in {chunk.file} at {chunk.offset} does not hold a tensor", path=path)
        t = value.load()
    else:  # raw bytes (safetensors-style serialization)
        numel = 1
        for s in chunk.sizes:
            numel *= s
        if numel * dtype.itemsize != chunk.length:
            raise CorruptCheckpoint(f"DCP chunk in {chunk.file} holds {chunk.length} bytes, expected "
                                    f"{numel * dtype.itemsize}", path=path)
        t = mf.tensor(chunk.offset, dtype, numel).view(chunk.sizes)
    if tuple(t.shape) != chunk.sizes:
        raise CorruptCheckpoint(f"DCP chunk has shape {list(t.shape)}, metadata says {list(chunk.sizes)}", path=path)
    return t


def read_region(path: str, chunks: list[DcpChunk], mapped: dict[str, MappedFile], dtype: torch.dtype,
                index: tuple[slice, ...]) -> torch.Tensor:
    """The block ``index`` (one step-1 slice per dimension) of a tensor saved as ``chunks``.

    Only the chunks that overlap the block are read, and of each only the overlap is copied
    (a chunk is a view of the memory-mapped file), so a rank loading its shard touches about
    its share of the bytes whatever the number of ranks that saved the checkpoint.
    """
    import torch  # reading tensor bytes

    lo = tuple(s.start for s in index)
    hi = tuple(s.stop for s in index)
    out: torch.Tensor | None = None
    for c in chunks:
        a = tuple(max(o, l) for o, l in zip(c.offsets, lo))
        b = tuple(min(o + s, h) for o, s, h in zip(c.offsets, c.sizes, hi))
        if any(x >= y for x, y in zip(a, b)):
            continue  # no overlap (or an empty block)
        piece = read_chunk(path, c, mapped, dtype)[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c.offsets))]
        if a == lo and b == hi:
            return piece  # one chunk holds the whole block: a view, no copy
        if out is None:
            out = torch.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=dtype)
        out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))].copy_(piece)
    return out if out is not None else torch.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=dtype)


def scan_dcp(w: ScanWalk, path: str) -> set[str]:
    """The scan hook: a DCP folder's ``.metadata``, then every byte range its storage records point at, in
    whatever file; returns the real paths it read."""
    from ..scan_walk import MAX_SCAN_PICKLE, ScanWalk, looks_like_pickle
    from .zip_scan import scan_zip_region

    covered: set[str] = set()
    mpath = os.path.join(path, ".metadata")
    covered.add(os.path.realpath(mpath))
    try:
        if not os.path.isfile(mpath):
            raise OSError("not a regular file")
        with open(mpath, "rb") as f:
            data = f.read(MAX_SCAN_PICKLE + 1)
    except OSError as e:
        w.errors.append(f".metadata: {e}")
        return covered
    md, _ = w.run(data, ".metadata")
    storage = md.attributes().get("storage_data") if isinstance(md, Placeholder) else None
    if not isinstance(storage, dict):
        if md is not None:
            w.errors.append(".metadata lacks storage_data: the storage records cannot be followed")
        return covered
    regions: dict[tuple[str, int, int], None] = {}
    for info in storage.values():
        fa = info.attributes() if isinstance(info, Placeholder) else {}
        rel, off, length = fa.get("relative_path"), fa.get("offset"), fa.get("length")
        if not isinstance(rel, str) or os.path.basename(rel) != rel or type(off) is not int \
                or type(length) is not int or off < 0 or length < 0:
            w.errors.append(f".metadata has a malformed storage record ({str(rel)[:60]!r}, {off!r}, {length!r})")
            continue
        regions[(rel, off, length)] = None
    for rel, off, length in regions:
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            w.errors.append(f"DCP data file {rel} is missing or not a regular file")
            continue
        covered.add(os.path.realpath(fp))
        if off + length > os.path.getsize(fp):
            w.errors.append(f"DCP data file {rel} is shorter than its records say (truncated)")
            continue
        with open(fp, "rb") as f:
            f.seek(off)
            head = f.read(min(length, 64))
        label = f"{rel}@{off}:"
        if head.startswith(b"PK\x03\x04"):
            scan_zip_region(w, fp, off, length, label=label)
        elif looks_like_pickle(head):  # torch.load of the record's bytes would unpickle them
            with open(fp, "rb") as f:
                f.seek(off)
                region = f.read(min(length, MAX_SCAN_PICKLE))
            sub = ScanWalk(fp)
            sub.run(region, "record", allow_trailing=True)
            w.absorb(sub, label)
    w.format = "dcp"
    return covered


@register("dcp", sniff=_sniff, priority=6, directory=True, scan=scan_dcp)
def open_dcp(path: str, trust: bool = False) -> Checkpoint:
    """Open a torch.distributed.checkpoint directory lazily, in one process, without a process group."""
    import torch  # the metadata's dtypes are torch dtypes: torch is imported to read them anyway

    mpath = os.path.join(path, ".metadata")
    check_regular(mpath, what="the DCP .metadata file")
    if os.path.getsize(mpath) > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(f"the DCP .metadata file is larger than {MAX_METADATA_BYTES >> 20} MiB", path=path)
    with open(mpath, "rb") as f:
        data = f.read()
    if not data:
        raise CorruptCheckpoint("the DCP .metadata file is empty (0 bytes)", path=path,
                                hint="the save was interrupted or the copy failed; copy the checkpoint folder again")
    md, scan = load_pickle(data, member=".metadata", path=path)
    a = _attrs(md, "the metadata", path)
    sdm = a.get("state_dict_metadata")
    storage = a.get("storage_data")
    planner = a.get("planner_data") or {}
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise CorruptCheckpoint("DCP .metadata lacks state_dict_metadata or storage_data", path=path)
    if not isinstance(planner, dict):
        planner = {}
    locations: dict[tuple[str, tuple | None], tuple[str, int, int]] = {}
    for idx, info in storage.items():
        ia, fa = _attrs(idx, "a storage index", path), _attrs(info, "a storage record", path)
        fqn = ia.get("fqn")
        if not isinstance(fqn, str):
            raise CorruptCheckpoint(f"DCP storage record names no tensor ({short_repr(fqn, 60)})", path=path)
        if fa.get("transform_descriptors"):
            raise UnsupportedFormat(f"DCP item {fqn!r} is stored with transforms "
                                    f"{short_repr(fa.get('transform_descriptors'))} (compression?)", path=path)
        rel = fa.get("relative_path")
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise CorruptCheckpoint(f"DCP storage record names a bad file {short_repr(rel, 60)}", path=path)
        off, length = fa.get("offset"), fa.get("length")
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            raise CorruptCheckpoint("DCP storage record has bad offsets", path=path)
        fpath = os.path.join(path, rel)
        if not os.path.lexists(fpath):
            raise CorruptCheckpoint(f"DCP data file {rel} is missing", path=path,
                                    hint="copy every *.distcp file of the checkpoint")
        check_regular(fpath, what=f"DCP data file {rel}")
        if off + length > os.path.getsize(fpath):
            raise CorruptCheckpoint(f"DCP data file {rel} is shorter than its records say (truncated)", path=path)
        o = ia.get("offset")
        locations[(fqn, _tuple_ints(o) if o is not None else None)] = (rel, off, length)

    mapped: dict[str, MappedFile] = {}
    flat: dict[str, Any] = collections.OrderedDict()
    for fqn, meta in sdm.items():
        ma = _attrs(meta, f"the entry {fqn!r}", path)
        qual = meta.qualname
        if qual.endswith("BytesStorageMetadata"):
            loc = locations.get((fqn, None))
            if loc is None:
                continue
            rel, off, length = loc
            from .torch_zip import read_torch_zip_at

            try:
                value, s2, _ = read_torch_zip_at(os.path.join(path, rel), base=off, length=length,
                                                 what=f"DCP item {fqn!r}")
                flat[fqn] = value
            except CorruptCheckpoint:
                flat[fqn] = "<unreadable>"
            continue
        pobj = ma.get("properties")
        props = _attrs(pobj, f"the properties of {fqn!r}", path)
        if not props and isinstance(pobj.state, tuple) and pobj.state:  # TensorProperties.__getstate__ tuple
            st = pobj.state
            props = {"dtype": st[0], "requires_grad": st[2] if len(st) > 2 else False}
        dtype = props.get("dtype")
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpoint(f"DCP entry {fqn!r} has no dtype", path=path)
        check_dtype(dtype, f"DCP tensor {fqn!r}")
        size = _tuple_ints(ma.get("size"))
        chunks = []
        listed = ma.get("chunks") or []
        if not isinstance(listed, list | tuple):
            raise CorruptCheckpoint(f"DCP entry {fqn!r}: its chunks are not a list", path=path)
        for ch in listed:
            ca = _attrs(ch, f"a chunk of {fqn!r}", path)
            offs, sizes = _tuple_ints(ca.get("offsets")), _tuple_ints(ca.get("sizes"))
            if len(offs) != len(size) or len(sizes) != len(size) or any(
                    o + s > full for o, s, full in zip(offs, sizes, size)):
                raise CorruptCheckpoint(f"DCP chunk of {fqn!r} lies outside the tensor's size {list(size)}", path=path)
            loc = locations.get((fqn, offs))
            if loc is None:
                raise CorruptCheckpoint(f"DCP chunk of {fqn!r} at offsets {list(offs)} has no storage record",
                                        path=path)
            chunks.append(DcpChunk(offs, sizes, *loc))
        covered = sum(_numel(c.sizes) for c in chunks)
        if covered != _numel(size):
            raise CorruptCheckpoint(f"DCP chunks of {fqn!r} cover {covered} of its {_numel(size)} elements",
                                    path=path, hint="some ranks' files are missing")
        if len({c.offsets for c in chunks}) != len(chunks):
            raise CorruptCheckpoint(f"DCP entry {fqn!r} lists the same chunk twice", path=path)
        backed = sum(length for _, _, length in {(c.file, c.offset, c.length) for c in chunks})
        if _numel(size) * dtype.itemsize > backed:  # every element is stored once: the files must hold them
            raise CorruptCheckpoint(f"DCP entry {fqn!r} of size {list(size)} ({dtype}) needs "
                                    f"{_numel(size) * dtype.itemsize} bytes but its chunks hold {backed}", path=path,
                                    hint="the .metadata does not match the data files")

        def read(chunks=chunks, size=size, dtype=dtype):
            if len(chunks) == 1 and chunks[0].sizes == size:
                return read_chunk(path, chunks[0], mapped, dtype)
            out = torch.empty(size, dtype=dtype)
            for c in chunks:
                piece = read_chunk(path, c, mapped, dtype)
                out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))].copy_(piece)
            return out

        read.read_slice = lambda index, chunks=chunks, dtype=dtype: read_region(path, chunks, mapped, dtype, index)
        t = LazyTensor(size, dtype, read, device="cpu", requires_grad=bool(props.get("requires_grad")))
        flat[fqn] = t
    tree = _nest(flat, planner)
    return Checkpoint(path=path, format="dcp", tree=tree, scans=(scan, *_record_scans(path, locations, mapped)),
                      closers=(mapped.clear,))


def _record_scans(path: str, locations: dict, mapped: dict[str, MappedFile]) -> list:
    """The pickle of every record stored as a torch archive, interpreted at open rather than at the first read:
    a record that would run code refuses the checkpoint now, so open and inspect never call safe what loading
    refuses (and ``ckptfit scan`` reads the same records)."""
    from .torch_zip import read_torch_zip_at

    scans = []
    for rel, off, length in dict.fromkeys(locations.values()):
        fpath = os.path.join(path, rel)
        mf = mapped.get(fpath)
        if mf is None:
            mf = mapped[fpath] = MappedFile(fpath)
        with open(fpath, "rb") as f:  # (not through the map: no tensor bytes are read here)
            f.seek(off)
            head = f.read(4) if length >= 4 else b""
        if head == b"PK\x03\x04":
            _, rscan, _ = read_torch_zip_at(fpath, base=off, length=length, mapped=mf,
                                            what=f"DCP record in {rel} at byte {off}")
            scans.append(rscan)
    return scans


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nest(flat: dict[str, Any], planner: dict) -> Any:
    """Rebuild the saved nesting ({'model': {...}, 'step': 5}) from the planner's key paths.

    Keys come in the order they were saved: the planner's (rank 0 flattening the state dict), not
    ``state_dict_metadata``'s, where tensors replicated on every rank come after the sharded ones.
    """
    root: dict = collections.OrderedDict()
    order = {fqn: i for i, fqn in enumerate(planner)}
    for fqn, v in sorted(flat.items(), key=lambda kv: order.get(kv[0], len(order))):
        p = planner.get(fqn)
        parts = [str(x) for x in p] if isinstance(p, tuple | list) and p else [fqn]
        d = root
        ok = True
        for part in parts[:-1]:
            nxt = d.setdefault(part, collections.OrderedDict())
            if not isinstance(nxt, dict):
                ok = False
                break
            d = nxt
        if ok:
            d[parts[-1]] = v
        else:
            root[fqn] = v
    return root
