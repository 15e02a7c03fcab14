"""Tied weights whose file holds a tensor of their own: checked equal before the model changes.

A model that ties ``head.weight`` to ``emb.weight`` holds one tensor for both. A file saved from
a model *without* that tie holds two, and when their values differ no load can be exact: one of
them would be lost while the report claimed success. The plan names the file's own tensor for
such a tied weight (:class:`~ckptfit.plans.Decision` ``source`` of a ``tied`` decision, see
:mod:`ckptfit.matching.decisions`); :func:`check_ties` compares it bitwise with the tensor the tie
is filled from, each as it would enter the model (the plan's transform applied, cast to the
model's dtype), and refuses, model unchanged, when they differ. A file written by a tied model
through a writer that duplicated the tensor (``safetensors`` ``save_file`` of cloned tensors)
passes: the two are equal.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch

from .._class_map import pick_rows
from ..checkpoint import StateDictCandidate
from ..lazy import collecting_reads
from ..plans import Decision, Plan
from ..refusal import refusal_error
from ..transforms import apply_transform

__all__ = ["check_ties"]

_GLOB_FREE = re.compile(r"[\w.\-]+")  # a key that is its own exclude= pattern (no glob or shell characters)
_ATTR_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_ties(cand: StateDictCandidate, p: Plan, dtype_of: Callable[[str], torch.dtype], *,
               verify: bool = True, is_parameter: Callable[[str], bool] = lambda key: True,
               sharded: bool = False) -> None:
    """Refuse (a :class:`~ckptfit.errors.LoadError`) when a tied weight's own file tensor differs
    from the one the tie is filled from; nothing is changed, whatever happens.

    Args:
        cand: the state dict being loaded.
        p: its plan.
        dtype_of: the dtype a model key takes (the model's, or ``load(dtype=)``'s).
        verify: on a difference, check the CRC-32 of the records read first, so damaged bytes are
            a :class:`~ckptfit.errors.CorruptCheckpoint`, not a disagreement.
        is_parameter: whether a model key is a parameter (for the advice's example code).
        sharded: the model is sharded or wrapped (FSDP2, DDP): a tie is undone before that, in the
            plain model, so the advice says so.
    """
    checks = [d for d in p.by_action("tied") if d.source is not None]
    if not checks:
        return
    by_target = {d.target: d for d in p.decisions}
    problems: list[str] = []
    suggestions: list[str] = []
    refused: dict[str, Decision] = {}  # tied decisions that cannot be exact, as the refusal shows them
    for d in checks:
        c = by_target.get(d.tied_to or "")
        if c is not None and c.transform is not None and c.transform.kind == "class_map" and c.source is not None:
            rows = c.transform.rows or ()
            with collecting_reads() as reads:
                through, own = cand.tensors[c.source].load(), cand.tensors[d.source].load()
            want = dtype_of(d.target)
            if tuple(through.shape) == tuple(own.shape):  # the rows the map selects, from each file tensor
                a = pick_rows(through.detach(), rows).to("cpu", want)
                b = pick_rows(own.detach(), rows).to("cpu", want)
                if _bitwise_equal(a, b):
                    continue
                if verify:
                    for m, r in reads:
                        m.check_record(r, tensor=d.source)
                why = (f"tied to '{c.target}' (one tensor), whose rows are chosen by class_map, but the checkpoint's "
                       f"own '{d.source}' and '{c.source}' differ in the rows the map selects ({_difference(a, b)}); "
                       f"loading either would lose the other")
            else:
                why = (f"tied to '{c.target}' (one tensor), whose rows are chosen by class_map, but the checkpoint's "
                       f"own '{d.source}' has shape {list(own.shape)} and '{c.source}' {list(through.shape)}, so "
                       f"they cannot be checked against each other")
            problems.append(f"{d.target}: {why}")
            refused[d.target] = replace(d, action="missing", reason=why)
            if d.source and _GLOB_FREE.fullmatch(d.source):
                suggestions.append(f"pass exclude=[{d.source!r}] (on the command line: --exclude {d.source}) to fill "
                                   f"'{d.target}' through the tie from the rows class_map selects; the checkpoint's "
                                   f"'{d.source}' is not used")
            continue
        if c is None or c.action != "load" or c.source is None:
            own = c is not None and c.action == "load" and c.source is None  # a module's own load logic makes it
            why = (f"tied to '{d.tied_to}' (one tensor), which is "
                   + ("made by a module's own load logic" if own else "not loaded from a checkpoint tensor")
                   + f", so the checkpoint's own '{d.source}' cannot be checked against it")
            problems.append(f"{d.target}: {why}")
            refused[d.target] = replace(d, action="missing", reason=why)
            if own and c is not None:
                suggestions += _advice(d, c, is_parameter(d.target), sharded, through_own=True)
            continue
        with collecting_reads() as reads:
            through = _value(cand, c)
            own = cand.tensors[d.source].load()
        if c.transform is None and _same_memory(through, own):
            continue  # one storage behind both keys (torch.save of a tied model): equal without reading it
        want = dtype_of(d.target)
        a, b = through.detach().to("cpu", want), own.detach().to("cpu", want)
        if tuple(a.shape) == tuple(b.shape) and _bitwise_equal(a, b):
            continue
        if verify:  # damaged bytes are a damaged file, not a disagreement
            for m, r in reads:
                m.check_record(r, tensor=d.source)
        why = (f"tied to '{c.target}' (one tensor), but the checkpoint holds different values for them: "
               f"'{d.source}' and '{c.source}' differ ({_difference(a, b)}); loading either would lose the other")
        problems.append(f"{d.target}: {why}")
        refused[d.target] = replace(d, action="missing", reason=why)
        suggestions += _advice(d, c, is_parameter(d.target), sharded)
    if problems:
        decisions = tuple(refused.get(d.target, d) for d in p.decisions)
        raise refusal_error(replace(p, decisions=decisions, problems=p.problems + tuple(problems),
                                    suggestions=tuple(dict.fromkeys(suggestions)) + p.suggestions))


def _value(cand: StateDictCandidate, d: Decision) -> torch.Tensor:
    """The tensor ``d`` puts into the model, before the cast: its transform applied, if any."""
    if d.transform is not None:
        return apply_transform(d, lambda k: cand.tensors[k].load())
    return cand.tensors[d.source].load()  # type: ignore[index]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements of the same memory (two keys of one stored tensor, views of one mapping)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr() and a.numel() > 0)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes (``-0.0`` is not ``0.0``; a NaN equals the same NaN)."""
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if tuple(a.shape) != tuple(b.shape):
        return f"shapes {list(a.shape)} and {list(b.shape)}"
    ne = a.reshape(-1) != b.reshape(-1)
    n, total = int(ne.sum()), a.numel()
    text = f"{n} of {total} values"
    if (a.is_floating_point() or a.is_complex()) and n:
        diff = (a.reshape(-1)[ne].to(torch.float64) - b.reshape(-1)[ne].to(torch.float64)).abs()
        if torch.isfinite(diff).all():
            text += f", largest difference {float(diff.max()):.3g}"
    elif n == 0:  # only bit patterns differ (-0.0 against 0.0, two NaNs)
        text = "in their bit patterns only (signed zeros or NaNs)"
    return text


def _advice(d: Decision, c: Decision, is_param: bool, sharded: bool = False, through_own: bool = False) -> list[str]:
    """The options that settle it: untie the model, or load one of the two file tensors into both.

    ``through_own``: ``c`` is made by a module's own load logic, so only ``d``'s file tensor can be left out.
    """
    t, ct = d.target, c.target
    if sharded:  # untied in the plain model, before fully_shard or DDP (whose keys start with 'module.')
        t, ct = t.removeprefix("module."), ct.removeprefix("module.")
    module, _, attr = t.rpartition(".")
    make = (f"nn.Parameter(model.{ct}.detach().clone())" if is_param else f"model.{ct}.detach().clone()")
    if _ATTR_PATH.fullmatch(t) and _ATTR_PATH.fullmatch(ct):
        code = f"model.{t} = {make}"
    else:
        make = make.replace(f"model.{ct}", f"model.get_parameter({ct!r})" if is_param else f"model.get_buffer({ct!r})")
        code = f"setattr(model.get_submodule({module!r}), {attr!r}, {make})"
    if sharded:
        out = [f"untie '{t}' from '{ct}' in the model before you shard or wrap it (fully_shard, DDP), so each loads "
               f"its own checkpoint tensor: `{code}` on the plain model, then shard it and load (or build the "
               f"model without the tie)"]
    else:
        out = [f"untie '{t}' from '{ct}' in the model, so each loads its own checkpoint tensor: before loading, "
               f"`{code}` (or build the model without the tie)"]
    if through_own:
        if d.source and _GLOB_FREE.fullmatch(d.source):
            out.append(f"pass exclude=[{d.source!r}] (on the command line: --exclude {d.source}) to fill both tied "
                       f"weights with what the module's own load logic makes for '{c.target}'; the checkpoint's "
                       f"'{d.source}' is not used")
        return out
    for drop, keep in ((d.source, c.source), (c.source, d.source)):
        if drop and keep and _GLOB_FREE.fullmatch(drop):
            out.append(f"pass exclude=[{drop!r}] (on the command line: --exclude {drop}) to load the checkpoint's "
                       f"'{keep}' into both tied weights; '{drop}' is not used")
    return out
