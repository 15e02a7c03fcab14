"""Advice that works: suggestions on a refused plan that, followed literally, load or say more.

The matcher (:mod:`ckptfit.matching`) suggests from names and shapes alone. Two things need
more than that, and live here:

- :func:`refine`: a suggestion is dropped when following it cannot help (``partial=True`` on a
  plan that would load nothing: it would only be refused again, "nothing would be loaded").
- :func:`advise_constructor`: when the model was built from a factory ckptfit can call again
  (a model SPEC, or ``build(factory, ..., model_kwargs=...)``), tensors of another shape are
  often one constructor argument away (``num_classes`` from the head's rows, ``in_chans`` from
  the first convolution, an int argument whose default is the model's size). Each candidate is
  built on the meta device and planned again; only one that makes the shapes fit is advised
  (``model_kwargs={'num_classes': 10}``, ``--model-arg num_classes=10``), in place of
  ``partial=True``, which would keep a random head.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .plans import Plan

__all__ = ["refine", "advise_constructor", "PLAN_OPTIONS"]

# The load options that change a plan (device, dtype, verify, mmap do not).
PLAN_OPTIONS = ("partial", "use", "rename", "include", "exclude", "trust", "transforms", "adapt", "source_model",
                "class_map", "class_map_head")

# Constructor arguments named alike across libraries, and the dimension that gives each:
# (name, tensor ranks it is read from, dimension).
_KNOWN_ARGS = (
    ("num_classes", (1, 2), 0),   # torchvision, timm: the classifier's rows
    ("num_labels", (1, 2), 0),    # transformers configs
    ("in_chans", (3, 4, 5), 1),   # timm: the first convolution's input channels
    ("in_channels", (3, 4, 5), 1),
)
_MAX_TRIES = 8  # models built (on meta) and planned again, at most, per refusal


def _is_partial_advice(text: str) -> bool:
    return text.startswith("pass partial=True")


def refine(plan: Plan) -> Plan:
    """The plan with only the suggestions that can help.

    A plan that would load nothing is not helped by ``partial=True``: the load would keep every
    tensor at its init, which ckptfit refuses ("nothing would be loaded"). That suggestion is
    dropped; what is left (a rename, ``use=``) leads to a load, or the error's hint points to
    ``ckptfit identify`` / ``ckptfit inspect``.
    """
    if plan.ok or plan.loads or plan.by_action("tied"):
        return plan
    kept = tuple(s for s in plan.suggestions if not _is_partial_advice(s))
    return plan if kept == plan.suggestions else replace(plan, suggestions=kept)


def _changed_dims(plan: Plan) -> list[tuple[int, int, int, int]]:
    """``(rank, dim, model size, file size)`` for each tensor of another shape that differs in one dimension."""
    out = []
    for d in plan.by_action("skip_shape"):
        t, s = d.target_shape, d.source_shape
        if s is None or len(t) != len(s):
            continue
        diff = [i for i in range(len(t)) if t[i] != s[i]]
        if len(diff) == 1:
            out.append((len(t), diff[0], t[diff[0]], s[diff[0]]))
    return out


def _candidates(plan: Plan, kwargs: Mapping[str, Any], builder: Callable[..., Any] | None) -> list[tuple[str, int]]:
    """Constructor arguments that could explain the shapes, most likely first."""
    changed = _changed_dims(plan)
    found: dict[tuple[str, int], int] = {}  # candidate -> how many tensors it explains
    for name, ranks, dim in _KNOWN_ARGS:
        for rank, i, _old, new in changed:
            if rank in ranks and i == dim:
                found[(name, new)] = found.get((name, new), 0) + 1
    # int arguments of the factory itself whose value is one of the model's sizes (widths, depths)
    try:
        params = inspect.signature(builder).parameters.values() if builder is not None else ()
    except (TypeError, ValueError):
        params = ()
    for p in params:
        current = kwargs.get(p.name, p.default)
        if isinstance(current, bool) or not isinstance(current, int):
            continue
        for _rank, _i, old, new in changed:
            if old == current:
                found[(p.name, new)] = found.get((p.name, new), 0) + 1
    return [c for c, _ in sorted(found.items(), key=lambda item: -item[1])]


def _shape_problems(plan: Plan) -> int:
    return len(plan.by_action("skip_shape"))


def advise_constructor(plan: Plan, make: Callable[[dict[str, Any]], nn.Module], kwargs: Mapping[str, Any],
                       source: Any, options: Mapping[str, Any], *,
                       builder: Callable[..., Any] | None = None) -> Plan:
    """``plan`` with a constructor argument advised, when one makes the shapes fit; else ``plan``.

    Args:
        plan: a refused plan with tensors of another shape.
        make: builds the model from keyword arguments (``make(kwargs)``); called on the meta device.
        kwargs: the arguments the model was built with.
        source: the checkpoint (a path or an opened :class:`~ckptfit.Checkpoint`).
        options: the load options (only those that change a plan are used).
        builder: the callable whose signature lists the model's arguments, when known.

    Returns:
        The plan with the argument first among its suggestions (``partial=True`` dropped, since
        it would keep the layers the argument fixes at a random init), or ``plan`` unchanged
        when no argument was verified to fit.
    """
    if plan.ok or not plan.by_action("skip_shape"):
        return plan
    from .loading import open as open_checkpoint, plan as make_plan
    from .loading.meta import parameters_on_meta

    opts = {k: v for k, v in options.items() if k in PLAN_OPTIONS}
    candidates = _candidates(plan, kwargs, builder)
    if not candidates:
        return plan
    ckpt = open_checkpoint(source, trust=bool(opts.get("trust"))) if isinstance(source, (str, bytes)) or \
        hasattr(source, "__fspath__") else source
    try:
        best: tuple[dict[str, Any], Plan] | None = None
        extra: dict[str, Any] = {}
        current = plan
        tries = 0
        while tries < _MAX_TRIES and current is not None and not current.ok:
            step = None
            for name, value in candidates:
                if name in extra or tries >= _MAX_TRIES:
                    continue
                tries += 1
                trial = {**extra, name: value}
                try:
                    with parameters_on_meta():
                        model = make({**kwargs, **trial})
                    p = make_plan(model, ckpt, **opts)
                except Exception:  # noqa: BLE001 - an argument this constructor does not take, or rejects
                    continue
                if _shape_problems(p) < _shape_problems(current) and len(p.problems) < len(current.problems):
                    if step is None or (p.ok, -len(p.problems)) > (step[1].ok, -len(step[1].problems)):
                        step = (trial, p)
                    if p.ok:
                        break
            if step is None:
                break
            extra, current = step
            best = step
    finally:
        if ckpt is not source:
            ckpt.close()
    if best is None:
        return plan
    extra, fitted = best
    if set(extra) & set(kwargs):
        # the user chose that argument (num_classes=10 for a new head): keeping those layers at their
        # init is what they asked for; loading the file's own layers is the alternative
        text = "or, to load the file's own layers, build the model with " + _constructor_text(extra, kwargs, fitted)
        return replace(plan, suggestions=plan.suggestions + (text,))
    # a default the file does not share: partial=True would keep those layers random
    text = "the file's shapes are this model's built with " + _constructor_text(extra, kwargs, fitted)
    return replace(plan, suggestions=(text,) + tuple(s for s in plan.suggestions if not _is_partial_advice(s)))


def _constructor_text(extra: Mapping[str, Any], kwargs: Mapping[str, Any], fitted: Plan) -> str:
    """``num_classes=10: pass model_kwargs={'num_classes': 10} (on the command line: --model-arg num_classes=10)``."""
    args = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    merged = {**{k: v for k, v in kwargs.items() if not (k == "weights" and v is None)}, **extra}
    cli = " ".join(f"--model-arg {k}={v!r}" for k, v in extra.items())
    then = "" if fitted.ok else "; then see what is left"
    return f"{args}: pass model_kwargs={merged!r} (on the command line: {cli}){then}"
