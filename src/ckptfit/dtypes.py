"""Dtypes by name: the one table of dtypes ckptfit knows, without importing torch.

Readers describe tensors by dtype *name* (``"float32"``, ``"bfloat16"``), with the itemsize and
kind from :data:`DTYPES`, so ``ckptfit inspect``, ``scan`` and ``diff`` never import torch;
:func:`torch_dtype` maps a name to the ``torch.dtype`` when tensor bytes are read (importing torch
then). Every helper here takes a name or a ``torch.dtype`` alike.

The names ckptfit casts to are :data:`CAST_NAMES`; the library parses them with
:func:`parse_dtype` (a :class:`~ckptfit.errors.CheckpointError` lists the valid names), and the
CLI wraps the same function into a usage error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import CheckpointError, UnsupportedFormat

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "DTYPES", "PLAIN_DTYPES", "CAST_NAMES", "CAST_DTYPES", "parse_dtype", "dtype_name", "short_name",
           "itemsize", "dtype_kind", "torch_dtype"]

Kind = Literal["float", "complex", "int", "bool", "other"]


@dataclass(frozen=True)
class DType:
    """What ckptfit needs to know of a dtype without torch: its name, bytes per element and kind.

    ``kind`` is ``float``, ``complex``, ``int`` (signed or not), ``bool``, or ``other``
    (quantized and bit-packed dtypes, which have no plain element layout).
    """

    name: str
    itemsize: int
    kind: Kind


def _table() -> dict[str, DType]:
    rows: list[tuple[str, int, Kind]] = [
        ("float64", 8, "float"), ("float32", 4, "float"), ("float16", 2, "float"), ("bfloat16", 2, "float"),
        ("float8_e4m3fn", 1, "float"), ("float8_e5m2", 1, "float"), ("float8_e4m3fnuz", 1, "float"),
        ("float8_e5m2fnuz", 1, "float"), ("float8_e8m0fnu", 1, "float"),
        ("complex128", 16, "complex"), ("complex64", 8, "complex"), ("complex32", 4, "complex"),
        ("int64", 8, "int"), ("int32", 4, "int"), ("int16", 2, "int"), ("int8", 1, "int"),
        ("uint64", 8, "int"), ("uint32", 4, "int"), ("uint16", 2, "int"), ("uint8", 1, "int"),
        ("bool", 1, "bool"),
        ("qint8", 1, "other"), ("quint8", 1, "other"), ("qint32", 4, "other"), ("quint4x2", 1, "other"),
        ("quint2x4", 1, "other"), ("bits8", 1, "other"), ("bits16", 2, "other"), ("bits1x8", 1, "other"),
        ("bits2x4", 1, "other"), ("bits4x2", 1, "other"), ("float4_e2m1fn_x2", 1, "other"),
    ]
    return {name: DType(name, size, kind) for name, size, kind in rows}


# name (as torch spells it, without ``torch.``) -> DType
DTYPES: dict[str, DType] = _table()
# Dtypes whose storages may be materialised as tensors (read, viewed with as_strided, copied): plain
# numbers only. Quantized (qint8 ...), bit-packed (bits8, quint4x2) and sub-byte (int4, uint2) dtypes
# have no plain element layout; torch crashes the process on some of them (as_strided of a qint8 view).
PLAIN_DTYPES: frozenset[str] = frozenset(
    ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16", "int8",
     "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
     "float8_e5m2fnuz"))

# name -> the floating dtype it means; the short name of each dtype comes first
CAST_NAMES: dict[str, str] = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp64": "float64", "float64": "float64", "double": "float64",
}
_SHORT: dict[str, str] = {}
for _name, _canonical in CAST_NAMES.items():
    _SHORT.setdefault(_canonical, _name)


def __getattr__(name: str) -> Any:
    # CAST_DTYPES, the same table with torch dtypes, is built (importing torch) when first asked for
    if name == "CAST_DTYPES":
        table = {k: torch_dtype(v) for k, v in CAST_NAMES.items()}
        globals()["CAST_DTYPES"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype | str) -> str:
    """How reports name a dtype: ``torch.bfloat16`` (or ``"bfloat16"``) -> ``"bfloat16"``.

    Example:
        >>> dtype_name(torch.bfloat16), dtype_name("torch.float16")
        ('bfloat16', 'float16')
    """
    name = _NAMES.get(dtype)
    if name is None:
        name = str(dtype).removeprefix("torch.")
        if len(_NAMES) < 256:  # torch.dtype objects and the names of the table: a few dozen
            _NAMES[dtype] = name
    return name


_NAMES: dict[object, str] = {}  # dtype_name's answers: str() of a torch.dtype costs a microsecond, per tensor


def short_name(dtype: torch.dtype | str) -> str:
    """The short name of a cast dtype (``torch.bfloat16`` -> ``"bf16"``), else its :func:`dtype_name`.

    Example:
        >>> short_name(torch.bfloat16), short_name("int64")
        ('bf16', 'int64')
    """
    name = dtype_name(dtype)
    return _SHORT.get(name) or name


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a dtype given by name or as a ``torch.dtype`` (torch imported only for a
    name this table does not hold).

    Example:
        >>> itemsize("bfloat16"), itemsize(torch.complex64)
        (2, 8)
    """
    info = DTYPES.get(dtype_name(dtype))
    if info is not None:
        return info.itemsize
    dt = torch_dtype(dtype)
    if dt.is_complex:  # (older torch reported half the size for complex dtypes)
        import torch

        return torch.empty((), dtype=dt).element_size()
    return dt.itemsize


def dtype_kind(dtype: torch.dtype | str) -> Kind:
    """``float``, ``complex``, ``int``, ``bool`` or ``other``: dtypes of one kind cast into each other.

    Example:
        >>> dtype_kind("bfloat16"), dtype_kind(torch.int8), dtype_kind("bool")
        ('float', 'int', 'bool')
    """
    info = DTYPES.get(dtype_name(dtype))
    if info is not None:
        return info.kind if info.kind != "other" else "int"
    dt = torch_dtype(dtype)
    if dt.is_complex:
        return "complex"
    return "float" if dt.is_floating_point else "int"


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The ``torch.dtype`` a name means (``"float32"`` -> ``torch.float32``); imports torch.

    Raises:
        UnsupportedFormat: the installed torch has no such dtype.

    Example:
        >>> torch_dtype("bfloat16")
        torch.bfloat16
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype)
    value = vars(torch).get(name)  # never getattr: torch.__getattr__ may import submodules
    if not isinstance(value, torch.dtype):
        raise UnsupportedFormat(f"dtype {name!r} is not available in the installed torch {torch.__version__}",
                                hint="install a torch version that has it, or convert the file to a plain dtype")
    return value


def _valid_names() -> str:
    by_dtype: dict[str, list[str]] = {}
    for name, canonical in CAST_NAMES.items():
        by_dtype.setdefault(canonical, []).append(name)
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
        if key not in CAST_NAMES:
            raise CheckpointError(f"unknown dtype {value!r}; use one of {_valid_names()}",
                                  hint="floating weights are cast to it; integer tensors keep their dtype")
        return torch_dtype(CAST_NAMES[key])
    import torch

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
