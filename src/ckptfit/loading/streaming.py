"""Reading checkpoint bytes into tensors: ``pread`` straight into the destination's memory, the
CRC-32 of each record computed as it is read, on several threads at once (:class:`Streamer`).

Most of what a load costs on the CPU is not the copy but the kernel's work around it: giving
fresh memory its pages (a safe ``build``), the undo copy an in-place ``load`` keeps, the CRC
pass. None of it holds Python's lock (``preadv``, ISA-L's CRC and torch's copies release it), so
copies of different tensors run on a few worker threads, each reading whole tensors. Tensors that
share memory are written by one thread, in the plan's order, so the result is the same as one
thread's; a tensor a reader builds in memory is copied on the calling thread.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .._crc import crc32
from ..dtypes import itemsize
from ..lazy import CRC_CHUNK, MappedFile, Record, buffer_of, crc_error, locate

__all__ = ["Streamer", "worker_count"]

# Bytes per piece when a tensor is streamed through a staging buffer (a cast, a GPU).
_CHUNK_BYTES = 64 << 20
# Small copies are handed to the workers in batches of about this many bytes (one task each).
_BATCH_BYTES = 8 << 20
_MAX_WORKERS = 4


def worker_count() -> int:
    """Threads a load reads with: the CPUs this process may use, at most :data:`_MAX_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_WORKERS))


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


class _Batch:
    """Copies handed to one worker together, run in order; the storages they write."""

    __slots__ = ("jobs", "storages", "nbytes", "after")

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], None], int]] = []
        self.storages: set[int] = set()
        self.nbytes = 0
        self.after: list[Future] = []  # earlier batches writing the same memory


class Streamer:
    """Copies checkpoint tensors into model tensors, reading the file itself where it can.

    A source that views a memory-mapped file is not copied through the mapping (that would
    leave the mapping's pages resident: twice the model in RAM) but read with ``pread``:
    straight into the destination's memory when dtype and layout match, otherwise in pieces
    of :data:`_CHUNK_BYTES` through a staging buffer (one per thread) that is cast-copied into
    place. Copies into CPU memory run on :func:`worker_count` threads; ``before`` (the undo copy
    of a tensor written in place) runs on the same thread just before its copy. For a CUDA
    destination the staging buffers are pinned, two of them alternate, and the host to device
    copies run on a side stream, so reading the next piece overlaps sending the last.

    Call :meth:`finish` before using the destinations: it waits for every copy and raises the
    first one's error, in the order the copies were asked for. ``on_done(nbytes)`` is called on
    the calling thread as copies complete (a progress bar).
    """

    def __init__(self, workers: int | None = None, on_done: Callable[[int], None] | None = None) -> None:
        self._local = threading.local()  # each thread's CPU staging buffer
        self._cuda: dict[torch.device, tuple[Any, list[torch.Tensor], list[Any]]] = {}
        self._turn = 0
        self._workers = worker_count() if workers is None else max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        self._batch = _Batch()
        self._submitted: list[tuple[Future, int]] = []  # (batch, bytes), in order; reported up to _reported
        self._reported = 0
        self._last: dict[int, Future] = {}  # storage -> the last batch writing it
        self.on_done = on_done

    # ----------------------------------------------------------------------------- scheduling

    def copy(self, dst: torch.Tensor, src: torch.Tensor, loc: tuple[MappedFile, int, int] | None = None,
             record: Record | None = None, tensor: str | None = None, *,
             before: Callable[[], None] | None = None) -> None:
        """``dst.copy_(src)`` (with the same dtype conversion), reading ``src``'s bytes from its file.

        ``loc`` is ``locate(src)`` when the caller has it already. With ``record`` (the file
        record ``src`` spans exactly), the CRC-32 of the bytes is computed as they are read,
        piece by piece while they are in the CPU cache, and compared. The copy may run later on
        a worker thread (see the class); its error, if any, is raised by :meth:`finish`.

        Raises:
            CorruptCheckpoint: the bytes read do not match ``record``'s CRC-32 (naming it and
                ``tensor``); ``dst`` is then partly written (the caller restores it).
        """
        if loc is None:
            loc = locate(src)
        nbytes = dst.numel() * dst.element_size()
        if dst.device.type == "cuda" or loc is None:
            storage = dst.untyped_storage().data_ptr() if dst.device.type == "cpu" else None
            self._inline(lambda: self._copy(dst, src, loc, record, tensor, before), storage, nbytes)
            return
        _bump_version(dst)  # an in-place write autograd must know about, as copy_ would
        self.run(lambda: self._copy(dst, src, loc, record, tensor, before), dst.untyped_storage().data_ptr(), nbytes)

    def run(self, job: Callable[[], None], storage: int | None, nbytes: int) -> None:
        """Run ``job`` (which writes the memory of ``storage``, or none) on a worker, in its turn."""
        if self._workers == 1:
            self._inline(job, storage, nbytes)
            return
        b = self._batch
        if storage is not None and storage not in b.storages:
            prev = self._last.get(storage)
            if prev is not None:
                b.after.append(prev)
            b.storages.add(storage)
        b.jobs.append((job, nbytes))
        b.nbytes += nbytes
        if b.nbytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        b = self._batch
        if not b.jobs:
            return
        self._batch = _Batch()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckptfit-read")
        fut = self._pool.submit(_run_batch, b)
        for s in b.storages:
            self._last[s] = fut
        self._submitted.append((fut, b.nbytes))
        self._report(block=False)

    def _inline(self, job: Callable[[], None], storage: int | None, nbytes: int) -> None:
        """Run ``job`` on this thread, once earlier copies into the same memory have finished."""
        self._flush()
        prev = self._last.get(storage) if storage is not None else None
        if prev is not None:
            prev.result()
        job()
        self._done(nbytes)

    def _done(self, nbytes: int) -> None:
        if self.on_done is not None and nbytes:
            self.on_done(nbytes)

    def _report(self, block: bool) -> None:
        """Tell ``on_done`` about finished batches, in order (waiting for each when ``block``)."""
        while self._reported < len(self._submitted):
            fut, nbytes = self._submitted[self._reported]
            if not block and not fut.done():
                return
            fut.result()  # raises the batch's error
            self._reported += 1
            self._done(nbytes)

    def wait(self) -> None:
        """Wait for every job asked for so far; raises the first one's error (the threads stay)."""
        self._flush()
        self._report(block=True)

    def finish(self, cancel: bool = False) -> None:
        """Wait for every copy and release the threads and staging buffers.

        Raises the first failed copy's error (in the order they were asked for); copies not yet
        started are then skipped. With ``cancel`` (the load is failing already) copies not yet
        started are dropped and errors are not raised: the caller's own error is the one to see.
        """
        error: BaseException | None = None
        try:
            if cancel:
                self._batch = _Batch()
            else:
                self._flush()
                try:
                    self._report(block=True)
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the threads stop
                    error = e
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=error is not None or cancel)
                self._pool = None
            for stream, _bufs, _events in self._cuda.values():
                stream.synchronize()
            self._cuda.clear()
            self._local = threading.local()
            self._submitted.clear()
            self._last.clear()
        if error is not None:
            raise error

    # ----------------------------------------------------------------------------- copying

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, loc: tuple[MappedFile, int, int] | None,
              record: Record | None, tensor: str | None, before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
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
            stage = None
        else:
            stage, _ = self._cpu_stage(per * size)
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
                    buf = stage[: k * size]  # type: ignore[index]
                crc = _read_checked(mfile, offset + start * size, buffer_of(buf), check, crc)
                flat[start:start + k].copy_(buf.view(src_dtype), non_blocking=cuda)
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events[j] = ev
        return crc

    def _cpu_stage(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """This thread's CPU staging buffer (at least ``nbytes``) and a byte view of it, made once and kept."""
        local = self._local
        stage = getattr(local, "stage", None)
        if stage is None or stage.numel() < nbytes:
            local.stage = stage = torch.empty(nbytes, dtype=torch.uint8)
            local.view = buffer_of(stage)
        return stage, local.view

    def _cuda_state(self, device: torch.device, nbytes: int) -> tuple[Any, list[torch.Tensor], list[Any]]:
        state = self._cuda.get(device)
        if state is None or state[1][0].numel() < nbytes:
            if state is not None:
                state[0].synchronize()
            stream = torch.cuda.Stream(device=device)
            bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            state = self._cuda[device] = (stream, bufs, [None, None])
        return state


def _run_batch(b: _Batch) -> None:
    for fut in b.after:  # earlier batches (ahead in the queue) writing the same memory
        fut.result()
    with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach this one
        for job, _n in b.jobs:
            job()
