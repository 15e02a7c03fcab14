"""Applying a decision's :class:`~ckptfit.plans.Transform` to checkpoint tensors while they are copied.

The kinds: ``transpose``, ``split`` (one part of a fused tensor), ``concat`` (parts joined into a
fused tensor) and ``adapt`` (an RGB first convolution into other input channels, :mod:`ckptfit._adapt`).
The porting pass (:mod:`ckptfit.porting`) decides them; the copy engine (:mod:`ckptfit.loading.copying`)
calls :func:`apply_transform`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .matching.names import fmt_shape
from .plans import Decision

__all__ = ["apply_transform"]


def apply_transform(d: Decision, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor to copy into ``d.target``: the checkpoint tensor(s) ``fetch`` returns, transformed.

    The result is a new contiguous tensor of ``d.target_shape``.
    """
    t = d.transform
    if t is None or d.source is None:
        raise ValueError(f"{d.target}: no transform to apply")
    if t.kind == "transpose":
        x = fetch(d.source).t()
    elif t.kind == "adapt":
        from ._adapt import adapt_tensor

        x = adapt_tensor(fetch(d.source), t.parts)
    elif t.kind == "split":
        x = fetch(d.source)
        if t.transpose and x.dim() == 2:
            x = x.t()
        pieces = x.split(list(t.sizes), dim=t.dim) if t.sizes else x.chunk(t.parts, dim=t.dim)
        if len(pieces) != t.parts:
            raise ValueError(f"{d.target}: '{d.source}' does not split into {t.parts} parts")
        x = pieces[t.part]
    elif t.kind == "concat":
        xs = [fetch(s) for s in t.sources]
        if t.transpose:
            xs = [x.t() if x.dim() == 2 else x for x in xs]
        x = torch.cat(xs, dim=t.dim)
    else:
        raise ValueError(f"{d.target}: unknown transform {t.kind!r}")
    if tuple(x.shape) != tuple(d.target_shape):
        raise ValueError(f"{d.target}: {t.kind} of '{d.source}' gives {fmt_shape(x.shape)}, the model has "
                         f"{fmt_shape(d.target_shape)}")
    return x.contiguous().clone() if x.is_contiguous() else x.contiguous()
