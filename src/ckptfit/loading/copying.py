"""The copy engine: applies a plan's loads to the model's tensors, reading the file with
``pread`` on a few threads (:class:`~.streaming.Streamer`), checking every record's CRC-32
(:class:`_Checks`) and able to undo everything if it fails part way (:class:`Rollback`)."""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .._class_map import fill_rows, pick_rows
from .._progress import progress
from ..checkpoint import StateDictCandidate
from ..errors import LoadError
from ..lazy import LazyTensor, MappedFile, Record, collecting_reads, locate
from ..plans import Plan
from ..rendering import human_bytes
from ..transforms import apply_transform
from .materialising import assign, device_for, holders_of, materialize_unloaded
from .planning import Target
from .streaming import Streamer
from .ties import check_ties

__all__ = ["Rollback", "Streamer", "apply_plan"]


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _memory_available() -> int | None:
    """Bytes of memory the kernel says a process can still get (``MemAvailable``), if it says."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _room_to_undo(rollback: Rollback, tensors: list[torch.Tensor], p: Plan) -> None:
    """Refuse, before the model changes, a load whose undo copy cannot fit in memory (rather than be killed)."""
    need = rollback.undo_bytes(tensors)
    free = _memory_available() if need else None
    if free is None or need <= 0.9 * free:
        return
    problem = (f"loading in place overwrites {human_bytes(need)} of the model's memory, and to undo a load that "
               f"fails part way (all or nothing) ckptfit first keeps a copy of what it overwrites; only "
               f"{human_bytes(free)} of memory is available")
    where = f" {p.path}" if p.path else ""
    raise LoadError(f"Refused: loading{where} {problem.removeprefix('loading ')}; the model was not changed",
                    path=p.path, problems=[problem], plan=p,
                    hint="pass atomic=False to write in place without that copy: every byte is checked before the "
                         "model changes, but an I/O error or an interrupt while writing would leave it partly loaded\n"
                         "or delete this model and make it from the file with ckptfit.build(factory, path), "
                         "which needs no copy")


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

    def check_rest(self, run: Callable[[Callable[[], None], int | None, int], None]) -> None:
        """Check, each on its own, every record read that no copy checks (through ``run``: ``Streamer.run``,
        whose ``wait`` then raises the first failure)."""
        if not self.verify:
            return
        for k, (m, r, tensor) in self.records.items():
            if k not in self.done:
                run(functools.partial(m.check_record, r, tensor=tensor), None, r.size)
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
    device memory, and no change of any tensor's address. With ``keep_values=False``
    (``load(atomic=False)``) no values are copied: only the references are put back, and
    :attr:`written` says how many tensors a failed load had already overwritten.
    """

    def __init__(self, model: nn.Module, *, keep_values: bool = True):
        self.keep_values = keep_values  # False: load(atomic=False), no copy of values overwritten in place
        self._written: list[None] = []  # one entry per tensor written in place (list.append is thread-safe)
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
        self.saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.kept: set[int] = set()

    def keep(self, t: torch.Tensor) -> None:
        """``t`` is about to be written in place: keep a copy of its values if they are the model's own."""
        take = self.keep_later(t)
        if take is not None:
            take()

    def keep_later(self, t: torch.Tensor) -> Callable[[], None] | None:
        """Like :meth:`keep`, but returns the copy to make (on the thread that then writes ``t``), if any.

        Its place among the copies to restore is taken now, so undoing runs in the order the
        writes were planned whichever thread made them; a copy never made (its write was
        cancelled) restores nothing.
        """
        if id(t) in self.kept or t.is_meta or not t.numel():
            return None
        self.kept.add(id(t))
        if t.untyped_storage().data_ptr() not in self.storages:
            return None
        if not self.keep_values:
            return self._count
        slot = len(self.saved)
        self.saved.append((t.detach(), None))

        def take() -> None:
            self.saved[slot] = (self.saved[slot][0], t.detach().to("cpu", copy=True))
            self._count()
        return take

    def _count(self) -> None:
        self._written.append(None)

    @property
    def written(self) -> int:
        """Tensors written in place so far."""
        return len(self._written)

    def undo_bytes(self, tensors: list[torch.Tensor]) -> int:
        """Bytes :meth:`keep` would copy to write ``tensors`` in place (each storage's tensors once)."""
        if not self.keep_values:
            return 0
        seen: set[int] = set()
        total = 0
        for t in tensors:
            if t.is_meta or not t.numel() or id(t) in seen or id(t) in self.kept:
                continue
            seen.add(id(t))
            if t.untyped_storage().data_ptr() in self.storages:
                total += t.numel() * t.element_size()
        return total

    def restore(self) -> None:
        """Undo every change since construction (values, tensors, dtypes, devices)."""
        with torch.no_grad():
            for t, data in self.datas.values():
                t.data = data
            for store, name, t in self.entries:
                store[name] = t
            for t, snap in reversed(self.saved):
                if snap is not None:
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
    reads whole are CRC-checked now (:class:`_Checks`; all records when ``rollback`` keeps no
    values, ``atomic=False``). An in-place load whose undo copies would not fit in the memory
    the kernel says is available is refused here, before anything changes. Then, in file order,
    each source is copied into its model tensor (:class:`Streamer`, on a few threads, which
    checks the CRC-32 of each record as it reads it) or, for a model tensor on the meta device,
    assigned (:func:`assign`). A failure at any point (I/O error, CRC mismatch) raises, after
    every copy in flight has stopped, with ``rollback`` able to undo every change: tensors
    overwritten in place are kept (:meth:`Rollback.keep_later`) just before they are.
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
    precheck = rollback is not None and not rollback.keep_values  # atomic=False: no undo, so check all first
    streamer = Streamer()
    try:
        if precheck:
            checks.check_rest(streamer.run)  # every record read, before the model changes
        for key, lazy, src, loc in pending:
            work.append((key, lazy, src, loc, checks.fused(loc)))
        checks.check_rest(streamer.run)  # partly read records, shared ones, transform sources
        streamer.wait()  # ... all checked before the model changes
        if rollback is not None:
            _room_to_undo(rollback, [target.tensors[w[0]] for w in work], p)
        dev = device_for(device)
        holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
        if any(v.is_meta for v in target.tensors.values()):
            materialize_unloaded(target, {w[0] for w in work if w[0] not in rows}, device, dtype, rollback)  # new rows: init
            holders = holders_of(target)
        work.sort(key=_file_order)  # sequential reads; stable, so ties keep the plan's order
        shared: dict[int, int] = {}  # data_ptr of a source assigned zero-copy -> id of the model tensor
        where = os.path.basename(p.path) if p.path else "checkpoint"
        with _no_grad(), progress(nbytes, f"loading {where}") as bar, collecting_reads() as again:
            streamer.on_done = bar.advance
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
                    before = rollback.keep_later(dst) if rollback is not None else None
                    streamer.copy(dst, src, loc, record, key, before=before)
            streamer.finish()  # raises the first copy's error
    except BaseException:
        streamer.finish(cancel=True)  # copies running on other threads end before anything is undone
        raise
    return nbytes, checks.summary(p.format)
