"""Loading into sharded models on many ranks: FSDP2 (``fully_shard``), DTensor parameters, DDP.

:func:`ckptfit.load` comes here by itself when the model is sharded (it holds DTensors or is an
``FSDPModule``) or wrapped in ``DistributedDataParallel`` inside an initialised process group.
Every rank then does what one process would do, from the same global names, shapes and
dtypes, so the container chosen, the renames, the shape rules and the report are those of a
single process; only the bytes differ:

- a DTensor target gets just its local shard: the block of the global tensor this rank holds
  is computed from the placements, and only that block is read (:meth:`LazyTensor.load_slice`:
  a view of the memory-mapped file for safetensors, torch zip and legacy files; for a DCP
  directory only the overlapping chunks, whatever the number of ranks that saved it, so
  N ranks -> M ranks resharding needs nothing more);
- a plain target (DDP's parameters, FSDP2's buffers) is read whole, as in one process.

Errors never leave ranks waiting for each other: opening, planning and reading happen before
any collective, and then every rank tells the others (one ``all_gather_object``) whether it
succeeded. If any rank failed, every rank raises — the failing rank its own error, the others
a :class:`~ckptfit.errors.LoadError` naming that rank — and no model was changed.

Every rank of the default process group must call :func:`ckptfit.load` (as with
``torch.distributed.checkpoint.load``). Every rank returns the report of the same global plan
(so rank 0's report is the job's report); ``device``, ``seconds`` and ``bytes_read`` in it are
that rank's own.

Placements: ``Shard`` and ``Replicate`` are read as blocks. Other sharding placements (such as
the strided sharding of FSDP2 over tensor parallelism) are read whole on each rank and cut
locally by DTensor; ``Partial`` targets are refused.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..errors import LoadError
from ..lazy import LazyTensor
from ..report import LoadReport
from .planning import Source, Target, as_checkpoint, load_error, plan_checkpoint
from .ties import check_ties

__all__ = ["is_sharded", "load_sharded", "local_block"]


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`ckptfit.load` must coordinate ranks for ``model``.

    True inside an initialised process group when the model holds DTensor parameters or
    buffers, is sharded with FSDP2's ``fully_shard``, or contains a ``DistributedDataParallel``.
    """
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()  # type: ignore[assignment,misc]  # noqa: N806
    for m in model.modules():
        if isinstance(m, DistributedDataParallel | FSDPModule):
            return True
        for t in (*m._parameters.values(), *m._buffers.values()):
            if isinstance(t, DTensor):
                return True
    return False


def local_block(t: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the global tensor held by this rank's shard of the DTensor ``t``.

    ``None`` when the shard is not one block (placements other than ``Shard``/``Replicate``),
    in which case the caller must read the whole tensor.

    Example:
        >>> # on rank 1 of 2, a [7, 5] parameter sharded on dim 0 by fully_shard:
        >>> local_block(model[0].weight)                       # doctest: +SKIP
        (slice(4, 7, None), slice(0, 5, None))
    """
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) in (Shard, Replicate) for p in t.placements):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - private API moved: read whole, still correct
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if len(offset) != len(shape) or tuple(shape) != tuple(t.to_local().shape):
        return None
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


class _Read:
    """One planned load on this rank: where it goes, and the piece read for it."""

    __slots__ = ("key", "dst", "piece", "whole")

    def __init__(self, key: str, dst: torch.Tensor, piece: torch.Tensor, whole: bool):
        self.key, self.dst, self.piece, self.whole = key, dst, piece, whole


def _check_target(target: Target, keys: list[str], device: Any, dtype: torch.dtype | None) -> list[str]:
    """Problems that stop a sharded load before anything is read (the same on every rank)."""
    from torch.distributed.tensor import DTensor, Partial

    problems = []
    for key in keys:
        t = target.tensors[key]
        local = t.to_local() if isinstance(t, DTensor) else t
        if isinstance(t, DTensor) and any(isinstance(p, Partial) for p in t.placements):
            problems.append(f"{key}: placement {t.placements} is Partial: its value is a sum over ranks, so no "
                            f"part of the checkpoint belongs to one rank; redistribute it to Shard or Replicate "
                            f"first")
        if local.is_meta:
            problems.append(f"{key}: the shard is on the meta device; call model.to_empty(device=...) after "
                            f"sharding, then load")
        if device is not None and torch.device(device).type != local.device.type:
            problems.append(f"{key}: device={device!r} but the shard lives on {local.device}; a sharded model "
                            f"is placed by its DeviceMesh, so pass device=None")
        if dtype is not None and local.is_floating_point() and local.dtype != dtype:
            problems.append(f"{key}: dtype={dtype} but the model holds {local.dtype}; cast the model before "
                            f"sharding it, then load with dtype=None")
    return problems


def _read_local(target: Target, cand: Any, p: Any) -> tuple[list[_Read], int]:
    """Read what this rank needs for every planned load: its block of DTensors, plain tensors whole."""
    from torch.distributed.tensor import DTensor

    reads: list[_Read] = []
    nbytes = 0
    for d in p.loads:
        if d.source is None:
            continue
        lazy: LazyTensor = cand.tensors[d.source]
        dst = target.tensors[d.target]
        block = local_block(dst) if isinstance(dst, DTensor) else None
        if block is not None:
            piece = lazy.load_slice(block)
            reads.append(_Read(d.target, dst, piece, whole=False))
            nbytes += piece.numel() * piece.element_size()
        else:
            reads.append(_Read(d.target, dst, lazy.load(), whole=True))
            nbytes += lazy.nbytes
    return reads, nbytes


def _agree(error: BaseException | None, *, path: str | None, what: str) -> None:
    """Tell every rank whether each succeeded; raise on every rank if any failed."""
    dist = torch.distributed
    world = dist.get_world_size()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, message = failed[0]
    others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise LoadError(f"rank {rank} of {world}{others} failed {what}, so this rank raises too:\n  {message}",
                    path=path, problems=tuple(m for _r, m in failed),
                    hint=f"see the error raised on rank {rank}")


def load_sharded(model: nn.Module, source: Source, *, partial: bool = False, use: str | None = None,
                 rename: Any = None, include: Any = None, exclude: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None, trust: bool = False) -> LoadReport:
    """:func:`ckptfit.load` for a sharded or DDP-wrapped model; call it on every rank.

    Takes the arguments of :func:`ckptfit.load` (``device`` and ``dtype`` must be left out or
    match the model: a sharded model is placed and cast before it is sharded). Each rank reads
    only the shards it holds; all ranks raise together if any rank cannot load, and then no
    rank's model was changed.

    Returns:
        The :class:`LoadReport` of the global plan, the same on every rank except ``device``,
        ``seconds`` and ``bytes_read`` (this rank's tensor bytes).

    Raises:
        LoadError: on every rank, when the plan is refused or any rank failed to read.
        CheckpointError: on the rank whose read failed (the others get a LoadError naming it).

    Example:
        >>> fully_shard(model)                                     # doctest: +SKIP
        >>> report = ckptfit.load(model, "model.safetensors")      # on every rank  # doctest: +SKIP
        >>> if dist.get_rank() == 0: print(report)                 # doctest: +SKIP
    """
    start = time.perf_counter()
    ckpt = None
    opened = False
    error: BaseException | None = None
    p = None
    reads: list[_Read] = []
    nbytes = 0
    try:
        try:
            ckpt, opened = as_checkpoint(source, trust)
            target = Target(model)
            cand, p = plan_checkpoint(target, ckpt, partial=partial, use=use, rename=rename, include=include,
                            exclude=exclude)
            if not p.ok:
                raise load_error(p, model)
            ported = [d.target for d in p.loads if d.transform is not None]
            if ported:  # the sharded reads copy stored bytes as they are (ckptfit.porting: not here)
                raise LoadError(f"the checkpoint needs transposed, split or joined tensors ('{ported[0]}' and "
                                f"{len(ported) - 1} more), which a sharded load does not do; load into the "
                                f"unsharded model, save it, then shard", path=ckpt.path, plan=p)
            own = [d.target for d in p.loads if d.source is None]
            if own:  # computed by a module's own _load_from_state_dict or hook (ckptfit.hooks): not here
                raise LoadError(f"'{own[0]}' (and {len(own) - 1} more) is made by a module's own load logic, "
                                f"which a sharded load does not run; load into the unsharded model, save it, "
                                f"then shard", path=ckpt.path, plan=p)
            check_ties(cand, p, lambda k: target.tensors[k].dtype, verify=True,  # a tied weight's own file tensor
                       is_parameter=lambda k: k not in target.owner or target.owner[k][2], sharded=True)
            problems = _check_target(target, [d.target for d in p.loads if d.source is not None], device, dtype)
            if problems:
                raise LoadError(f"cannot load into the sharded {type(model).__name__}: {len(problems)} "
                                f"problem(s); the model was not changed\n  " + "\n  ".join(problems),
                                path=ckpt.path, problems=tuple(problems), plan=p)
            reads, nbytes = _read_local(target, cand, p)
        except Exception as e:  # shared with the other ranks, then re-raised
            error = e
        path = ckpt.path if ckpt is not None else None
        _agree(error, path=path, what="to open, plan or read the checkpoint")
        error = None
        try:
            _write(reads)
        except Exception as e:
            error = e
        _agree(error, path=path, what="while copying into its shards (other ranks' models may have changed)")
    finally:
        reads.clear()
        if opened and ckpt is not None:
            ckpt.close()
    return LoadReport.from_plan(p, device=_device_of(model), seconds=time.perf_counter() - start,
                                bytes_read=nbytes)


def _write(reads: list[_Read]) -> None:
    """Copy every piece into its shard (or whole tensor), in place: identities, FSDP2 storage kept."""
    from torch.distributed.tensor import DTensor, Replicate

    with torch.no_grad():
        for r in reads:
            dst = r.dst
            piece = r.piece
            if isinstance(dst, DTensor):
                if r.whole:  # not one block: let DTensor cut the local shard from the whole tensor
                    mesh = dst.device_mesh
                    full = DTensor.from_local(piece.to(dst.to_local().device), mesh, [Replicate()] * mesh.ndim,
                                              run_check=False)
                    piece = full.redistribute(mesh, dst.placements).to_local()
                dst = dst.to_local()
            if piece.dtype.is_floating_point != dst.dtype.is_floating_point and not dst.dtype.is_floating_point:
                piece = piece.to(dst.dtype)
            dst.copy_(piece)


def _device_of(model: nn.Module) -> str | None:
    from torch.distributed.tensor import DTensor

    for t in (*model.parameters(), *model.buffers()):
        return str(t.to_local().device if isinstance(t, DTensor) else t.device)
    return None
