"""From a source and a model to a plan: the model's tensors (:class:`Target`), the state dict
chosen in the file, the plan for it (matching, the modules' own load hooks, porting) and the
error a refused plan raises."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

import torch
from torch import nn

from .._gc import gc_paused
from ..advice import refine
from ..checkpoint import Checkpoint, StateDictCandidate, as_checkpoint
from ..errors import LoadError
from ..hooks import ModuleHooks, custom_modules, discover
from ..layouts import layouts_of, recorded_layouts
from ..matching import match
from ..plans import Plan, TensorSpec
from ..porting import port
from ..provenance import source_aware, source_model_option
from ..refusal import refusal_error
from .options import check_options

__all__ = ["Source", "Target", "as_checkpoint", "device_of", "load_error", "plan", "plan_checkpoint"]

#: What the verbs take as a checkpoint: a path (file or folder; also ``hf://``, ``https://``,
#: ``s3://``, ``gs://``), an opened :class:`~ckptfit.Checkpoint`, a state dict, or a module (its state dict).
Source: TypeAlias = str | os.PathLike[str] | Checkpoint | Mapping[str, torch.Tensor] | nn.Module


class Target:
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


def device_of(model: nn.Module) -> str | None:
    for t in model.parameters():
        return str(t.device)
    for t in model.buffers():
        return str(t.device)
    return None


def _specs_of(cand: StateDictCandidate) -> list[TensorSpec]:
    return [TensorSpec(k, t.shape, t.dtype) for k, t in cand.tensors.items()]


def _plan_for(target: Target, cand: StateDictCandidate, *, partial: bool, rename, include, exclude,
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


def _plan_renamed(target: Target, cand: StateDictCandidate, renamed: StateDictCandidate, opts: dict,
                  recorded: dict) -> Plan:
    """The plan for ``cand``'s tensors under the names the source model gave them, with the layer
    types it declares (``recorded``; ckptfit.provenance). Modules' own load logic is learned under
    those names: only renames and post-hooks may remain."""
    p = _plan_for(target, renamed, **dict(opts, recorded={**(opts.get("recorded") or {}), **recorded}))
    if renamed is cand:
        return p
    entry = target.hooks.pop(id(renamed), None)
    if entry is not None and entry[1].own_loads:
        return replace(p, problems=p.problems + ("a module's own _load_from_state_dict must run on the file's "
                                                 "tensors, which a port by the source model does not do",))
    if p.ok:
        target.hooks.pop(id(cand), None)  # the hooks learned for the names the file has do not apply
    return p


def _choose(target: Target, ckpt: Checkpoint, *, use: str | None, partial: bool, rename, include,
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
    if not choice.ambiguous:  # the model that wrote the file says which is which (ckptfit.provenance)
        p = source_aware(target.model, ckpt, c, p, lambda cand, rec: _plan_renamed(target, c, cand, opts, rec))
    if choice.ambiguous:
        p = replace(p, problems=p.problems + (choice.ambiguity,),
                    suggestions=(choice.hint,) + p.suggestions)
    return c, p, choice.reason


def plan(model: nn.Module, source: Source, *, partial: bool = False, use: str | None = None,
         rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, device: Any = None, dtype: torch.dtype | None = None,
         trust: bool = False, transforms: Mapping[str, str] | None = None,
         adapt: str | None = None, sha256: str | None = None, source_model: Any = None,
         class_map: Any = None, class_map_head: str | None = None) -> Plan:
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
    o = check_options(model, source, partial, use, rename, include, exclude, device, dtype, trust, transforms, adapt,
                      class_map, class_map_head)
    with gc_paused(), source_model_option(source_model):  # ckptfit.provenance
        ckpt, opened = as_checkpoint(source, trust, sha256)
        try:
            return plan_checkpoint(Target(model), ckpt, partial=partial, use=use, rename=o["rename"], include=o["include"],
                         exclude=o["exclude"], transforms=o["transforms"])[1]
        finally:
            if opened:
                ckpt.close()


def plan_checkpoint(target: Target, ckpt: Checkpoint, **opts) -> tuple[StateDictCandidate, Plan]:
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
    return cand, refine(p)  # only suggestions that can help (ckptfit.advice)


def load_error(p: Plan, model: nn.Module) -> LoadError:
    """The error a refused plan raises: the refusal once, the suggestions last (:func:`~ckptfit.refusal.refusal_error`)."""
    return refusal_error(p)
