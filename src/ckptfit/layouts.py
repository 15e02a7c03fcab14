"""Which way layer types store their 2-D weights, and where that is known from.

``nn.Linear`` keeps its weight ``[out, in]``; Hugging Face's GPT-2 ``Conv1D`` keeps it
``[in, out]``. :func:`register_layout` declares a layer type's layout (by class name, so that
transformers need not be imported to recognise ``Conv1D``); :func:`layouts_of` reads it off a
model's modules, :func:`recorded_layouts` off the layer classes a pickled whole model records.
The porting pass (:mod:`ckptfit.porting`) takes both as evidence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["OUT_IN", "IN_OUT", "Layout", "register_layout", "layouts_of", "recorded_layouts"]

OUT_IN = "out_in"  # nn.Linear: weight [out, in]
IN_OUT = "in_out"  # GPT-2 Conv1D: weight [in, out]

# class name -> (layout, label); looked up along the module's MRO. Registered by name so that
# transformers need not be imported to recognise its Conv1D.
_LAYOUTS: dict[str, tuple[str, str]] = {}


def register_layout(cls: type | str, layout: str, label: str | None = None) -> None:
    """Declare how a layer type stores its 2-D ``weight``: ``"out_in"`` (as ``nn.Linear``) or ``"in_out"``.

    Example:
        >>> register_layout("Conv1D", "in_out")
    """
    if layout not in (OUT_IN, IN_OUT):
        raise ValueError(f"layout must be {OUT_IN!r} or {IN_OUT!r}, not {layout!r}")
    name = cls if isinstance(cls, str) else cls.__name__
    _LAYOUTS[name] = (layout, label or name)


register_layout("Linear", OUT_IN, "nn.Linear")
register_layout("Conv1D", IN_OUT, "Conv1D")  # transformers.pytorch_utils.Conv1D (GPT-2, GPT, ...)


@dataclass(frozen=True)
class Layout:
    """How one model tensor is laid out: its role (layer type) and which dimension is ``out``."""

    layout: str
    label: str


def layouts_of(model: nn.Module) -> dict[str, Layout]:
    """``{state-dict key: Layout}`` for every 2-D weight of a layer type with a known layout.

    ``nn.MultiheadAttention``'s ``in_proj_weight`` counts as ``nn.Linear`` (it is one ``[3d, d]``).
    """
    out: dict[str, Layout] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        hit = None
        for klass in type(mod).__mro__:
            hit = _LAYOUTS.get(klass.__name__)
            if hit is not None:
                break
        if hit is not None:
            w = mod._parameters.get("weight")
            if w is not None and w.dim() == 2:
                out.setdefault(prefix + "weight", Layout(*hit))
        if isinstance(mod, nn.MultiheadAttention):
            w = mod._parameters.get("in_proj_weight")
            if w is not None and w.dim() == 2:
                out.setdefault(prefix + "in_proj_weight", Layout(OUT_IN, "nn.Linear"))
    return out


# Objects visited when looking for pickled modules in a checkpoint's tree (a bound on hostile files).
_MAX_TREE_NODES = 1_000_000


def recorded_layouts(tree: Any) -> dict[int, Layout]:
    """``{id(LazyTensor): Layout}`` for 2-D weights of pickled modules whose class has a known layout.

    A whole model saved with ``torch.save(model)`` records each layer's class (``Conv1D``,
    ``Linear``); that is evidence of how each weight is stored, read without running anything.
    Empty for formats that hold bare tensors (safetensors, a state dict).
    """
    from .lazy import LazyTensor
    from .safety import Placeholder

    out: dict[int, Layout] = {}
    stack = [tree]
    seen: set[int] = set()
    while stack and len(seen) < _MAX_TREE_NODES:
        obj = stack.pop()
        if isinstance(obj, LazyTensor | str | bytes | int | float) or obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Placeholder):
            attrs = obj.attributes()
            params = attrs.get("_parameters")
            if isinstance(params, dict):
                w = params.get("weight")
                hit = _LAYOUTS.get(obj.cls.name)
                if hit is not None and isinstance(w, LazyTensor) and len(w.shape) == 2:
                    out[id(w)] = Layout(*hit)
                w = params.get("in_proj_weight")
                if obj.cls.name == "MultiheadAttention" and isinstance(w, LazyTensor) and len(w.shape) == 2:
                    out[id(w)] = Layout(OUT_IN, "nn.Linear")
            stack.extend(attrs.values())
            stack.extend(obj.args)
            stack.extend(obj.list_items)
            stack.extend(obj.dict_items.values())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple):
            stack.extend(obj)
    return out
