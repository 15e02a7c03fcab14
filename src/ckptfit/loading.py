"""The loader: choose the container, plan, then apply the plan to a module, all or nothing.

:func:`plan` decides everything from names, shapes and dtypes (no tensor bytes read).
:func:`load` applies a plan: every source tensor is first obtained as a view of the
memory-mapped file (so a failure leaves the model untouched), then copied into the model's
own tensors in place (parameter identity, ``requires_grad`` and device kept), or into new
private tensors for parameters that live on the meta device (:func:`build`; zero-copy views
of the file only with ``build(mmap=True)``). Every zip record read is CRC-32 checked, fused
with the copy, and a failure part way (I/O error, CRC mismatch) is rolled back (:class:`_Rollback`).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._gc import gc_paused
from .checkpoint import Checkpoint, StateDictCandidate
from .dtypes import CAST_DTYPES
from .errors import CheckpointError, LoadError
from .formats import open_checkpoint
from ._progress import progress
from ._crc import crc32
from .lazy import (CRC_CHUNK, LazyTensor, MappedFile, Record, _itemsize, buffer_of, checking_reads,
                   collecting_reads, crc_error, locate)
from .matching import match
from .hooks import ModuleHooks, custom_modules, discover, metadata_of, run_after_load
from .plan import Plan, TensorSpec
from .porting import apply_transform, layouts_of, parse_rules, port, recorded_layouts
from .report import LoadReport

__all__ = ["open", "plan", "load", "build", "Source"]

Source = "str | os.PathLike[str] | Checkpoint | Mapping[str, torch.Tensor]"


def open(source: str | os.PathLike[str], *, trust: bool = False,  # noqa: A001 - public verb
         sha256: str | None = None) -> Checkpoint:
    """Open a checkpoint file or directory lazily; no tensor bytes are read.

    The format is recognised by content, not by extension: torch zip archives (``.pt``,
    ``.pth``, ``.ckpt``, ``.bin``), legacy torch files, safetensors, TorchScript archives,
    Hugging Face folders (sharded or not) and torch.distributed checkpoint folders.

    Args:
        source: path to the file or directory; also ``hf://org/name[@revision][/subfolder]``,
            ``https://...``, ``s3://...``, ``gs://...`` (see :mod:`ckptfit.sources`).
        trust: allow real unpickling (runs code from the file). Only for files you made.
        sha256: check the file's sha256 before reading it: 64 hex digits, or the path of a Git
            LFS pointer file (its digest and size). A mismatch raises :class:`CorruptCheckpoint`.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        NotACheckpoint: the input is not a checkpoint (empty, HTML page, LFS pointer ...).
        CorruptCheckpoint: truncated or damaged.
        UnsafeCheckpoint: its pickles reference code that would run.

    Example:
        >>> ckpt = ckptfit.open("resnet18.pth")                  # doctest: +SKIP
        >>> ckpt.format, ckpt.num_tensors                        # doctest: +SKIP
        ('torch-zip', 122)
    """
    return open_checkpoint(source, trust=trust, sha256=sha256)


def _as_checkpoint(source: Any, trust: bool, sha256: str | None = None) -> tuple[Checkpoint, bool]:
    """(checkpoint, opened_here)."""
    if isinstance(source, Checkpoint):
        return source, False
    if isinstance(source, str | os.PathLike):
        return open_checkpoint(source, trust=trust, sha256=sha256), True
    if sha256 is not None:
        raise TypeError("sha256= checks a file; pass the path (not an opened checkpoint or a state dict)")
    if isinstance(source, Mapping):
        from .formats.torch_zip import wrap_real

        return Checkpoint(path="<state dict>", format="in-memory", tree=wrap_real(dict(source))), False
    if isinstance(source, nn.Module):
        return Checkpoint(path=f"<{type(source).__name__}>", format="in-memory",
                          tree={k: LazyTensor.of(v) for k, v in source.state_dict().items()}), False
    raise TypeError(f"source must be a path, a Checkpoint or a state dict, not {type(source).__name__}")


# ---------------------------------------------------------------------------------- target

class _Target:
    """The model's tensors: specs in state_dict order, ties, owners."""

    def __init__(self, model: nn.Module):
        self.model = model
        sd = model.state_dict(keep_vars=True)
        self.tensors: dict[str, torch.Tensor] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in self.tensors.items()]
        self.tied: dict[str, str] = {}
        first: dict[int, str] = {}
        for k, v in self.tensors.items():
            if id(v) in first:
                self.tied[k] = first[id(v)]
            else:
                first[id(v)] = k
        self.owner: dict[str, tuple[nn.Module, str, bool]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mname}." if mname else ""
            for pname, p in mod._parameters.items():
                if p is not None:
                    self.owner.setdefault(prefix + pname, (mod, pname, True))
            for bname, b in mod._buffers.items():
                if b is not None:
                    self.owner.setdefault(prefix + bname, (mod, bname, False))
        # modules with load-time logic of their own (ckptfit.hooks), and what it does per candidate
        self.custom = custom_modules(model)
        self.hooks: dict[int, tuple[StateDictCandidate, ModuleHooks]] = {}


# ---------------------------------------------------------------------------------- options

def _patterns(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]  # one pattern, not its characters
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name}= must be a glob pattern or a list of them, not {type(value).__name__}") from None
    if not all(isinstance(x, str) for x in items):
        raise TypeError(f"{name}= must hold glob pattern strings, e.g. {name}=['fc.*']")
    return items or None


def _rules(value: Any) -> list[tuple[str, str]] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, str) for x in value):
        items = [value]  # one (regex, replacement) pair
    else:
        try:
            items = [tuple(x) for x in value]
        except TypeError:
            raise TypeError("rename= must be a list of (regex, replacement) pairs, "
                            "e.g. rename=[(r'^backbone\\.', '')]") from None
    out = []
    for item in items:
        if len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise TypeError(f"rename= entry {item!r} is not a (regex, replacement) pair of strings")
        try:
            re.compile(item[0])
        except re.error as e:
            raise ValueError(f"rename= regex {item[0]!r} is not a valid regular expression: {e}") from None
        out.append((item[0], item[1]))
    return out or None


def _dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key not in CAST_DTYPES:
            raise ValueError(f"dtype={value!r} is not a dtype ckptfit casts to; use torch.float32, torch.float16 "
                             f"or torch.bfloat16 (or 'fp32', 'fp16', 'bf16')")
        value = CAST_DTYPES[key]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={value!r}: only floating dtypes can be cast to (float32, float16, bfloat16); "
                         f"integer buffers always keep their own dtype")
    return value


def _check_device(value: Any) -> torch.device | None:
    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={value!r} is not a device; use e.g. 'cpu', 'cuda' or 'cuda:1'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={value!r}, but this machine has no usable CUDA GPU "
                         f"(torch.cuda.is_available() is False); leave device= out to load on the CPU")
    return dev


def _check_model(model: Any, source: Any) -> None:
    if isinstance(model, nn.Module):
        return
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise TypeError(f"model must be an nn.Module instance, not the class {model.__name__}; "
                        f"did you mean {model.__name__}()? (or ckptfit.build({model.__name__}, path) to build it)")
    if isinstance(source, nn.Module):
        raise TypeError("the arguments are the other way round: ckptfit.load(model, source)")
    raise TypeError(f"model must be an nn.Module instance, not {type(model).__name__}")


def _options(model: Any, source: Any, partial: Any, use: Any, rename: Any, include: Any, exclude: Any,
             device: Any, dtype: Any, trust: Any, transforms: Any = None, adapt: Any = None) -> dict[str, Any]:
    """Check and normalise the user's options before any work (a wrong one fails early, clearly)."""
    _check_model(model, source)
    for name, flag in (("partial", partial), ("trust", trust)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}= must be True or False, not {flag!r}")
    if use is not None and not isinstance(use, str):
        raise TypeError(f"use= must be a name such as 'ema' or 'teacher', or a key path such as 'model.ema' "
                        f"(or 'model/ema'), not {type(use).__name__}")
    return dict(partial=partial, use=use, rename=_rules(rename), include=_patterns(include, "include"),
                exclude=_patterns(exclude, "exclude"), device=_check_device(device), dtype=_dtype(dtype), trust=trust,
                transforms=parse_rules(transforms, adapt))


# ---------------------------------------------------------------------------------- plan

def _specs_of(cand: StateDictCandidate) -> list[TensorSpec]:
    return [TensorSpec(k, t.shape, t.dtype) for k, t in cand.tensors.items()]


def _plan_for(target: _Target, cand: StateDictCandidate, *, partial: bool, rename, include, exclude,
              transforms=(), recorded=None) -> Plan:
    specs = _specs_of(cand)
    hooks = discover(target.custom, specs) if target.custom else None  # the modules' own load hooks
    if hooks:
        specs = hooks.specs(specs)  # the names those hooks give the file's tensors
    p = match(target.specs, specs, partial=partial, rename=rename, include=include, exclude=exclude,
              tied=target.tied)
    rec = {k: recorded[id(t)] for k, t in cand.tensors.items() if id(t) in recorded} if recorded else None
    if hooks and rec:
        rec = {hooks.name(k): v for k, v in rec.items()}
    p = port(p, layouts_of(target.model), specs, transforms, rec)  # transposed / fused weights (ckptfit.porting)
    if hooks:
        target.hooks[id(cand)] = (cand, hooks)
        p = hooks.restore(p)  # back to the file's names, each hook's work named
    return p


def _after_apply(target: _Target, cand: StateDictCandidate, p: Plan, ckpt: Checkpoint) -> None:
    """What ``load_state_dict`` does after the copy: modules' own loads, load post-hooks (ckptfit.hooks)."""
    if not target.custom:
        return
    entry = target.hooks.get(id(cand))
    hooks = entry[1] if entry is not None and entry[0] is cand else None
    run_after_load(target.model, hooks, cand.tensors, p, metadata_of(ckpt.tree, cand.name))


def _choose(target: _Target, ckpt: Checkpoint, *, use: str | None, partial: bool, rename, include,
            exclude, transforms=()) -> tuple[StateDictCandidate, Plan, str]:
    """The state dict to load (:meth:`Checkpoint.choose`, fitting each candidate to the model) and its plan.

    Two complete, equally plausible state dicts (``{"student": sd, "teacher": sd}``) give a plan
    that is refused, listing them and the ``use=`` that picks one.
    """
    opts = dict(partial=partial, rename=rename, include=include, exclude=exclude, transforms=transforms,
                recorded=recorded_layouts(ckpt.tree))  # layer classes a pickled whole model records (porting)
    plans: dict[int, Plan] = {}

    def plan_of(c: StateDictCandidate) -> Plan:
        if id(c) not in plans:
            plans[id(c)] = _plan_for(target, c, **opts)
        return plans[id(c)]

    def fit(c: StateDictCandidate) -> tuple[bool, int]:
        p = plan_of(c)
        return p.ok, len(p.loads)

    choice = ckpt.choose(use, fit=fit)
    c = choice.candidate
    p = plans.get(id(c)) or _plan_for(target, c, **opts)
    if choice.ambiguous:
        p = replace(p, problems=p.problems + (choice.ambiguity,),
                    suggestions=(choice.hint,) + p.suggestions)
    return c, p, choice.reason


def plan(model: nn.Module, source: Any, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False, transforms: Mapping[str, str] | None = None,
         adapt: str | None = None, sha256: str | None = None) -> Plan:
    """Decide what :func:`load` would do, from names, shapes and dtypes only (a dry run).

    Takes the same arguments as :func:`load`; reads no tensor bytes and changes nothing.

    Returns:
        The :class:`Plan`; ``plan.ok`` tells whether :func:`load` would succeed, and
        ``plan.problems`` / ``plan.suggestions`` say why not and what to do.

    Example:
        >>> p = ckptfit.plan(model, "dp_model.pth")              # doctest: +SKIP
        >>> p.ok, p.transforms                                    # doctest: +SKIP
        (True, ("strip 'module.'",))
    """
    o = _options(model, source, partial, use, rename, include, exclude, device, dtype, trust, transforms, adapt)
    with gc_paused():
        ckpt, opened = _as_checkpoint(source, trust, sha256)
        try:
            return _plan(_Target(model), ckpt, partial=partial, use=use, rename=o["rename"], include=o["include"],
                         exclude=o["exclude"], transforms=o["transforms"])[1]
        finally:
            if opened:
                ckpt.close()


def _plan(target: _Target, ckpt: Checkpoint, **opts) -> tuple[StateDictCandidate, Plan]:
    cand, p, why = _choose(target, ckpt, **opts)
    extra: dict[str, Any] = {}
    if p.decisions and not p.loads and not p.by_action("tied"):
        # Even with partial=True or filters, a load that loads nothing is never what was meant.
        extra["problems"] = p.problems + (
            f"nothing would be loaded: none of the model's {len(p.decisions)} tensors comes from "
            f"{cand.label} (is this the right model and file?)",)
        if opts.get("include") or opts.get("exclude"):
            extra["suggestions"] = p.suggestions + ("check the include=/exclude= patterns against "
                                                    "`ckptfit inspect` of the file",)
    p = replace(p, container=cand.name, containers=tuple(c.name for c in ckpt.state_dicts()),
                container_reason=why, format=ckpt.format, path=ckpt.path, **extra)
    return cand, p


# ---------------------------------------------------------------------------------- load

def load(model: nn.Module, source: Any, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False, transforms: Mapping[str, str] | None = None,
         adapt: str | None = None, verify: bool = True, sha256: str | None = None) -> LoadReport:
    """Put a checkpoint into ``model`` in place, loading only what provably belongs, and report it.

    The state dict inside the file is found (the model's own weights over EMA and optimizer
    state), names are reconciled (``module.``, ``_orig_mod.``, ``model.`` ... prefixes learned
    from both key sets, your ``rename`` rules, structural alignment when names differ
    entirely), and shapes are checked: a tensor whose shape differs is never loaded. Unless
    ``partial=True``, every model tensor must come from the checkpoint (harmless differences
    such as a missing ``num_batches_tracked`` or a tied ``lm_head.weight`` aside); otherwise
    one :class:`LoadError` lists every problem and the model is left untouched.

    Args:
        model: the module to fill (in place, like ``load_state_dict``).
        source: a path (file or directory), an opened :class:`Checkpoint`, or a state dict.
        partial: allow model tensors to stay at their init (transfer learning: new head).
        use: which state dict in the file: ``"ema"``, or a key path such as ``"model.ema"``.
        rename: ``[(regex, replacement), ...]`` applied to checkpoint keys before matching.
        include: glob patterns; only matching tensors are loaded.
        exclude: glob patterns; matching tensors are not loaded (kept at init).
        device: move the model to this device and load there (default: where it is).
        dtype: cast the model's floating tensors to this dtype (default: keep the model's).
        trust: allow real unpickling; runs code from the file. Never needed for weights.
        sha256: check the file's sha256 (64 hex digits, or a Git LFS pointer file) before
            anything is read; a mismatch raises :class:`CorruptCheckpoint` with both digests.
        transforms: ``{pattern: kind}`` for layouts the evidence cannot settle: ``"transpose"``,
            ``"none"`` (as stored), ``"split:N"``; see :mod:`ckptfit.porting` and docs/porting.md.
        adapt: ``"in_chans"``: load an RGB first convolution into a model with other input channels
            (summed for 1, repeated and rescaled for more), as timm's ``adapt_input_conv``; reported.
        verify: check the CRC-32 of every record read (torch zip archives and DCP; fused with the
            copy, about one more pass at memory speed). ``False`` only for a file you verified yourself.

    Returns:
        A :class:`LoadReport`; ``print(report)`` for a summary (its ``bytes:`` line says whether
        the bytes were checked).

    Raises:
        LoadError: names or shapes do not reconcile (all problems listed, model untouched).
        CorruptCheckpoint: damaged bytes (a CRC mismatch, naming the record and the tensor) or
            an unreadable file; the model is left exactly as it was, also when this happens
            part way through the copy (as does any I/O error).
        CheckpointError: the file cannot be read (see :func:`open`).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)  # doctest: +SKIP
        >>> report = ckptfit.load(model, "resnet18_imagenet.pth", partial=True)  # doctest: +SKIP
        >>> print(report)                                         # doctest: +SKIP
        Loaded 120/122 tensors from resnet18_imagenet.pth (torch-zip, state dict at the root)
          on cpu, 44.7 MB read, in 0.02 s
          left at init, shape differs (2):
            fc.weight — checkpoint [1000, 512], model [10, 512]
            fc.bias — checkpoint [1000], model [10]
    """
    from .distributed import is_sharded, load_sharded

    o = _options(model, source, partial, use, rename, include, exclude, device, dtype, trust, transforms, adapt)
    rename, include, exclude, device, dtype = o["rename"], o["include"], o["exclude"], o["device"], o["dtype"]
    if not isinstance(verify, bool):
        raise TypeError(f"verify= must be True or False, not {verify!r}")
    if is_sharded(model):  # FSDP2 / DTensor / DDP in a process group: each rank reads its shards only
        if o["transforms"]:
            raise ValueError("transforms= is not supported for a sharded model; port the weights into the "
                             "unsharded model first, then save and shard it")
        if sha256 is not None:  # checked (and, for a URL, fetched) before any rank reads
            open(source, trust=trust, sha256=sha256).close()
        with checking_reads(verify):
            return load_sharded(model, source, partial=partial, use=use, rename=rename, include=include,
                                exclude=exclude, device=device, dtype=dtype, trust=trust)
    with gc_paused(), checking_reads(verify):
        return _load(model, source, partial=partial, use=use, rename=rename, include=include, exclude=exclude,
                     device=device, dtype=dtype, trust=trust, transforms=o["transforms"], verify=verify,
                     sha256=sha256)


def _load(model: nn.Module, source: Any, *, partial: bool, use: str | None, rename, include, exclude, device: Any,
          dtype: torch.dtype | None, trust: bool, transforms=(), verify: bool = True,
          sha256: str | None = None) -> LoadReport:
    start = time.perf_counter()
    ckpt, opened = _as_checkpoint(source, trust, sha256)
    try:
        target = _Target(model)
        cand, p = _plan(target, ckpt, partial=partial, use=use, rename=rename, include=include, exclude=exclude,
                        transforms=transforms)
        if not p.ok:
            raise _load_error(p, model)
        rollback = _Rollback(model)  # an I/O error or a CRC mismatch from here on leaves the model as it was
        try:
            if device is not None or dtype is not None:
                _move_model(model, device, dtype)
                target = _Target(model)
            nbytes, checked = _apply(target, cand, p, device=device, dtype=dtype, verify=verify, rollback=rollback)
            _after_apply(target, cand, p, ckpt)  # the modules' own load logic (ckptfit.hooks)
        except BaseException:
            rollback.restore()
            raise
        dev = str(device) if device is not None else _device_of(model)
        return LoadReport.from_plan(p, device=dev, dtype=dtype, seconds=time.perf_counter() - start,
                                    bytes_read=nbytes, integrity=checked)
    finally:
        if opened:
            ckpt.close()


def _device_of(model: nn.Module) -> str | None:
    for t in model.parameters():
        return str(t.device)
    for t in model.buffers():
        return str(t.device)
    return None


def _move_model(model: nn.Module, device: Any, dtype: torch.dtype | None) -> None:
    """Move and cast the model's real tensors for ``load(device=, dtype=)``.

    Parameters keep their identity (``param.data`` is replaced, as ``Module.to`` does), so an
    optimizer made before the load still holds them. In a model built on the meta device
    (:func:`build`) only the real tensors (buffers computed in ``__init__``) move here; meta
    tensors are placed on ``device`` as they are assigned.
    """
    if device is None and dtype is None:
        return
    has_meta = any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())
    if not has_meta:
        model.to(device=device, dtype=dtype)
        return
    dev = torch.device(device) if device is not None else None
    moved: dict[int, torch.Tensor] = {}  # tied buffers stay tied
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is None or t.is_meta:
                    continue
                if id(t) in moved:
                    store[name] = moved[id(t)]
                    continue
                want = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
                new = t.data.to(device=dev if dev is not None else t.device, dtype=want)
                if new is t.data:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = new
                else:
                    store[name] = moved[id(t)] = new


def _load_error(p: Plan, model: nn.Module) -> LoadError:
    from .report import render_plan

    name = type(model).__name__
    head = f"Error(s) in loading the checkpoint into {name}: {len(p.problems)} problem(s); the model was not changed"
    body = render_plan(p)
    # the suggestions are in the body already; the hint only points further
    hint = None if p.suggestions else "run `ckptfit plan` to see every decision"
    return LoadError(f"{head}\n{body}", path=p.path, hint=hint, problems=p.problems, plan=p)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------- apply

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


class _Streamer:
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
        size = _itemsize(src_dtype)
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


def _holders(target: _Target) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """``id(tensor) -> every (module, name, is_parameter) holding it`` (ties: several)."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for k, (mod, name, is_param) in target.owner.items():
        t = target.tensors.get(k)
        if t is not None:
            out.setdefault(id(t), []).append((mod, name, is_param))
    return out


def _file_order(item: tuple) -> tuple:
    loc = item[3]
    return (0, loc[0].path, loc[1]) if loc is not None else (1, "", 0)


# Set by build(mmap=True): parameters may be views of the memory-mapped file instead of copies.
_ZERO_COPY: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptfit_zero_copy", default=False)

_NO_CHECKSUM = {"safetensors": "safetensors has no checksum", "torch-legacy": "legacy torch files have no checksum"}


class _Checks:
    """The CRC-32 checks of one load: each record read is checked once, with its copy where possible.

    A record read whole by exactly one copy (a stored tensor, the common case) is hashed as the
    copy reads it (:class:`_Streamer`). Any other record a reader handed out (a tensor that
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


class _Rollback:
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


def _apply(target: _Target, cand: StateDictCandidate, p: Plan, *, device: Any = None,
           dtype: torch.dtype | None = None, verify: bool = True,
           rollback: _Rollback | None = None) -> tuple[int, str | None]:
    """Copy or assign every planned tensor. Returns (bytes read from the checkpoint, the ``bytes:`` line).

    First every source is read once (so a damaged file fails before the model changes): a
    view of a memory-mapped file costs no memory and is kept; a tensor a reader had to build
    in memory (a DCP tensor gathered from chunks, an inflated zip member) is dropped and read
    again in its turn, so at most one of those exists at a time. Records that no single copy
    reads whole are CRC-checked now (:class:`_Checks`). Then, in file order, each source is
    copied into its model tensor (:class:`_Streamer`, which checks the CRC-32 of each record
    as it reads it) or, for a model tensor on the meta device, assigned (:func:`_assign`). A
    failure at any point (I/O error, CRC mismatch) raises with ``rollback`` able to undo every
    change: tensors overwritten in place are kept (:meth:`_Rollback.keep`) before they are.
    """
    work: list[tuple[str, LazyTensor, torch.Tensor | None, tuple[MappedFile, int, int] | None, Record | None]] = []
    nbytes = 0
    checks = _Checks(verify)
    pending = []
    with collecting_reads() as reads:
        for d in p.loads:
            if d.source is None:
                continue
            lazy = cand.tensors[d.source]
            first = len(reads)
            if d.transform is not None:  # transposed, split or joined: made in memory now, copied in its turn
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
    dev = _device(device)
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    if any(v.is_meta for v in target.tensors.values()):
        _materialize_unloaded(target, {w[0] for w in work}, device, dtype, rollback)
        holders = _holders(target)
    work.sort(key=_file_order)  # sequential reads; stable, so ties keep the plan's order
    streamer = _Streamer()
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
                if dst.is_meta:
                    _assign(target, key, dst, src, loc, holders, streamer, shared, dev, dtype, record)
                else:
                    if rollback is not None:
                        rollback.keep(dst)
                    streamer.copy(dst, src, loc, record, key)
                bar.advance(src.numel() * src.element_size())
    finally:
        streamer.finish()
    return nbytes, checks.summary(p.format)


def _device(device: Any) -> torch.device:
    """Where meta tensors are materialised: ``device``, else the CPU (a bare ``cuda`` gets its index)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _zero_copy_ok(src: torch.Tensor) -> bool:
    """A tensor a parameter may alias: no element is stored twice (an expanded view is not)."""
    if src.is_contiguous():
        return True
    for n, st in zip(src.shape, src.stride()):
        if st == 0 and n > 1:
            return False
    return True


def _assign(target: _Target, key: str, dst: torch.Tensor, src: torch.Tensor, loc: tuple[MappedFile, int, int] | None,
            holders: Mapping[int, list[tuple[nn.Module, str, bool]]], streamer: _Streamer, shared: dict[int, int],
            dev: torch.device, dtype: torch.dtype | None, record: Record | None = None) -> None:
    """Replace a meta tensor by the loaded one, in every module holding it (ties stay tied).

    By default the new tensor is private memory of the model's dtype (or ``dtype``) on
    ``device``, read from the file (CRC-checked against ``record`` as it is read): nothing done
    to the file later can change it. Where dtype and device already match, the new tensor *is*
    the source for a state dict in memory (the caller's tensor, as
    ``load_state_dict(assign=True)``), and, under ``build(mmap=True)``, for a file too: a
    copy-on-write view of the memory-mapped file.
    """
    _mod, _name, is_param = target.owner[key]
    want = dtype if dtype is not None and (dst.is_floating_point() or dst.is_complex()) else dst.dtype
    reuse = (src.device == dev and src.dtype == want and _zero_copy_ok(src)
             and (loc is None or _ZERO_COPY.get())  # a view of the file only when asked for
             and shared.get(src.data_ptr(), id(dst)) == id(dst))  # two untied tensors never share memory
    if reuse:
        if record is not None and loc is not None:
            loc[0].check_record(record, tensor=key)  # nothing copies it: read it once to check it
        value = src
        if src.numel():
            shared[src.data_ptr()] = id(dst)
    else:
        value = torch.empty(tuple(dst.shape), dtype=want, device=dev)
        streamer.copy(value, src, loc, record, key)
    if is_param:
        cls = type(dst) if isinstance(dst, nn.Parameter) else nn.Parameter
        new: torch.Tensor = cls(value, requires_grad=dst.requires_grad)
    else:
        new = value
    for mod, name, isp in holders.get(id(dst)) or [target.owner[key]]:
        (mod._parameters if isp else mod._buffers)[name] = new


def _materialize_unloaded(target: _Target, loaded: Collection[str], device: Any = None,
                          dtype: torch.dtype | None = None, rollback: _Rollback | None = None) -> None:
    """Give meta tensors that nothing loads real memory and their modules' own init.

    Every meta tensor of a module that holds an unloaded one is made real (on ``device``, in
    the model's dtype or ``dtype``) in every module holding it, so ties stay tied; then the
    module is initialised as its authors wrote it: ``reset_parameters`` (or
    ``_reset_parameters``), else the model's ``_init_weights(module)`` (Hugging Face), else
    the value ``__init__`` gave a small parameter (kept by :func:`_parameters_on_meta`), else
    zeros. Tensors of those modules that the checkpoint does fill are then copied into.
    """
    loaded_ids = {id(target.tensors[k]) for k in loaded}
    pending = {id(t) for t in target.tensors.values() if t.is_meta and id(t) not in loaded_ids}
    if not pending:
        return
    model = target.model
    all_modules = list(model.modules())
    modules = [m for m in all_modules
               if any(t is not None and id(t) in pending for t in (*m._parameters.values(), *m._buffers.values()))]
    if not modules:
        return
    dev = _device(device)
    made: dict[int, torch.Tensor] = {}
    inits: dict[int, torch.Tensor] = {}
    for mod in modules:
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is None or not t.is_meta or id(t) in made:
                    continue
                want = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
                data = torch.empty(tuple(t.shape), dtype=want, device=dev)
                made[id(t)] = type(t)(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                init = getattr(t, _INIT_ATTR, None)
                if init is not None:
                    inits[id(made[id(t)])] = init
    for mod in all_modules:  # every holder, including modules that only share a tied tensor
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in made:
                    store[name] = made[id(t)]
    made_ids = {id(v) for v in made.values()}
    with _no_grad():
        if rollback is not None:  # an init may also reset the module's real tensors (BatchNorm's running stats)
            for mod in modules:
                for t in (*mod._parameters.values(), *mod._buffers.values()):
                    if t is not None and id(t) not in made_ids:
                        rollback.keep(t)
        for mod in modules:
            reset = getattr(mod, "reset_parameters", None)
            if not callable(reset):
                reset = getattr(mod, "_reset_parameters", None)
            init_weights = getattr(model, "_init_weights", None)
            if callable(reset):
                reset()
            elif callable(init_weights) and mod is not model:
                init_weights(mod)
            else:
                for store in (mod._parameters, mod._buffers):
                    for t in store.values():
                        if t is None or id(t) not in made_ids:
                            continue
                        init = inits.get(id(t))
                        if init is not None:
                            t.copy_(init)
                        elif t.is_floating_point() or t.is_complex():
                            t.zero_()
    # refresh the targets that were meta so the copy pass sees the real tensors
    fresh = _Target(model)
    target.tensors.update({k: v for k, v in fresh.tensors.items() if k in target.tensors and target.tensors[k].is_meta})


# ---------------------------------------------------------------------------------- build

# The value ``__init__`` gave a small parameter before it was moved to the meta device is kept
# on the meta parameter (attribute below), for modules without ``reset_parameters`` (a custom
# norm's ``ones``) that a partial load leaves at init. Large ones are not kept: they would cost
# the memory build() saves.
_INIT_ATTR = "_ckptfit_init_value"
_INIT_MAX_NUMEL = 1 << 16
_INIT_MAX_TOTAL = 1 << 24  # elements kept per build, at most


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no random init); buffers stay real.

    Buffers are often computed in ``__init__`` (position ids, rotary frequencies) and are not
    always in a checkpoint, so they are built for real; they are small. Small parameters keep
    the value ``__init__`` gave them on the side, for a partial load to fall back on. Meanwhile
    ``torch.nn.init``'s in-place initialisers return at once when handed a meta tensor, which
    they could not fill anyway (``reset_parameters`` of every layer calls them).

    Only the calling thread is affected: parameters move to meta through torch's parameter
    registration hook, which does nothing outside a thread inside this context, and init is
    skipped by a :class:`~torch.overrides.TorchFunctionMode`, which is per thread. Nothing of
    ``torch`` is patched, so another thread building modules meanwhile gets real, initialised
    parameters, and two threads may build at once.
    """
    _install_registration_hook()
    outer = getattr(_BUILDING, "kept", None)
    if outer is None:
        _BUILDING.kept = [0]  # elements kept so far, shared by nested uses
    try:
        with _SkipInitOnMeta():
            yield
    finally:
        if outer is None:
            _BUILDING.kept = None


_BUILDING = threading.local()  # .kept is set while this thread builds on meta (see _parameters_on_meta)
_HOOK_LOCK = threading.Lock()
_hook_installed = False


def _install_registration_hook() -> None:
    """Register :func:`_parameter_to_meta` with torch once; it stays, and acts only in a building thread.

    Installed once and never removed: removing a global hook while another thread iterates
    torch's hook table would break that thread's ``register_parameter``.
    """
    global _hook_installed
    if _hook_installed:
        return
    with _HOOK_LOCK:
        if not _hook_installed:
            from torch.nn.modules.module import register_module_parameter_registration_hook

            register_module_parameter_registration_hook(_parameter_to_meta)
            _hook_installed = True


def _parameter_to_meta(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
    """In a thread inside :func:`_parameters_on_meta`: the meta twin of ``param`` (else None: unchanged)."""
    kept = getattr(_BUILDING, "kept", None)
    if kept is None or param is None or param.is_meta:
        return None
    with torch._C.DisableTorchFunction():  # plain tensor work: past _SkipInitOnMeta, at full speed
        cls = type(param) if isinstance(param, nn.Parameter) else nn.Parameter
        meta = cls(param.detach().to("meta"), requires_grad=param.requires_grad)
        n = param.numel()
        if (n <= _INIT_MAX_NUMEL and kept[0] + n <= _INIT_MAX_TOTAL and param.device.type == "cpu"
                and not callable(getattr(module, "reset_parameters", None))
                and not callable(getattr(module, "_reset_parameters", None))):
            setattr(meta, _INIT_ATTR, param.detach().clone())
            kept[0] += n
    return meta


# ``torch.nn.init`` functions that fill a tensor in place. On a meta parameter (every parameter
# registered under _parameters_on_meta) they compute nothing, yet go through torch's Python
# decompositions: ~20 us each, half the time of building a model of 10,000 small layers.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


class _SkipInitOnMeta(TorchFunctionMode):
    """``torch.nn.init``'s in-place initialisers return a plain meta tensor as it is (no values to fill).

    A torch function mode is active in the thread that entered it only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inits = {fn for fn in (getattr(nn.init, n, None) for n in _INIT_FUNCTIONS) if callable(fn)}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._inits:
            t = args[0] if args else kwargs.get("tensor")
            if type(t) in (torch.Tensor, nn.Parameter) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build(factory: Callable[[], nn.Module] | str, source: Any, *, mmap: bool = False,
          **load_options: Any) -> tuple[nn.Module, LoadReport]:
    """Construct a model without random init and fill it straight from the checkpoint.

    The model is built with its parameters on the meta device (no memory, no init; buffers
    computed in ``__init__`` are real), then each parameter is materialised from the
    checkpoint: read with ``pread`` into the model's own private memory (CRC-checked as it
    is read, cast or sent to the GPU on the way where needed), so the built model's values
    never change and the process never crashes whatever later happens to the file (a
    training job rewriting ``last.pth`` in place, a truncation). Parameters the checkpoint
    lacks (``partial=True``) get their module's own ``reset_parameters`` init.

    Args:
        factory: a zero-argument callable returning the model, or a model SPEC string
            (``"torchvision:resnet18"``, ``"timm:resnet50"``, ``"package.module:factory"``).
        source: as for :func:`load`.
        mmap: zero-copy: where dtype and device already match, a parameter *is* a
            copy-on-write view of the memory-mapped file (no copy, no memory until used).
            Risk: if the file is later rewritten in place the model's weights change with it,
            and if it is truncated the process dies with SIGBUS when they are used.
        **load_options: as for :func:`load` (``partial``, ``use``, ``rename``, ``device``, ``dtype``,
            ``verify`` ...).

    Returns:
        ``(model, report)``.

    Raises:
        LoadError: the checkpoint does not fill the model (nothing is returned half-built).

    Example:
        >>> model, report = ckptfit.build(lambda: torchvision.models.resnet50(), "r50.safetensors")  # doctest: +SKIP
        >>> model, report = ckptfit.build("torchvision:resnet50", "r50.pth", device="cuda")  # doctest: +SKIP
        >>> model, report = ckptfit.build("torchvision:resnet50", "r50.pth", mmap=True)  # doctest: +SKIP
    """
    if not isinstance(mmap, bool):
        raise TypeError(f"mmap= must be True or False, not {mmap!r}")
    if isinstance(factory, nn.Module):
        raise TypeError(f"build() takes a factory that makes the model (e.g. {type(factory).__name__} or "
                        f"lambda: {type(factory).__name__}(...)), not a model; to fill an existing model use "
                        f"ckptfit.load(model, source)")
    if not isinstance(factory, str) and not callable(factory):
        raise TypeError(f"factory must be a zero-argument callable or a model SPEC string, not "
                        f"{type(factory).__name__}")
    if isinstance(factory, str):
        from .specs import model_factory

        factory = model_factory(factory)
    from ._lightning import build_lightning, lightning_target

    if (lit := lightning_target(factory)) is not None:  # a LightningModule class: the file's hyper_parameters
        return build_lightning(*lit, source, build, mmap=mmap, **load_options)
    with gc_paused():  # the model's modules are as long-lived as the checkpoint's objects (see _gc)
        with _parameters_on_meta():
            model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"build's factory must return an nn.Module, not {type(model).__name__}")
        token = _ZERO_COPY.set(mmap)
        try:
            report = load(model, source, **load_options)
        finally:
            _ZERO_COPY.reset(token)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LoadError(f"after loading, {len(leftover)} tensor(s) are still on the meta device: "
                        f"{', '.join(leftover[:5])}", hint="pass partial=True or check the checkpoint")
    return model, report
