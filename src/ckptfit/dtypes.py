"""Dtype names: the one table of names ckptfit casts to, and how reports name dtypes.

The library parses names here (:func:`parse_dtype` raises a :class:`~ckptfit.errors.CheckpointError`
listing the valid names); the CLI wraps the same function into a usage error.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["CAST_DTYPES", "parse_dtype", "dtype_name", "short_name"]

# name -> the floating dtype it means; the short name of each dtype comes first
CAST_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
_SHORT: dict[torch.dtype, str] = {}
for _name, _dt in CAST_DTYPES.items():
    _SHORT.setdefault(_dt, _name)


def _valid_names() -> str:
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, dt in CAST_DTYPES.items():
        by_dtype.setdefault(dt, []).append(name)
    return ", ".join(f"{names[0]} ({', '.join(names[1:])})" for names in by_dtype.values())


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """The floating dtype a name (``"bf16"``, ``"torch.float16"``, ``"half"``) or a ``torch.dtype`` means.

    ``None`` stays ``None`` (keep the dtypes as they are).

    Raises:
        CheckpointError: an unknown name, or a dtype that is not floating (weights are cast
            only between floating dtypes); the message lists the valid names.

    Example:
        >>> parse_dtype("bf16"), parse_dtype(torch.float16), parse_dtype(None)
        (torch.bfloat16, torch.float16, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key not in CAST_DTYPES:
            raise CheckpointError(f"unknown dtype {value!r}; use one of {_valid_names()}",
                                  hint="floating weights are cast to it; integer tensors keep their dtype")
        return CAST_DTYPES[key]
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise CheckpointError(f"dtype {value} is not a floating dtype; weights are cast only to one of "
                                  f"{_valid_names()}", hint="integer tensors always keep their own dtype")
        return value
    raise CheckpointError(f"dtype must be a name or a torch.dtype, not {type(value).__name__} ({_short_repr(value)})",
                          hint=f"use one of {_valid_names()}")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    """How reports name a dtype: ``torch.bfloat16`` -> ``"bfloat16"``.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype) -> str:
    """The short name of a cast dtype (``torch.bfloat16`` -> ``"bf16"``), else its :func:`dtype_name`.

    Example:
        >>> short_name(torch.bfloat16), short_name(torch.int64)
        ('bf16', 'int64')
    """
    return _SHORT.get(dtype) or dtype_name(dtype)
