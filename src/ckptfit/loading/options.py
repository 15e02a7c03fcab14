"""The options of :func:`~ckptfit.load` and friends, checked and normalised before any work
(a wrong one fails early, clearly)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..dtypes import CAST_DTYPES
from ..transform_rules import parse_rules

__all__ = ["check_options"]


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


def check_options(model: Any, source: Any, partial: Any, use: Any, rename: Any, include: Any, exclude: Any,
             device: Any, dtype: Any, trust: Any, transforms: Any = None, adapt: Any = None,
             class_map: Any = None, class_map_head: Any = None) -> dict[str, Any]:
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
                transforms=parse_rules(transforms, adapt, class_map, class_map_head))
