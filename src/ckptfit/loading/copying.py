"""The copy engine: applies a plan's loads to the model's tensors, reading the file with
``pread`` (:class:`Streamer`), checking every record's CRC-32 (:class:`_Checks`) and able to
undo everything if it fails part way (:class:`Rollback`)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._class_map import fill_rows, pick_rows
from .._crc import crc32
from .._progress import progress
from ..checkpoint import StateDictCandidate
from ..dtypes import itemsize
from ..lazy import CRC_CHUNK, LazyTensor, MappedFile, Record, buffer_of, collecting_reads, crc_error, locate
from ..plans import Plan
from ..transforms import apply_transform
from .materialising import assign, device_for, holders_of, materialize_unloaded
from .planning import Target
from .ties import check_ties

__all__ = ["Rollback", "Streamer", "apply_plan"]


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


# Bytes per piece when a tensor is streamed through a staging buffer (a cast, a GPU).
_CHUNK_BYTES = 64 << 20


def _bump_version(t: torch.Tensor) -> None:
    """Tell autograd ``t`` was modified in place (a graph saved before the load then refuses to run)."""
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(t)


def _read_checked(mfile: MappedFile, offset: int, view: memoryview, check: bool, crc: int = 0) -> int:
    """Fill ``view`` from the file at ``offset``; with ``check``, return the CRC-32 (continuing ``crc``).

    The bytes are read in pieces of :data:`CRC_CHUNK`, each hashed right after it is read, while
    it is still in the CPU cache: checking costs about one pass at cache speed, not a second
    read of the file.
    """
    if not check:
        mfile.readinto(offset, view)
        return crc
    n = len(view)
    for start in range(0, n, CRC_CHUNK):
        piece = view[start:start + CRC_CHUNK]
        mfile.readinto(offset + start, piece)
        crc = crc32(piece, crc)
    return crc


class Streamer:
    """Copies checkpoint tensors into model tensors, reading the file itself where it can.

    A source that views a memory-mapped file is not copied through the mapping (that would
    leave the mapping's pages resident: twice the model in RAM) but read with ``pread``:
    straight into the destination's memory when dtype and layout match, otherwise in pieces
    of :data:`_CHUNK_BYTES` through one staging buffer that is cast-copied into place. For a
    CUDA destination the staging buffers are pinned, two of them alternate, and the host to
    device copies run on a side stream, so reading the next piece overlaps sending the last.
    Call :meth:`finish` before using the destinations.
    """

    def __init__(self) -> None:
        self._stage: torch.Tensor | None = None
        self._stage_view: memoryview | None = None  # buffer_of(self._stage), which does not keep it alive
        self._cuda: dict[torch.device, tuple[Any, list[torch.Tensor], list[Any]]] = {}
        self._turn = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, loc: tuple[MappedFile, int, int] | None = None,
             record: Record | None = None, tensor: str | None = None) -> None:
        """``dst.copy_(src)`` (with the same dtype conversion), reading ``src``'s bytes from its file.

        ``loc`` is ``locate(src)`` when the caller has it already. With ``record`` (the file
        record ``src`` spans exactly), the CRC-32 of the bytes is computed as they are read,
        piece by piece while they are in the CPU cache, and compared at the end.

        Raises:
            CorruptCheckpoint: the bytes read do not match ``record``'s CRC-32 (naming it and
                ``tensor``); ``dst`` is then partly written (the caller restores it).
        """
        if loc is None:
            loc = locate(src)
        if loc is None or dst.is_conj() or dst.is_neg() or src.is_conj() or src.is_neg():
            if record is not None and loc is not None:  # a conjugate or negative view: check its record on its own
                loc[0].check_record(record, tensor=tensor)
            dst.copy_(src)  # already in memory (a state dict, a DCP tensor gathered from chunks): one copy
            return
        mfile, offset, span = loc
        if not src.is_contiguous() or not dst.is_contiguous() or dst.numel() != src.numel():
            # a strided view of a stored tensor: read the bytes it spans, then one strided copy
            raw = torch.empty(span, dtype=torch.uint8)
            crc = _read_checked(mfile, offset, buffer_of(raw), record is not None)
            dst.copy_(torch.as_strided(raw.view(src.dtype), tuple(src.shape), tuple(src.stride())))
        elif dst.device.type == "cpu" and dst.dtype == src.dtype:
            crc = _read_checked(mfile, offset, buffer_of(dst), record is not None)  # straight into the model's memory
            _bump_version(dst)  # an in-place write autograd must know about, as copy_ would
        else:
            crc = self._pieces(dst.view(-1), mfile, offset, src.dtype, record is not None)
        if record is not None and crc != record.crc:
            raise crc_error(record, mfile.path, tensor)

    def _pieces(self, flat: torch.Tensor, mfile: MappedFile, offset: int, src_dtype: torch.dtype,
                check: bool = False) -> int:
        """Stream through the staging buffer(s); returns the CRC-32 of the bytes read when ``check``."""
        size = itemsize(src_dtype)
        per = max(_CHUNK_BYTES // size, 1)
        n = flat.numel()
        cuda = flat.device.type == "cuda"
        crc = 0
        if not cuda and n <= per:  # one piece (every small tensor): no loop, no new buffer view
            nbytes = n * size
            stage, view = self._cpu_stage(per * size)
            crc = _read_checked(mfile, offset, view[:nbytes], check)
            flat.copy_(stage[:nbytes].view(src_dtype))
            return crc
        if cuda:
            stream, bufs, events = self._cuda_state(flat.device, per * size)
            stream.wait_stream(torch.cuda.current_stream(flat.device))  # flat was made on the current stream
            ctx: Any = torch.cuda.stream(stream)
        else:
            self._cpu_stage(per * size)
            ctx = contextlib.nullcontext()
        with ctx:
            for start in range(0, n, per):
                k = min(per, n - start)
                if cuda:
                    j = self._turn % len(bufs)
                    self._turn += 1
                    if events[j] is not None:
                        events[j].synchronize()  # the copy out of this buffer has finished
                    buf = bufs[j][: k * size]
                else:
                    buf = self._stage[: k * size]  # type: ignore[index]
                crc = _read_checked(mfile, offset + start * size, buffer_of(buf), check, crc)
                flat[start:start + k].copy_(buf.view(src_dtype), non_blocking=cuda)
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events[j] = ev
        return crc

    def _cpu_stage(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """The CPU staging buffer (at least ``nbytes``) and a byte view of it, made once and kept."""
        if self._stage is None or self._stage_view is None or self._stage.numel() < nbytes:
            self._stage = torch.empty(nbytes, dtype=torch.uint8)
            self._stage_view = buffer_of(self._stage)
        return self._stage, self._stage_view

    def _cuda_state(self, device: torch.device, nbytes: int) -> tuple[Any, list[torch.Tensor], list[Any]]:
        state = self._cuda.get(device)
        if state is None or state[1][0].numel() < nbytes:
            if state is not None:
                state[0].synchronize()
            stream = torch.cuda.Stream(device=device)
            bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            state = self._cuda[device] = (stream, bufs, [None, None])
        return state

    def finish(self) -> None:
        """Wait for every copy in flight and release the staging buffers."""
        for stream, _bufs, _events in self._cuda.values():
            stream.synchronize()
        self._cuda.clear()
        self._stage_view = None
        self._stage = None


def _file_order(item: tuple) -> tuple:
    loc = item[3]
    return (0, loc[0].path, loc[1]) if loc is not None else (1, "", 0)


_NO_CHECKSUM = {"safetensors": "safetensors has no checksum", "torch-legacy": "legacy torch files have no checksum"}


class _Checks:
    """The CRC-32 checks of one load: each record read is checked once, with its copy where possible.

    A record read whole by exactly one copy (a stored tensor, the common case) is hashed as the
    copy reads it (:class:`Streamer`). Any other record a reader handed out (a tensor that
    views part of a storage, one storage behind several tensors, the sources of a transposed
    or fused weight, a DCP chunk) is read and checked on its own before the model changes.
    """

    def __init__(self, verify: bool):
        self.verify = verify
        self.records: dict[tuple[int, int], tuple[MappedFile, Record, str]] = {}  # every record read
        self.counts: dict[tuple[int, int], int] = {}
        self.done: set[tuple[int, int]] = set()
        self.no_checksum: set[str] = set()  # files read whose format has no checksum

    def saw(self, reads: list[tuple[MappedFile, Record]], tensor: str) -> None:
        """Records handed out while reading ``tensor``."""
        for m, r in reads:
            k = (id(m), r.offset)
            self.records.setdefault(k, (m, r, tensor))
            self.counts[k] = self.counts.get(k, 0) + 1

    def fused(self, loc: tuple[MappedFile, int, int] | None) -> Record | None:
        """The record a copy from ``loc`` can check as it reads (it spans exactly that record, read once)."""
        if loc is None:
            return None
        m, offset, span = loc
        r = m.record_at(offset)
        if r is None:
            if not m.has_checksums:
                self.no_checksum.add(m.path)
            return None
        k = (id(m), r.offset)
        if not self.verify or r.offset != offset or r.size != span or self.counts.get(k, 0) != 1:
            return None
        self.done.add(k)  # by the copy, which raises if it fails
        return r

    def check_rest(self) -> None:
        """Check, each on its own, every record read that no copy checks."""
        if not self.verify:
            return
        for k, (m, r, tensor) in self.records.items():
            if k not in self.done:
                m.check_record(r, tensor=tensor)
                self.done.add(k)

    def check_new(self, reads: list[tuple[MappedFile, Record]], tensor: str) -> None:
        """Records read again during the copy pass (a tensor a reader rebuilds): check any not checked yet."""
        for m, r in reads:
            k = (id(m), r.offset)
            if self.verify and k not in self.done:
                m.check_record(r, tensor=tensor)
                self.done.add(k)

    def summary(self, fmt: str | None) -> str | None:
        """The report's ``bytes:`` line (``None`` for tensors handed over in memory)."""
        n = len(self.records)
        if not self.verify:
            return "not checked (verify=False)" if n or self.no_checksum else None
        if n and not self.no_checksum:
            return f"CRC-32 checked ({n} record{'s' if n != 1 else ''})"
        why = _NO_CHECKSUM.get(fmt or "")
        if why is None:
            kinds = {"safetensors" if path.endswith(".safetensors") else "torch-legacy" for path in self.no_checksum}
            why = "; ".join(_NO_CHECKSUM[k] for k in sorted(kinds)) or "the format has no checksum"
        if n:
            return f"CRC-32 checked ({n} record{'s' if n != 1 else ''}); other files not checked ({why})"
        return f"not checked ({why})" if self.no_checksum else None


class Rollback:
    """Puts the model back exactly as it was if the load fails part way (all or nothing).

    Taken before anything changes: every module's parameter and buffer entries and each
    tensor's ``.data`` (references, no copy), which undoes device moves, casts and meta
    tensors made real, all of which write to new memory. A tensor overwritten *in place*
    (a load into the model's own memory) is first copied to the CPU (:meth:`keep`), one tensor
    at a time just before it is written: a failed load then costs nothing to undo but the copy
    back, and a successful one costs one memory copy of the tensors it overwrites, no more
    device memory, and no change of any tensor's address.
    """

    def __init__(self, model: nn.Module):
        self.entries: list[tuple[dict, str, Any]] = []
        self.datas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.storages: set[int] = set()
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    self.entries.append((store, name, t))
                    if t is not None and id(t) not in self.datas:
                        self.datas[id(t)] = (t, t.data)
                        if not t.is_meta and t.numel():
                            self.storages.add(t.untyped_storage().data_ptr())
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kept: set[int] = set()

    def keep(self, t: torch.Tensor) -> None:
        """``t`` is about to be written in place: keep a copy of its values if they are the model's own."""
        if id(t) in self.kept or t.is_meta or not t.numel():
            return
        self.kept.add(id(t))
        if t.untyped_storage().data_ptr() in self.storages:
            self.saved.append((t.detach(), t.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        """Undo every change since construction (values, tensors, dtypes, devices)."""
        with torch.no_grad():
            for t, data in self.datas.values():
                t.data = data
            for store, name, t in self.entries:
                store[name] = t
            for t, snap in reversed(self.saved):
                t.copy_(snap)
        self.saved.clear()


def _dtype_of(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a model tensor takes in this load (``dtype=`` casts floating tensors only)."""
    return dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype


def apply_plan(target: Target, cand: StateDictCandidate, p: Plan, *, device: Any = None,
           dtype: torch.dtype | None = None, verify: bool = True,
           rollback: Rollback | None = None) -> tuple[int, str | None]:
    """Copy or assign every planned tensor. Returns (bytes read from the checkpoint, the ``bytes:`` line).

    First a tied weight whose file holds a tensor of its own is checked equal to the tensor the
    tie is filled from (:func:`~.ties.check_ties`; refused otherwise). Then every source is read
    once (so a damaged file fails before the model changes): a
    view of a memory-mapped file costs no memory and is kept; a tensor a reader had to build
    in memory (a DCP tensor gathered from chunks, an inflated zip member) is dropped and read
    again in its turn, so at most one of those exists at a time. Records that no single copy
    reads whole are CRC-checked now (:class:`_Checks`). Then, in file order, each source is
    copied into its model tensor (:class:`Streamer`, which checks the CRC-32 of each record
    as it reads it) or, for a model tensor on the meta device, assigned (:func:`assign`). A
    failure at any point (I/O error, CRC mismatch) raises with ``rollback`` able to undo every
    change: tensors overwritten in place are kept (:meth:`Rollback.keep`) before they are.
    """
    check_ties(cand, p, lambda k: _dtype_of(target.tensors[k], dtype), verify=verify,
               is_parameter=lambda k: k not in target.owner or target.owner[k][2])  # before anything changes
    work: list[tuple[str, LazyTensor, torch.Tensor | None, tuple[MappedFile, int, int] | None, Record | None]] = []
    nbytes = 0
    checks = _Checks(verify)
    pending = []
    rows: dict[str, tuple[int | None, ...]] = {}  # class_map: the file's rows, written over the model's at copy time
    with collecting_reads() as reads:
        for d in p.loads:
            if d.source is None:
                continue
            lazy = cand.tensors[d.source]
            first = len(reads)
            if d.transform is not None and d.transform.kind == "class_map":  # ckptfit._class_map
                rows[d.target] = d.transform.rows
                pending.append((d.target, lazy, pick_rows(lazy.load(), d.transform.rows), None))
                nbytes += lazy.nbytes
            elif d.transform is not None:  # transposed, split or joined: made in memory now, copied in its turn
                pending.append((d.target, lazy, apply_transform(d, lambda k: cand.tensors[k].load()), None))
                nbytes += sum(cand.tensors[k].nbytes for k in d.transform.sources or (d.source,))
            else:
                t = lazy.load()
                loc = locate(t)
                pending.append((d.target, lazy, t if loc is not None else None, loc))
                nbytes += lazy.nbytes
            checks.saw(reads[first:], d.source)
    for key, lazy, src, loc in pending:
        work.append((key, lazy, src, loc, checks.fused(loc)))
    checks.check_rest()  # partly read records, shared ones, transform sources: before the model changes
    dev = device_for(device)
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    if any(v.is_meta for v in target.tensors.values()):
        materialize_unloaded(target, {w[0] for w in work if w[0] not in rows}, device, dtype, rollback)  # new rows: init
        holders = holders_of(target)
    work.sort(key=_file_order)  # sequential reads; stable, so ties keep the plan's order
    streamer = Streamer()
    shared: dict[int, int] = {}  # data_ptr of a source assigned zero-copy -> id of the model tensor
    where = os.path.basename(p.path) if p.path else "checkpoint"
    try:
        with _no_grad(), progress(nbytes, f"loading {where}") as bar, collecting_reads() as again:
            for key, lazy, src, loc, record in work:
                if src is None:
                    first = len(again)
                    src = lazy.load()
                    checks.check_new(again[first:], key)
                dst = target.tensors[key]
                if key in rows:  # the new classes' rows keep the model's init (materialised above if on meta)
                    src = fill_rows(dst, src, rows[key])
                if dst.is_meta:
                    assign(target, key, dst, src, loc, holders, streamer, shared, dev, dtype, record)
                else:
                    if rollback is not None:
                        rollback.keep(dst)
                    streamer.copy(dst, src, loc, record, key)
                bar.advance(src.numel() * src.element_size())
    finally:
        streamer.finish()
    return nbytes, checks.summary(p.format)
