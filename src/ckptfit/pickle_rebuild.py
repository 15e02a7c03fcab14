"""What ckptfit rebuilds itself from a pickle: torch's tensor machinery and plain data.

The interpreter (:mod:`ckptfit.safety`) looks up every global it meets in two tables:
:data:`TENSOR_HANDLERS` (``torch._utils._rebuild_tensor_v2``, storages, ``torch.Size`` ...),
whose stand-ins here build :class:`~ckptfit.lazy.LazyTensor` objects without reading a tensor
byte, and :data:`DATA_HANDLERS` (``OrderedDict``, ``set``, ``datetime``, ``copyreg`` helpers,
and numpy's reconstructors from :mod:`ckptfit.pickle_numpy`), rebuilt from checked plain values.
:func:`classify` names the kind of any global: ``tensor``, ``data``, ``dangerous`` or
``unknown`` (an inert placeholder).
"""
from __future__ import annotations

import codecs
import collections
import datetime
import sys
from collections.abc import Callable
from typing import Any

from .dtypes import PLAIN_DTYPES, dtype_name, itemsize, torch_dtype
from .errors import CorruptCheckpoint, ResourceLimitExceeded, UnsafeCheckpoint, UnsupportedFormat
from .lazy import LazyTensor, StorageRef, strided_reader
from .pickle_numpy import NUMPY_HANDLERS
from .pickle_policy import Kind, is_dangerous, normalise
from .pickle_values import (DangerousRef, Handler, Placeholder, PlaceholderClass, StorageType, charge, check_key,
                            held, int_tuple)


__all__ = ["TENSOR_HANDLERS", "DATA_HANDLERS", "PLAIN_BASES", "classify", "check_dtype", "reconstructor",
           "torch_constant"]

# torch's typed storage classes, by the dtype name of their elements (torch is never imported for them)
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "UntypedStorage": "uint8",
}
for _n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64"):
    _STORAGE_DTYPES[f"{_n}Storage"] = _n


_MAX_DIM = 1 << 62
def _is_torch_dtype(value: Any) -> bool:
    """Whether ``value`` is a ``torch.dtype`` (one exists only once a pickle's ``torch.float32`` imported torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.dtype)


def check_dtype(dtype: Any, what: str = "tensor") -> None:
    """Refuse a dtype (a name or a ``torch.dtype``) that is not a plain number dtype (:data:`PLAIN_DTYPES`)."""
    if not isinstance(dtype, str) and not _is_torch_dtype(dtype):
        raise UnsupportedFormat(f"the checkpoint holds a {what} of dtype {str(dtype)[:40]}, which ckptfit does not "
                                f"rebuild (only plain number dtypes)",
                                hint="convert it to a plain dtype (dequantize it) with the code that wrote it")
    if dtype_name(dtype) not in PLAIN_DTYPES:
        raise UnsupportedFormat(f"the checkpoint holds a {what} of dtype torch.{dtype_name(dtype)}, which ckptfit does not rebuild "
                                f"(only plain number dtypes)",
                                hint="convert it to a plain dtype (dequantize it) with the code that wrote it")


def _check_view(storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    if type(offset) is not int or offset < 0:
        raise CorruptCheckpoint(f"tensor storage offset {offset!r} is invalid")
    if len(size) != len(stride):
        raise CorruptCheckpoint(f"tensor has {len(size)} sizes but {len(stride)} strides")
    # size and stride are tuples of ints (int_tuple) of the same length: min/max test every element, as
    # any() over each would, at a fraction of the cost
    if size and (min(size) < 0 or min(stride) < 0):
        raise CorruptCheckpoint(f"tensor view has a negative size or stride: size {list(size)}, stride {list(stride)}")
    if len(size) > 64 or (size and (max(size) >= _MAX_DIM or max(stride) >= _MAX_DIM)) or offset >= _MAX_DIM:
        raise CorruptCheckpoint(f"tensor view (offset {offset}, size {list(size)[:8]}, stride {list(stride)[:8]}) "
                                f"is beyond what any tensor can have")
    if 0 in size:
        if offset > storage.numel:
            raise CorruptCheckpoint(f"empty tensor view starts at element {offset} of storage {storage.key!r}, "
                                    f"which holds only {storage.numel} elements")
        return
    last = offset
    numel = 1
    for n, s in zip(size, stride):
        last += (n - 1) * s  # Python ints: no overflow
        numel *= n
    if last >= storage.numel:
        raise CorruptCheckpoint(
            f"tensor view (offset {offset}, size {list(size)}, stride {list(stride)}) reaches element {last} "
            f"of storage {storage.key!r}, which holds only {storage.numel} elements")
    if numel > storage.numel:
        # overlapping strides (an expanded view, stride 0): reading it whole holds more than the file does;
        # the elements beyond the storage's own count are charged to the pickle's object budget
        if numel >= _MAX_DIM:
            raise CorruptCheckpoint(f"tensor view of size {list(size)[:8]} has more elements than any tensor can")
        charge((numel - storage.numel) * itemsize(storage.dtype))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None, *, dtype: str | None = None) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpoint(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if dtype is not None or type(storage.dtype) is not str or storage.dtype not in PLAIN_DTYPES:  # else: checked
        check_dtype(storage.dtype if dtype is None else dtype)
    size_t, stride_t = int_tuple(size, "size"), int_tuple(stride, "stride")
    if dtype is not None and dtype != dtype_name(storage.dtype):
        # untyped storage (v3): re-express element counts in the tensor's dtype
        size = itemsize(dtype)
        if storage.nbytes % size:
            raise CorruptCheckpoint(f"storage {storage.key!r} of {storage.nbytes} bytes is not a whole number "
                                    f"of torch.{dtype} elements")
        base = storage

        def read_cast():
            return base.read().view(torch_dtype(dtype))

        storage = StorageRef(base.key, dtype, base.nbytes // size, base.location,
                             read_cast if base.read is not None else None)
    _check_view(storage, storage_offset, size_t, stride_t)
    reader = strided_reader(storage, storage_offset, size_t, stride_t)
    if type(storage.dtype) is str:  # every field checked: the one lazy tensor per pickled tensor, made directly
        name = storage.dtype if storage.dtype in PLAIN_DTYPES else dtype_name(storage.dtype)  # (plain: its own name)
        return LazyTensor.checked(size_t, name, reader, storage.location, bool(requires_grad), storage.key,
                                  storage_offset, stride_t)
    return LazyTensor(size_t, storage.dtype, reader, device=storage.location, requires_grad=bool(requires_grad),
                      storage_key=storage.key, storage_offset=storage_offset, stride=stride_t)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not _is_torch_dtype(dtype):
        raise CorruptCheckpoint("tensor dtype is not a torch dtype")
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata,
                           dtype=dtype_name(dtype))


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise CorruptCheckpoint(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    data.requires_grad = bool(requires_grad)
    data.is_parameter = True
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if isinstance(func, DangerousRef):
        raise _would_call(func, "torch._tensor._rebuild_from_type_v2")
    if isinstance(new_type, DangerousRef):
        raise _would_call(new_type, "torch._tensor._rebuild_from_type_v2 (as the tensor's class)")
    if not isinstance(func, Handler) or func.fn is None or func.kind != "tensor":
        raise CorruptCheckpoint("tensor subclass rebuilt by something that is not torch's tensor machinery")
    if not isinstance(args, tuple):
        raise CorruptCheckpoint("tensor rebuild arguments are not a tuple")
    t = func.fn(*args)
    if isinstance(new_type, Handler) and new_type.name == "Parameter":
        t.is_parameter = True
    return t


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    size_t = int_tuple(size, "size")
    if not _is_torch_dtype(dtype) or len(size_t) > 64 or any(not 0 <= s < _MAX_DIM for s in size_t):
        raise CorruptCheckpoint(f"meta tensor with an invalid dtype or size {list(size_t)[:8]}")
    check_dtype(dtype, "meta tensor")
    numel = 1
    for s in size_t:
        numel *= s
    if numel >= _MAX_DIM:
        raise CorruptCheckpoint(f"meta tensor of size {list(size_t)[:8]} has more elements than any tensor can")
    return LazyTensor(size_t, dtype, None, device="meta", requires_grad=bool(requires_grad))


def _unsupported(what: str) -> Callable:
    def fn(*args, **kwargs):
        raise UnsupportedFormat(f"the checkpoint holds a {what}, which ckptfit cannot rebuild yet",
                                hint="convert it to dense tensors with the code that wrote it")
    return fn


def _ordered_dict(items=()):
    d = collections.OrderedDict()
    if items:
        for kv in items:
            if not isinstance(kv, tuple | list) or len(kv) != 2:
                raise CorruptCheckpoint("OrderedDict built from something that is not key/value pairs")
            check_key(kv[0])
            d[kv[0]] = kv[1]
    return d


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray)
_PLAIN_CONTAINERS = (tuple, list, dict, set, frozenset)
MAX_CTOR_INT = 1 << 24  # bytes(n) / bytearray(n): n bytes at once


def _plain_ctor(typ: type, module: str = "builtins") -> Callable:
    """``typ(*args)`` for plain arguments only, so nothing a pickle builds can allocate unboundedly
    (``bytes(10**12)``, ``list(range(10**12))``), hash or format exponentially, or run a method of an
    unknown object; an argument that is itself a placeholder gives a placeholder."""

    def fn(*args):
        for a in args:
            if isinstance(a, Placeholder | PlaceholderClass | DangerousRef | Handler):
                return Placeholder(PlaceholderClass(module, typ.__name__), args)
            if not isinstance(a, _PLAIN_LEAVES + _PLAIN_CONTAINERS) and not (typ is slice or typ is range):
                if not (module == "datetime" and isinstance(a, datetime.tzinfo)):
                    raise CorruptCheckpoint(f"{typ.__name__}() applied to a {type(a).__name__}")
            if typ in (bytes, bytearray) and type(a) is int and not 0 <= a <= MAX_CTOR_INT:
                raise ResourceLimitExceeded(f"{typ.__name__}({a}) would allocate {a} bytes at once")
            if typ is str and isinstance(a, _PLAIN_CONTAINERS):
                raise CorruptCheckpoint("str() of a container")  # repr of a shared structure is exponential
            if typ in (set, frozenset) and isinstance(a, list | tuple):
                for item in a:
                    check_key(item)
            if typ is dict and isinstance(a, list | tuple):
                for item in a:
                    check_key(item[0] if isinstance(item, tuple | list) and item else item)
        if typ in (bytes, bytearray, str) and len(args) > 1:
            _check_codec(*args[1:3])
        try:
            value = typ(*args)
        except LookupError as e:  # an unknown codec or error handler (KeyError/IndexError are caught by call)
            raise CorruptCheckpoint(f"{typ.__name__}() with an unknown codec or error handler ({e})") from e
        charge(held(value))
        return value
    return fn


# Codecs a pickle may name (``bytes(s, "latin1")``, ``_codecs.encode``): text codecs only, never the
# byte-to-byte ones (zlib, base64 ...) whose output size is not the input's; error handlers likewise.
_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii", "utf-16", "utf-32"})
_CODEC_ERRORS = frozenset({"strict", "ignore", "replace", "surrogatepass", "surrogateescape", "backslashreplace"})


def _check_codec(encoding: Any = "utf-8", errors: Any = "strict") -> None:
    if not isinstance(encoding, str) or encoding.lower() not in _CODECS:
        raise CorruptCheckpoint(f"the pickle names the codec {str(encoding)[:40]!r}, which no checkpoint uses")
    if not isinstance(errors, str) or errors not in _CODEC_ERRORS:
        raise CorruptCheckpoint(f"the pickle names the codec error handler {str(errors)[:40]!r}")


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CorruptCheckpoint(f"_codecs.encode called with unexpected arguments ({str(encoding)[:40]!r})")
    _check_codec(encoding, errors)
    try:
        value = codecs.encode(obj, encoding, errors)
    except LookupError as e:  # pragma: no cover - both names are checked above
        raise CorruptCheckpoint(f"_codecs.encode with an unknown codec or error handler ({e})") from e
    charge(len(value))
    return value


def _torch_size(*args):
    import torch  # only for pickles that hold a torch.Size

    return torch.Size(int_tuple(args[0] if args else (), "size"))


def _torch_device(*args):
    if not args or not all(isinstance(a, str | int) for a in args):
        raise CorruptCheckpoint("torch.device called with unexpected arguments")
    import torch  # only for pickles that hold a torch.device

    return str(torch.device(*args))


def _would_call(obj: DangerousRef, by: str) -> UnsafeCheckpoint:
    """The refusal for a dangerous callable handed to a function that real unpickling runs."""
    q = f"{obj.module}.{obj.name}"
    return UnsafeCheckpoint(f"refusing to load: its pickled data passes {q} to {by}, which would call it on load",
                            globals=[q], hint="nothing was executed. Do not load this file unless you wrote it "
                                              "yourself; `ckptfit scan` lists every reference. No automatic unsafe "
                                              "fallback is performed.")


# Bases whose ``__init__`` copyreg._reconstructor may call without running anything the file chose
PLAIN_BASES = {("builtins", n) for n in ("object", "dict", "list", "set", "frozenset", "tuple", "int", "float",
                                          "str", "bytes", "bytearray", "complex")}


def reconstructor(cls, base, state=None):
    for obj, what in ((cls, "class"), (base, "base")):
        if isinstance(obj, DangerousRef):
            raise _would_call(obj, f"copyreg._reconstructor (as the {what})")
    if isinstance(cls, PlaceholderClass):
        return Placeholder(cls, ())
    if isinstance(cls, Handler) and cls.fn is not None and cls.kind == "data":
        return cls.fn()
    raise CorruptCheckpoint("copyreg._reconstructor on something that is not a class")


def _newobj(cls, *args):
    if isinstance(cls, DangerousRef):
        raise _would_call(cls, "copyreg.__newobj__ (as the class)")
    if isinstance(cls, PlaceholderClass):
        return Placeholder(cls, args)
    if isinstance(cls, Handler) and cls.fn is not None:
        return cls.fn(*args)
    raise CorruptCheckpoint("__newobj__ on something that is not a class")


def _tensor_handlers() -> dict[tuple[str, str], tuple[Callable | None, Any]]:
    h: dict[tuple[str, str], tuple[Callable | None, Any]] = {
        ("torch._utils", "_rebuild_tensor"): (_rebuild_tensor, None),
        ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor, None),
        ("torch._utils", "_rebuild_tensor_v3"): (_rebuild_tensor_v3, None),
        ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, None),
        ("torch._utils", "_rebuild_parameter_with_state"): (_rebuild_parameter, None),
        ("torch._tensor", "_rebuild_from_type_v2"): (_rebuild_from_type_v2, None),
        ("torch._tensor", "_rebuild_from_type"): (lambda func, t, args, d=None: _rebuild_from_type_v2(func, t, args, d), None),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): (_rebuild_meta, None),
        ("torch._utils", "_rebuild_qtensor"): (_unsupported("quantized tensor"), None),
        ("torch._utils", "_rebuild_sparse_tensor"): (_unsupported("sparse tensor"), None),
        ("torch._utils", "_rebuild_nested_tensor"): (_unsupported("nested tensor"), None),
        ("torch._utils", "_rebuild_wrapper_subclass"): (_unsupported("tensor subclass"), None),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): (_unsupported("device tensor from numpy"), None),
        ("torch._utils", "_rebuild_xla_tensor"): (_unsupported("XLA tensor"), None),
        ("torch", "Size"): (_torch_size, None),
        ("torch", "device"): (_torch_device, None),
        ("torch", "Tensor"): (None, "Tensor"),
        ("torch.nn.parameter", "Parameter"): (None, "Parameter"),
        ("torch.nn.parameter", "Buffer"): (None, "Buffer"),
        ("torch.serialization", "_get_layout"): (lambda name: name, None),
    }
    for name, dt in _STORAGE_DTYPES.items():
        h[("torch", name)] = (None, StorageType(name, dt))
        h[("torch.cuda", name)] = (None, StorageType(name, dt))
    h[("torch.storage", "UntypedStorage")] = (None, StorageType("UntypedStorage", "uint8"))
    h[("torch.storage", "TypedStorage")] = (None, StorageType("TypedStorage", "uint8"))
    return h


TENSOR_HANDLERS = _tensor_handlers()

DATA_HANDLERS: dict[tuple[str, str], tuple[Callable | None, Any]] = {
    ("collections", "OrderedDict"): (_ordered_dict, None),
    ("collections", "defaultdict"): (lambda *a: {}, None),
    ("collections", "Counter"): (lambda *a: collections.Counter(*[x for x in a if type(x) is dict][:1]), None),
    ("builtins", "set"): (_plain_ctor(set), None),
    ("builtins", "frozenset"): (_plain_ctor(frozenset), None),
    ("builtins", "list"): (_plain_ctor(list), None),
    ("builtins", "tuple"): (_plain_ctor(tuple), None),
    ("builtins", "dict"): (_plain_ctor(dict), None),
    ("builtins", "slice"): (_plain_ctor(slice), None),
    ("builtins", "complex"): (_plain_ctor(complex), None),
    ("builtins", "range"): (_plain_ctor(range), None),
    ("builtins", "bytearray"): (_plain_ctor(bytearray), None),
    ("builtins", "bytes"): (_plain_ctor(bytes), None),
    ("builtins", "int"): (_plain_ctor(int), None),
    ("builtins", "float"): (_plain_ctor(float), None),
    ("builtins", "str"): (_plain_ctor(str), None),
    ("builtins", "bool"): (_plain_ctor(bool), None),
    ("builtins", "object"): (None, "object"),
    ("builtins", "NoneType"): (None, "NoneType"),
    ("copyreg", "_reconstructor"): (reconstructor, None),
    ("copyreg", "__newobj__"): (_newobj, None),
    ("codecs", "encode"): (_codecs_encode, None),
    ("datetime", "datetime"): (_plain_ctor(datetime.datetime, "datetime"), None),
    ("datetime", "date"): (_plain_ctor(datetime.date, "datetime"), None),
    ("datetime", "time"): (_plain_ctor(datetime.time, "datetime"), None),
    ("datetime", "timedelta"): (_plain_ctor(datetime.timedelta, "datetime"), None),
    # TorchScript's pickles (``constants.pkl``, ``*.debug_pkl``) tag typed lists with these helpers
    ("torch.jit._pickle", "restore_type_tag"): (lambda value, type_str=None: value, None),
}
for _n in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_complexlist"):
    DATA_HANDLERS[("torch.jit._pickle", _n)] = (lambda data=(): list(data) if isinstance(data, list | tuple) else [], None)
DATA_HANDLERS.update(NUMPY_HANDLERS)


def classify(module: str, name: str) -> Kind:
    """How ckptfit treats the global ``module.name`` (after alias normalisation)."""
    raw = (module, name)
    module, name = normalise(module, name)
    if (module, name) in TENSOR_HANDLERS or (module == "torch" and torch_constant(name) is not None):
        return "tensor"
    if (module, name) in DATA_HANDLERS:
        return "data"
    if is_dangerous(module, name) or is_dangerous(*raw):
        return "dangerous"
    return "unknown"


def torch_constant(name: str) -> Any:
    """``torch.float32``, ``torch.strided``, ``torch.channels_last`` ... looked up without ``getattr``
    (``torch.__getattr__`` imports submodules lazily; a pickle must never trigger an import of its choosing).

    Only pickles that name such a constant (or another ``torch.X`` outside the tables) import torch itself.
    """
    import torch

    v = vars(torch).get(name)
    return v if isinstance(v, torch.dtype | torch.layout | torch.memory_format) else None
