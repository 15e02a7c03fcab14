"""The verbs: :func:`resume` (weights, optimizers, schedulers, scaler, RNG, all checked before
anything changes) and :func:`describe_resume` (what it would do, for ``ckptfit plan --resume``)."""
from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, LoadError
from ..lazy import LazyTensor
from ..loading import load, plan
from ..plans import Plan
from .optimizer import ModelParams, map_optimizer
from .parts import read_parts, real_value
from .reports import OptimizerMapping, ResumePlan, ResumeReport

__all__ = ["describe_resume", "resume"]


def _keeps_order(ckpt: Checkpoint) -> bool:
    """Whether the file lists tensors in the order they were saved (safetensors sorts them by name)."""
    if ckpt.format == "safetensors":
        return False
    if ckpt.format == "hf-folder" and os.path.isdir(ckpt.path):
        return not any(n.endswith(".safetensors") for n in os.listdir(ckpt.path))
    return True


def _plan_tensors(ckpt: Checkpoint, p: Plan) -> Mapping[str, LazyTensor]:
    """The checkpoint tensors the plan ``p`` was made from (its container), in file order."""
    try:
        return ckpt.state_dict(p.container).tensors if p.container is not None else ckpt.state_dict().tensors
    except CheckpointError as e:
        raise LoadError(f"cannot map optimizer state: the model's weights come from {p.container!r}, which ckptfit "
                        f"cannot list in file order ({e.detail})", path=ckpt.path,
                        hint="resume with use= naming the state dict itself") from e


def _as_list(x: Any, name: str, cls: type | tuple[type, ...] | None = None) -> list:
    if x is None:
        return []
    items = list(x) if isinstance(x, list | tuple) else [x]
    if cls is not None:
        for it in items:
            if not isinstance(it, cls):
                raise TypeError(f"{name}= must be a {getattr(cls, '__name__', cls)} (or a list of them), "
                                f"not {type(it).__name__}")
    return items


def _restore_rng(rng: Mapping[str, tuple[str, Any]], notes: list[str]) -> list[str]:
    """Set the generators the file saved; returns the names of those restored."""
    done = []
    for kind in ("torch", "cuda", "numpy", "python"):
        if kind not in rng:
            continue
        where, value = rng[kind]
        try:
            value = real_value(value, where)
            if kind == "torch":
                torch.set_rng_state(value)
            elif kind == "cuda":
                states = list(value) if isinstance(value, list | tuple) else [value]
                if not torch.cuda.is_available():
                    notes.append(f"{where}: CUDA RNG state not restored (no GPU here)")
                    continue
                n = min(len(states), torch.cuda.device_count())
                for i in range(n):
                    torch.cuda.set_rng_state(states[i], i)
                if n != len(states):
                    notes.append(f"{where}: {len(states)} CUDA RNG states saved, {n} GPUs here; restored {n}")
            elif kind == "numpy":
                import numpy as np

                np.random.set_state(value)
            else:
                random.setstate(_tuples(value))
        except (TypeError, ValueError, RuntimeError, LoadError) as e:
            notes.append(f"{where}: {kind} RNG state not restored ({e})")
            continue
        done.append(kind)
    return done


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list | tuple) else v


def resume(path: str | os.PathLike[str], model: nn.Module, optimizer: Any = None, scheduler: Any = None,
           scaler: Any = None, *, partial: bool = False, use: str | None = None,
           rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
           exclude: Sequence[str] | None = None, keep_hyperparams: bool = False, restore_rng: bool = True,
           trust: bool = False) -> ResumeReport:
    """Continue a training run from a checkpoint, even after the model's code changed.

    The model is loaded through the same plan as :func:`ckptfit.load` (prefixes such as
    ``module.`` and ``_orig_mod.`` reconciled, renames, shapes checked). Each saved optimizer
    state is then named by the saved model's parameter order and put onto the parameter the
    plan filled from that tensor, by identity, never by position alone; a state whose shape
    does not fit is refused. New parameters (``partial=True``) start with fresh state; states
    of parameters that no longer exist are reported. Then the LR scheduler, the AMP grad
    scaler and the RNG states are restored, and the saved epoch and step are returned.
    Everything is checked before anything changes: on a refusal nothing was modified.

    Args:
        path: the checkpoint file (tutorial dict, timm, Lightning ``.ckpt`` ...), a Hugging
            Face Trainer ``checkpoint-N`` folder or a DCP folder.
        model: the model to fill, in place.
        optimizer: the new optimizer, built over ``model``'s parameters (or a list of them,
            matched in order with the saved ones, as Lightning saves several).
        scheduler: an LR scheduler (or a list) whose state to restore; built on ``optimizer``.
        scaler: a ``torch.amp.GradScaler`` whose state to restore.
        partial: allow model tensors to stay at init (a new head); their parameters start with
            fresh optimizer state.
        use: which state dict in the file holds the model (as for :func:`ckptfit.load`).
        rename: ``[(regex, replacement), ...]`` applied to checkpoint keys (as for :func:`ckptfit.load`).
        include: glob patterns; only matching tensors are loaded.
        exclude: glob patterns; matching tensors are not loaded.
        keep_hyperparams: keep the optimizer's own param-group hyper-parameters (lr, betas,
            weight decay ...) instead of the saved ones.
        restore_rng: restore the torch, CUDA, numpy and Python RNG states the file holds.
        trust: allow real unpickling (runs code from the file). Never needed.

    Returns:
        A :class:`ResumeReport`; ``report.epoch`` and ``report.step`` are the saved counters.

    Raises:
        LoadError: the model or the optimizer state cannot be restored exactly (every problem
            listed; the model, optimizer, scheduler and scaler were not changed).
        CheckpointError: the file cannot be read.

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters())                # doctest: +SKIP
        >>> report = ckptfit.resume("ckpt.pth", model, optimizer)            # doctest: +SKIP
        >>> start_epoch = report.epoch + 1                                   # doctest: +SKIP
    """
    if isinstance(path, nn.Module) and isinstance(model, str | os.PathLike):
        raise TypeError("the arguments are the other way round: ckptfit.resume(path, model, optimizer)")
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a checkpoint file or folder, not {type(path).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module instance, not {type(model).__name__}")
    optimizers = _as_list(optimizer, "optimizer", torch.optim.Optimizer)
    schedulers = _as_list(scheduler, "scheduler")
    for s in schedulers:
        if not callable(getattr(s, "load_state_dict", None)):
            raise TypeError(f"scheduler= must be an LR scheduler, not {type(s).__name__}")
    if scaler is not None and not callable(getattr(scaler, "load_state_dict", None)):
        raise TypeError(f"scaler= must be a torch.amp.GradScaler, not {type(scaler).__name__}")
    for name, flag in (("keep_hyperparams", keep_hyperparams), ("restore_rng", restore_rng)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}= must be True or False, not {flag!r}")
    path = os.fspath(path)
    opts = dict(partial=partial, use=use, rename=rename, include=include, exclude=exclude, trust=trust)
    parts = read_parts(path, trust)
    try:
        p = plan(model, parts.model, **opts)
        if not p.ok:
            load(model, parts.model, **opts)  # raises the load's own LoadError; the model is not changed
        tensors = _plan_tensors(parts.model, p) if optimizers else {}
        m = ModelParams(model, p)
        notes: list[str] = []

        # every check first: optimizers, schedulers, scaler
        mappings: list[OptimizerMapping] = []
        to_load: list[tuple[torch.optim.Optimizer, dict, str]] = []
        if len(optimizers) > len(parts.optimizers):
            if parts.optimizers:
                raise LoadError(f"{len(optimizers)} optimizers passed, the checkpoint holds "
                                f"{len(parts.optimizers)} optimizer state(s)", path=path)
            notes.append("the checkpoint holds no optimizer state; the optimizer was left as it was")
        elif len(parts.optimizers) > len(optimizers) and optimizers:
            notes.append(f"the checkpoint holds {len(parts.optimizers)} optimizer states; restored the first "
                         f"{len(optimizers)}")
        problems: list[str] = []
        for opt, (where, saved) in zip(optimizers, parts.optimizers):
            groups = [list(g["params"]) for g in opt.param_groups]
            mapping, sd = map_optimizer(where, saved, tensors, m, groups, keep_hyperparams=keep_hyperparams,
                                         file_order=_keeps_order(parts.model),
                                         new_param_groups=opt.param_groups)
            mappings.append(mapping)
            if not mapping.ok or sd is None:
                problems += [f"optimizer {where!r}: {x}" for x in mapping.problems]
                continue
            to_load.append((opt, sd, where))
        if problems:
            raise LoadError(f"the optimizer state in {os.path.basename(path)} cannot be restored exactly: "
                            f"{len(problems)} problem(s); nothing was changed\n"
                            + "\n".join(f"  {x}" for x in problems), path=path, problems=problems, plan=p,
                            hint="build the optimizer over the same parameter groups as the saved run, or "
                                 "resume without optimizer= to start it afresh")
        real_sds = [(opt, real_value(sd, where), where) for opt, sd, where in to_load]
        sched_states: list[tuple[Any, Any, str]] = []
        if schedulers and not parts.schedulers:
            notes.append("the checkpoint holds no LR scheduler state; the scheduler was left as it was")
        for sch, (where, st) in zip(schedulers, parts.schedulers):
            st = real_value(st, where)
            base = st.get("base_lrs") if isinstance(st, dict) else None
            n = len(sch.optimizer.param_groups) if hasattr(sch, "optimizer") else None
            if isinstance(base, list) and n is not None and len(base) != n:
                raise LoadError(f"scheduler {where!r} was saved for {len(base)} parameter group(s); the optimizer "
                                f"now has {n}", path=path, hint="pass scheduler=None to start a fresh schedule")
            sched_states.append((sch, st, where))
        scaler_state = None
        if scaler is not None and parts.scaler is not None:
            scaler_state = real_value(parts.scaler[1], parts.scaler[0])

        # then change things: model, optimizers, schedulers, scaler, RNG
        report = load(model, parts.model, **opts)
        for opt, sd, _where in real_sds:
            opt.load_state_dict(sd)
        sched_lines = []
        for sch, st, where in sched_states:
            sch.load_state_dict(st)
            last = st.get("last_epoch") if isinstance(st, dict) else None
            sched_lines.append(f"{where!r}: restored ({type(sch).__name__}"
                               + (f", last_epoch {last})" if last is not None else ")"))
        scaler_line = None
        if scaler is not None:
            if scaler_state is None:
                scaler_line = "the checkpoint holds no grad scaler state; left as it was"
            elif not scaler_state:
                scaler_line = f"{parts.scaler[0]!r} is empty (saved from a disabled scaler); left as it was"
            elif not getattr(scaler, "is_enabled", lambda: True)():
                scaler_line = f"{parts.scaler[0]!r} not restored: this scaler is disabled"
            else:
                scaler.load_state_dict(scaler_state)
                scaler_line = f"{parts.scaler[0]!r} restored (scale {scaler_state.get('scale')})"
        elif parts.scaler is not None and parts.scaler[1]:
            notes.append(f"the checkpoint holds a grad scaler state ({parts.scaler[0]!r}); pass scaler= to restore it")
        rng_done = _restore_rng(parts.rng, notes) if restore_rng else []
        return ResumeReport(path=path, layout=parts.layout, model=report, optimizers=tuple(mappings),
                            schedulers=tuple(sched_lines), scaler=scaler_line, rng=tuple(rng_done),
                            epoch=parts.epoch, step=int(parts.step) if isinstance(parts.step, int | float) else None,
                            loss=float(parts.loss) if isinstance(parts.loss, int | float) else None,
                            notes=tuple(notes))
    finally:
        parts.close()


def describe_resume(model: nn.Module, path: str | os.PathLike[str], p: Plan, *, trust: bool = False) -> ResumePlan:
    """How :func:`resume` would map the optimizer states in ``path`` onto ``model``, through the plan ``p``.

    The new optimizer is not known at plan time, so the saved optimizer's own groups stand for
    it: saved ids are named by the saved model's parameter order (or the names saved with
    them) and followed through ``p`` to the model's parameters. Reads no tensor data.
    """
    parts = read_parts(os.fspath(path), trust)
    try:
        m = ModelParams(model, p)
        mappings = []
        if parts.optimizers:
            tensors = _plan_tensors(parts.model, p)
            mappings = [map_optimizer(where, saved, tensors, m, None, file_order=_keeps_order(parts.model))[0]
                        for where, saved in parts.optimizers]
        extra = [w for w, _ in parts.schedulers] + ([parts.scaler[0]] if parts.scaler else []) + \
            [w for w, _ in parts.rng.values()]
        return ResumePlan(parts.layout, tuple(mappings), tuple(extra), parts.epoch, parts.step)
    finally:
        parts.close()
