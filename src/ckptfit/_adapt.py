"""Adapting a pretrained model, only when asked: an RGB first convolution into other input channels.

``adapt="in_chans"`` (CLI ``--adapt in_chans``) loads a first convolution stored for 3 input
channels into a model built for another number, as timm's ``adapt_input_conv`` does:

- ``in_chans=1``: the weight summed over its 3 input channels (a grey image ``g`` then gives
  the output the RGB image ``(g, g, g)`` gave);
- ``in_chans=2`` or ``>= 4``: the 3 channels repeated to fill ``in_chans`` and scaled by
  ``3 / in_chans`` (the output keeps its scale when the channels are alike).

It applies to exactly one convolution weight (the one whose shape differs from the file's in
its input channels only); anything else is refused. Without ``adapt=`` the refusal suggests it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from .plans import Decision, Plan, Transform

__all__ = ["parse_adapt", "adapt_plan", "adapt_tensor"]

_KINDS = ("in_chans",)


def parse_adapt(value: Any) -> str | None:
    """Check ``adapt=``: ``None`` or ``"in_chans"``; raise at once otherwise.

    Example:
        >>> parse_adapt("in_chans")
        'in_chans'
    """
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower().replace("-", "_") not in _KINDS:
        raise ValueError(f"adapt={value!r} is not an adaptation ckptfit makes; use adapt='in_chans' (an RGB first "
                         f"convolution into a model with another number of input channels)")
    return "in_chans"


def _candidates(plan: Plan) -> list[Decision]:
    """Convolution weights whose shape differs from the file's in dim 1 only, the file's being 3 (RGB)."""
    out = []
    for d in plan.decisions:
        s, t = d.source_shape, tuple(d.target_shape)
        if d.action != "skip_shape" or s is None or len(t) < 3 or len(s) != len(t) or d.transform is not None:
            continue
        if not d.target.endswith("weight") or s[1] != 3 or t[1] == 3 or s[0] != t[0] or s[2:] != t[2:]:
            continue
        out.append(d)
    return out


def _detail(n_in: int) -> str:
    if n_in == 1:
        return "input channels 3 -> 1: summed over the RGB channels"
    return (f"input channels 3 -> {n_in}: the RGB channels repeated {math.ceil(n_in / 3)} times, the first "
            f"{n_in} kept, scaled by 3/{n_in}")


def adapt_plan(plan: Plan, adapt: str | None) -> Plan:
    """With ``adapt="in_chans"``: load the one RGB first convolution adapted; without: suggest it.

    Returns:
        The plan, with the adapted decision (a ``Transform("adapt", ...)``) and its problem
        removed, or a problem when more than one convolution differs in its input channels.
    """
    cands = _candidates(plan)
    if adapt is None:
        if len(cands) == 1:
            d = cands[0]
            hint = (f"if the model takes {d.target_shape[1]}-channel input where the file's was RGB, pass "
                    f"adapt='in_chans' (CLI: --adapt in_chans) to load '{d.source}' adapted as timm's "
                    f"adapt_input_conv does")
            return replace(plan, suggestions=tuple(dict.fromkeys((hint,) + plan.suggestions)))
        return plan
    if not cands:
        return replace(plan, warnings=plan.warnings + ("adapt='in_chans' found no convolution weight stored for 3 "
                                                       "input channels whose model shape differs only there",))
    if len(cands) > 1:
        names = ", ".join(f"'{d.target}'" for d in cands[:4])
        return replace(plan, problems=plan.problems + (
            f"adapt='in_chans': {len(cands)} convolutions differ from the file in their input channels ({names}); "
            f"only one first convolution is adapted, nothing is guessed",))
    d = cands[0]
    n_in = d.target_shape[1]
    reason = "adapt='in_chans', as timm's adapt_input_conv"
    new = replace(d, action="load", stage="port",
                  reason=f"{d.reason.split(', but checkpoint has')[0]}; adapted: {_detail(n_in)}",
                  transform=Transform("adapt", _detail(n_in), reason, parts=n_in))
    decisions = tuple(new if x is d else x for x in plan.decisions)
    problems = tuple(p for p in plan.problems if not p.startswith(f"{d.target}: "))
    suggestions = plan.suggestions
    if not any(x.action == "skip_shape" for x in decisions):
        from .matching.decisions import PARTIAL_SHAPES

        suggestions = tuple(s for s in suggestions if s != PARTIAL_SHAPES)
    unused = tuple(u for u in plan.unused if u.source != d.source)
    return replace(plan, decisions=decisions, problems=problems, suggestions=suggestions, unused=unused)


def adapt_tensor(x: torch.Tensor, n_in: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` for a ``[out, 3, ...]`` weight, computed in float32, returned in ``x``'s dtype."""
    w = x.float()
    if n_in == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = [1] * w.dim()
        reps[1] = math.ceil(n_in / 3)
        w = w.repeat(*reps)[:, :n_in] * (3 / float(n_in))
    return w.to(x.dtype)
