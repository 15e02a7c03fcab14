"""The verbs: :func:`open`, :func:`load` (plan, then apply all or nothing) and :func:`build`."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._gc import gc_paused
from ..advice import advise_constructor
from ..checkpoint import Checkpoint, StateDictCandidate
from ..errors import LoadError
from ..formats import open_checkpoint
from ..hooks import metadata_of, run_after_load
from ..lazy import checking_reads
from ..plans import Plan
from ..report import LoadReport
from ..specs import bounded_by_file, model_factory
from .copying import Rollback, apply_plan
from .distributed import is_sharded, load_sharded
from .materialising import ZERO_COPY
from .meta import parameters_on_meta
from ..provenance import source_model_option
from .options import check_options
from .planning import Source, Target, as_checkpoint, device_of, load_error, plan_checkpoint

__all__ = ["open", "load", "build"]


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


def _after_apply(target: Target, cand: StateDictCandidate, p: Plan, ckpt: Checkpoint) -> None:
    """What ``load_state_dict`` does after the copy: modules' own loads, load post-hooks (ckptfit.hooks)."""
    if not target.custom:
        return
    entry = target.hooks.get(id(cand))
    hooks = entry[1] if entry is not None and entry[0] is cand else None
    run_after_load(target.model, hooks, cand.tensors, p, metadata_of(ckpt.tree, cand.name))


def load(model: nn.Module, source: Source, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False, transforms: Mapping[str, str] | None = None,
         adapt: str | None = None, verify: bool = True, sha256: str | None = None,
         source_model: Any = None, freeze: bool = False, class_map: Any = None,
         class_map_head: str | None = None, atomic: bool = True) -> LoadReport:
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
        exclude: glob patterns; matching tensors are not loaded (kept at init). Of two tied weights
            (one tensor in the model), one excluded is filled through the other when that one loads.
        device: move the model to this device and load there (default: where it is).
        dtype: cast the model's floating tensors to this dtype (default: keep the model's).
        trust: allow real unpickling; runs code from the file. Never needed for weights.
        sha256: check the file's sha256 (64 hex digits, or a Git LFS pointer file) before
            anything is read; a mismatch raises :class:`CorruptCheckpoint` with both digests.
        transforms: ``{pattern: kind}`` for layouts the evidence cannot settle: ``"transpose"``,
            ``"none"`` (as stored), ``"split:N"``; see :mod:`ckptfit.transform_rules` and docs/porting.md.
        source_model: the implementation that wrote the file, when names cannot settle a port
            (a model SPEC, a factory, an nn.Module or ``"identify"``); a Hugging Face folder's
            ``config.json`` names it by itself. See :mod:`ckptfit.provenance`.
        adapt: ``"in_chans"``: load an RGB first convolution into a model with other input channels
            (summed for 1, repeated and rescaled for more), as timm's ``adapt_input_conv``; reported.
        class_map: a classifier head for other classes keeps the file's rows of the classes both
            have: a list with the file's class index (or ``None``, a new class at init) for each
            model class, or a dict ``{model class: file class}``; see :mod:`ckptfit._class_map`.
        class_map_head: the head module's name (``"fc"``) when its shape does not tell.
        verify: check the CRC-32 of every record read (torch zip archives and DCP; fused with the
            copy, about one more pass at memory speed). ``False`` only for a file you verified yourself.
        atomic: all or nothing (the default): a load that fails part way (an I/O error, an interrupt)
            leaves the model exactly as it was, because each tensor overwritten in place is first
            copied aside, which costs memory the size of what is overwritten (refused up front with a
            :class:`LoadError` when the machine does not have it). ``False`` writes in place without
            that copy (peak memory: the model's own): every byte is still checked before the model
            changes, but a failure while writing leaves the model partly loaded; the error then says
            so in a note. Same speed as reading into the model's memory by hand.
        freeze: set ``requires_grad=False`` on exactly the parameters that were loaded (transfer
            learning: train only the new layers); ``report.frozen`` lists them. A head whose new
            classes' rows are at init (``class_map=``) stays trainable. To do it by hand, use
            ``report.loaded_keys``.

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
    o = check_options(model, source, partial, use, rename, include, exclude, device, dtype, trust, transforms, adapt,
                      class_map, class_map_head)
    rename, include, exclude, device, dtype = o["rename"], o["include"], o["exclude"], o["device"], o["dtype"]
    if not isinstance(verify, bool):
        raise TypeError(f"verify= must be True or False, not {verify!r}")
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze= must be True or False, not {freeze!r}")
    if not isinstance(atomic, bool):
        raise TypeError(f"atomic= must be True or False, not {atomic!r}")
    if is_sharded(model):  # FSDP2 / DTensor / DDP in a process group: each rank reads its shards only
        if o["transforms"]:
            raise ValueError(f"{o['transforms'][0].text.partition('=')[0]}= is not supported for a sharded model; "
                             "port the weights into the "
                             "unsharded model first, then save and shard it")
        if sha256 is not None:  # checked (and, for a URL, fetched) before any rank reads
            open(source, trust=trust, sha256=sha256).close()
        with checking_reads(verify):
            report = load_sharded(model, source, partial=partial, use=use, rename=rename, include=include,
                                  exclude=exclude, device=device, dtype=dtype, trust=trust)
    else:
        with gc_paused(), checking_reads(verify), source_model_option(source_model):  # ckptfit.provenance
            report = _load(model, source, partial=partial, use=use, rename=rename, include=include,
                           exclude=exclude, device=device, dtype=dtype, trust=trust, transforms=o["transforms"],
                           verify=verify, sha256=sha256, atomic=atomic)
    return _freeze(model, report) if freeze else report


def _freeze(model: nn.Module, report: LoadReport) -> LoadReport:
    """``requires_grad=False`` on the loaded parameters (ties included); the report lists them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # a head whose new classes' rows are at init (class_map=) is trained, not frozen
    fresh = {d.target for d in report.loaded if d.transform is not None and None in d.transform.rows}
    fresh |= {d.target for d in report.tied if d.tied_to in fresh}  # the same tensor under its tied name
    frozen = tuple(k for k in report.loaded_keys if k in params and k not in fresh)
    for k in frozen:
        params[k].requires_grad_(False)
    return replace(report, frozen=frozen)


def _load(model: nn.Module, source: Source, *, partial: bool, use: str | None, rename, include, exclude, device: Any,
          dtype: torch.dtype | None, trust: bool, transforms=(), verify: bool = True,
          sha256: str | None = None, atomic: bool = True) -> LoadReport:
    start = time.perf_counter()
    ckpt, opened = as_checkpoint(source, trust, sha256)
    try:
        target = Target(model)
        cand, p = plan_checkpoint(target, ckpt, partial=partial, use=use, rename=rename, include=include, exclude=exclude,
                        transforms=transforms)
        if not p.ok:
            raise load_error(p, model)
        # an I/O error or a CRC mismatch from here on leaves the model as it was (atomic=False: its values aside)
        rollback = Rollback(model, keep_values=atomic)
        try:
            if device is not None or dtype is not None:
                _move_model(model, device, dtype)
                target = Target(model)
            nbytes, checked = apply_plan(target, cand, p, device=device, dtype=dtype, verify=verify, rollback=rollback)
            _after_apply(target, cand, p, ckpt)  # the modules' own load logic (ckptfit.hooks)
        except BaseException as e:
            rollback.restore()
            if not rollback.keep_values and rollback.written:  # atomic=False: nothing undid the writes
                e.add_note(f"ckptfit: load(atomic=False) failed after writing {rollback.written} of the model's "
                           f"tensors in place: the model is partly loaded (its other tensors kept their values); "
                           f"load it again, or make it anew")
            raise
        dev = str(device) if device is not None else device_of(model)
        return LoadReport.from_plan(p, device=dev, dtype=dtype, seconds=time.perf_counter() - start,
                                    bytes_read=nbytes, integrity=checked)
    finally:
        if opened:
            ckpt.close()


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


def build(factory: Callable[..., nn.Module] | str, source: Source, *, mmap: bool = False, train: bool = False,
          model_kwargs: Mapping[str, Any] | None = None, **load_options: Any) -> tuple[nn.Module, LoadReport]:
    """Construct a model without random init and fill it straight from the checkpoint.

    The model is built with its parameters on the meta device (no memory, no init; buffers
    computed in ``__init__`` are real), then each parameter is materialised from the
    checkpoint: read with ``pread`` into the model's own private memory (CRC-checked as it
    is read, cast or sent to the GPU on the way where needed), so the built model's values
    never change and the process never crashes whatever later happens to the file (a
    training job rewriting ``last.pth`` in place, a truncation). Parameters the checkpoint
    lacks (``partial=True``) get their module's own ``reset_parameters`` init. The model comes
    back in eval mode, as Hugging Face's ``from_pretrained`` returns it (``train=True`` keeps
    training mode); ``report.mode`` says which.

    Args:
        factory: a callable returning the model, or a model SPEC string
            (``"torchvision:resnet18"``, ``"timm:resnet50"``, ``"package.module:factory"``).
        source: as for :func:`load`.
        model_kwargs: keyword arguments for the factory (``{"num_classes": 10}``). When the
            file's shapes are those of the model built with other arguments, the refusal
            advises them (verified by building the model with them first).
        mmap: zero-copy: where dtype and device already match, a parameter *is* a
            copy-on-write view of the memory-mapped file (no copy, no memory until used).
            Risk: if the file is later rewritten in place the model's weights change with it,
            and if it is truncated the process dies with SIGBUS when they are used.
        train: return the model in training mode (``model.train()``) instead of eval mode.
        **load_options: as for :func:`load` (``partial``, ``use``, ``rename``, ``device``, ``dtype``,
            ``verify``, ``freeze`` ...).

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
    if not isinstance(train, bool):
        raise TypeError(f"train= must be True or False, not {train!r}")
    if isinstance(factory, nn.Module):
        raise TypeError(f"build() takes a factory that makes the model (e.g. {type(factory).__name__} or "
                        f"lambda: {type(factory).__name__}(...)), not a model; to fill an existing model use "
                        f"ckptfit.load(model, source)")
    if not isinstance(factory, str) and not callable(factory):
        raise TypeError(f"factory must be a zero-argument callable or a model SPEC string, not "
                        f"{type(factory).__name__}")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs= must be a dict of keyword arguments, not {type(model_kwargs).__name__}")
    kwargs = dict(model_kwargs or {})
    spec = None
    if isinstance(factory, str):
        spec = factory
        factory = model_factory(spec, kwargs)
        make: Callable[[dict[str, Any]], nn.Module] = lambda kw: model_factory(spec, kw)()  # noqa: E731
        builder = getattr(factory, "ckptfit_builder", None)
    else:
        make, builder = (lambda kw: factory(**kw)), factory  # noqa: E731
    from .._lightning import build_lightning, lightning_target

    if (lit := lightning_target(factory)) is not None:  # a LightningModule class: the file's hyper_parameters
        return build_lightning(lit[0], {**lit[1], **kwargs}, source, build, mmap=mmap, train=train, **load_options)
    if getattr(factory, "ckptfit_config_dir", None) is not None:  # hf:DIR: bounded by the file (ckptfit.specs)
        if not isinstance(source, Checkpoint):  # opened once, here, for its size
            ckpt, opened = as_checkpoint(source, load_options.get("trust", False), load_options.pop("sha256", None))
            try:
                return build(factory if spec is None else spec, ckpt, mmap=mmap, train=train,
                             model_kwargs=model_kwargs, **load_options)
            finally:
                if opened:
                    ckpt.close()
        make = bounded_by_file(factory, make, source)
    with gc_paused():  # the model's modules are as long-lived as the checkpoint's objects (see _gc)
        with parameters_on_meta():
            model = make(kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"build's factory must return an nn.Module, not {type(model).__name__}")
        token = ZERO_COPY.set(mmap)
        try:
            report = load(model, source, **load_options)
        except LoadError as e:
            if not isinstance(e.plan, Plan):
                raise
            # shapes one constructor argument away: advise it, verified on meta (ckptfit.advice)
            advised = advise_constructor(e.plan, make, kwargs, source, load_options, builder=builder)
            if advised is e.plan:
                raise
            raise load_error(advised, model) from None
        finally:
            ZERO_COPY.reset(token)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LoadError(f"after loading, {len(leftover)} tensor(s) are still on the meta device: "
                        f"{', '.join(leftover[:5])}", hint="pass partial=True or check the checkpoint")
    model.train(train)  # eval mode unless asked, as from_pretrained
    return model, replace(report, mode="train" if train else "eval")
