"""One restricted pickle interpreter, used both to scan and to load: nothing in a file runs.

:func:`interpret` executes a pickle's opcodes (protocols 0-5) on a stack machine of its own.
Every global the pickle names is looked up in fixed tables, matched exactly as
``(module, name)`` (only the aliases ``__builtin__``, ``copy_reg`` and
``numpy.core``/``numpy._core`` are normalised; a dotted name such as ``('torch',
'ops.load_library')`` matches no table entry, and is checked for danger as the full
attribute path ``torch.ops.load_library`` that pickle would resolve):

- **tensor machinery** (``torch._utils._rebuild_tensor_v2``, storages, dtypes ...) is
  rebuilt as :class:`~ckptfit.lazy.LazyTensor` objects: no tensor byte is read;
- **known data** (``OrderedDict``, ``set``, numpy arrays and scalars, ``datetime`` ...) is
  rebuilt by our own code from plain values;
- **anything else** (``argparse.Namespace``, ``pathlib`` paths, a user's ``nn.Module``
  subclass, OmegaConf containers) becomes an inert :class:`Placeholder` that records its
  class path, arguments and state; no module is imported, no ``__reduce__``,
  ``__setstate__`` or ``__getattr__`` of it ever runs;
- **dangerous** callables (``os.system``, ``builtins.eval``, ``subprocess``, ``importlib``,
  ``runpy``, ``pickle.loads`` ...) are never called: they are recorded, and the caller
  refuses the file naming each of them (a pickle that names one and then cannot be rebuilt,
  say because it passes one to a tensor rebuild function, is refused as unsafe too).

Placeholders are safe for ckptfit, which never imports them; :func:`is_inert` says which of
them are also safe under real unpickling (``torch.load(weights_only=False)``), the allowlist
behind ``ckptfit scan``'s ``clean`` verdict.

The same pass records every global, call and object construction with its opcode and
position (a :class:`PickleScan`), so ``ckptfit scan`` and loading can never disagree.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import datetime
import gc
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import CorruptCheckpoint, ResourceLimitExceeded, UnsafeCheckpoint, UnsupportedFormat
from .lazy import LazyTensor, StorageRef, strided_reader

__all__ = [
    "GlobalRef",
    "PickleScan",
    "Placeholder",
    "PlaceholderClass",
    "StorageType",
    "interpret",
    "load_pickle",
    "classify",
    "to_plain",
    "scan_trailing",
    "merge_extra",
    "short_repr",
    "check_depth",
    "refuse_if_dangerous",
    "is_inert",
]

Kind = Literal["tensor", "data", "unknown", "dangerous"]

MAX_PICKLE_BYTES = 1 << 31  # a model's structure pickle, never its tensor data
MAX_MEMO = 50_000_000
MAX_STACK = 50_000_000
# LONG/LONG1/LONG4 arguments: 1 KiB is 2,467 decimal digits, under Python's 4,300-digit limit on int <-> str
# conversions, so every integer a pickle holds can be printed, used as a key and compared as text
MAX_INT_BYTES = 1 << 10
# Python objects one pickle may build, in estimated bytes (pointers, containers, memo entries; not
# the bytes/str payloads, which are bounded by the file itself). One opcode byte can allocate a
# 232-byte set, so without this a 5 MB pickle could take 1 GB. A torch state dict costs about
# 2 KB per tensor here (20,000 tensors: 40 MB), so the limit allows ~390,000 tensors in one pickle.
MAX_OBJECT_BYTES = 768 << 20
# Global references in one pickle: each is recorded (GlobalRef) and classified. torch's pickler memoises
# every global, so a real checkpoint names a few dozen, once each; a flood of them is only slow to scan.
MAX_GLOBALS = 1_000_000
MAX_DISTINCT_GLOBALS = 2_048
MAX_EXTRA_PICKLES = 16  # pickles after STOP that a scan interprets before giving up


# --------------------------------------------------------------------------- classification

_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "numpy.core": "numpy._core",
    "_codecs": "codecs",
}

# Modules whose every name is dangerous to call (or even to import).
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "socket", "pty", "importlib",
    "runpy", "pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "ctypes", "_ctypes", "cffi",
    "code", "codeop", "webbrowser", "antigravity", "multiprocessing", "asyncio", "types", "pdb", "bdb", "trace",
    "profile", "cProfile", "timeit", "commands", "platform", "pip", "setuptools", "distutils", "zipimport",
    "pkgutil", "pydoc", "site", "ensurepip", "tempfile", "glob", "io", "_io", "fileinput", "urllib", "http",
    "ftplib", "smtplib", "telnetlib", "xmlrpc", "requests", "httplib", "sqlite3", "signal", "resource",
    "threading", "_thread", "gc", "inspect", "operator", "_operator", "functools", "_functools", "joblib",
    "shelve", "dbm", "tarfile", "zipfile", "venv", "imp", "linecache", "doctest", "unittest", "logging.config",
    "yaml", "pandas.io.pickle", "fcntl", "termios", "builtins.__dict__", "torch.hub", "torch.jit",
    "torch.package", "torch.serialization", "torch.utils.cpp_extension", "torch._C", "torch.ops", "torch._ops",
    "torch._dynamo", "torch._inductor", "torch.fx", "torch.multiprocessing", "torch.distributed.rpc",
    "torch.utils._import_utils", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
    "_posixsubprocess", "_winapi", "msvcrt", "winreg", "mmap", "select", "ssl", "uuid._uuid", "atexit",
    "readline", "rlcompleter", "idlelib", "tkinter", "transformers.dynamic_module_utils", "huggingface_hub",
    # write files, compile or evaluate source, run commands, load shared libraries
    "py_compile", "compileall", "logging.handlers", "torch.utils.collect_env", "torch.utils.data.datapipes",
    "torch.library", "torch.utils.benchmark", "numpy.lib._npyio_impl", "numpy.lib.npyio", "numpy.lib.format",
    "numpy._core.records", "numpy.core.records", "numpy.rec", "numpy.ma.mrecords", "numpy.lib._datasource",
    "numpy.lib._utils_impl", "builtins.__import__", "_bootlocale", "tokenize", "ast", "symtable", "dis",
}
# Harmless names inside otherwise dangerous modules: building them runs nothing by itself
# (``functools.partial(f, ...)`` only calls ``f``, itself a global that is classified on its own).
_SAFE_IN_DANGEROUS = {("functools", "partial")}
# Single dangerous names inside otherwise harmless modules.
_DANGEROUS_NAMES = {
    ("builtins", n) for n in (
        "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__", "globals", "locals",
        "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview", "type", "super", "classmethod",
        "staticmethod", "property", "print", "dir", "hasattr", "execfile", "file", "reload", "apply",
    )
} | {
    ("torch", "load"), ("torch", "save"), ("torch", "compile"), ("torch", "from_file"), ("numpy", "load"),
    ("numpy", "save"), ("numpy", "fromfile"), ("numpy", "memmap"), ("numpy", "loadtxt"), ("numpy", "genfromtxt"),
    ("numpy.lib.npyio", "load"), ("torch.storage", "_load_from_bytes"), ("torch", "_load_from_bytes"),
    ("copyreg", "add_extension"), ("torch._utils", "_import_dotted_name"), ("pandas", "read_pickle"),
    ("numpy", "frompyfunc"), ("numpy", "vectorize"),
    # evaluate or compile a string, open or write a file, load a library
    ("typing", "get_type_hints"), ("typing", "_eval_type"), ("typing", "ForwardRef"), ("typing", "evaluate_forward_ref"),
    ("codecs", "open"), ("codecs", "EncodedFile"), ("codecs", "StreamReaderWriter"), ("codecs", "StreamRecoder"),
    ("logging", "FileHandler"), ("logging", "basicConfig"), ("logging", "config"), ("numpy", "savetxt"),
    ("numpy", "savez"), ("numpy", "savez_compressed"), ("numpy", "save"), ("numpy", "tofile"), ("numpy", "fromregex"),
    ("numpy", "DataSource"), ("torch", "load_library"), ("torch.ops", "load_library"),
}
# Names that mean "run code" whatever module they come from (a re-export of os.system is os.system).
_DANGEROUS_BARE = {
    "system", "popen", "popen2", "popen3", "popen4", "execv", "execve", "execl", "execle", "execlp", "execvp",
    "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp", "posix_spawn", "posix_spawnp",
    "startfile", "getoutput", "getstatusoutput", "check_output", "check_call", "Popen", "run_path",
    "run_module", "import_module", "__import__", "eval", "exec", "execfile", "unsafe_load", "full_load",
    "get_class_from_dynamic_module", "_import_dotted_name", "locate", "resolve_name",
}
_DANGEROUS_WORDS = _DANGEROUS_BARE | {
    "loads", "load", "getattr", "call", "run", "compile", "__builtins__", "__globals__", "__getattribute__",
    "__reduce__", "__reduce_ex__", "__subclasses__", "__class__", "__bases__", "__mro__", "__code__",
    "__dict__", "__init__", "__new__", "__call__", "__setstate__", "__getattr__", "open", "remove", "rmtree",
    "unlink", "fork", "kill", "write", "write_text", "write_bytes", "attrgetter", "methodcaller", "setattr",
    "delattr", "exit", "touch", "mkdir", "rmdir", "rename", "replace", "chmod", "lchmod", "symlink_to",
    "hardlink_to", "link_to", "read_text", "read_bytes", "load_library", "savetxt", "save", "dump", "dumps",
    "tofile", "system", "get_type_hints", "_eval_type", "_evaluate", "evaluate", "spawn", "start", "exec_module",
}

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
    "QInt8Storage": torch.qint8, "QUInt8Storage": torch.quint8, "QInt32Storage": torch.qint32,
    "UntypedStorage": torch.uint8,
}
for _n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64"):
    if hasattr(torch, _n):
        _STORAGE_DTYPES[f"{_n}Storage"] = getattr(torch, _n)


_DUNDER_MODULES = {"__main__", "__mp_main__", "__torch__"}


def _normalise(module: str, name: str) -> tuple[str, str]:
    """Known aliases only: Python 2 names (as ``pickle`` maps them) and ``numpy.core`` -> ``numpy._core``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    module = _ALIASES.get(module, module)
    if module.startswith("numpy.core."):
        module = "numpy._core." + module[len("numpy.core."):]
    return module, name


def _is_dangerous(module: str, name: str) -> bool:
    if (module, name) in _DANGEROUS_NAMES or name in _DANGEROUS_BARE:
        return True
    if (module, name) not in _SAFE_IN_DANGEROUS:
        top = module.split(".")
        for i in range(len(top), 0, -1):
            if ".".join(top[:i]) in _DANGEROUS_MODULES:
                return True
    if f"{module}.{name}" in _DANGEROUS_MODULES:  # ('torch', 'ops'), ('torch', 'hub'): the module itself
        return True
    if "." in name:
        # a dotted name is an attribute path that pickle (protocol 4+) resolves from the module:
        # ('torch', 'ops.load_library') is torch.ops.load_library, ('numpy', 'lib._npyio_impl.load')
        # is numpy.lib._npyio_impl.load. Every split of the full path is checked like a plain global.
        parts = f"{module}.{name}".split(".")
        for i in range(1, len(parts)):
            mod, attr = ".".join(parts[:i]), parts[i]
            if mod in _DANGEROUS_MODULES or (mod, attr) in _DANGEROUS_NAMES or attr in _DANGEROUS_BARE:
                if (mod, attr) not in _SAFE_IN_DANGEROUS:
                    return True
    if any(p.startswith("__") and p.endswith("__") and p not in _DUNDER_MODULES for p in module.split(".")):
        return True  # ``__builtins__``, ``x.__dict__`` ...
    if "." in name:  # dotted names are never resolved; one that spells an attack is dangerous
        parts = name.split(".")
        if any(p in _DANGEROUS_WORDS or p in _DANGEROUS_MODULES or (p.startswith("__") and p.endswith("__"))
               for p in parts):
            return True
    if name.startswith("__") and name.endswith("__") and name not in ("__newobj__", "__newobj_ex__"):
        return True
    return False


@dataclass(frozen=True)
class GlobalRef:
    """One global a pickle references, and what the pickle did with it.

    Attributes:
        module, name: exactly as in the pickle (after alias normalisation).
        kind: ``tensor`` (torch's own rebuild machinery), ``data`` (rebuilt as plain data),
            ``unknown`` (kept as an inert placeholder) or ``dangerous`` (would run code).
        opcode: the opcode that named it (``GLOBAL``, ``STACK_GLOBAL``, ``INST``).
        position: byte offset of that opcode in the pickle.
        called: whether the pickle went on to call or instantiate it (REDUCE, NEWOBJ, OBJ, INST).
        member: which pickle of the file (zip member name, or ``pickle #2`` of a legacy file).
    """

    module: str
    name: str
    kind: Kind
    opcode: str
    position: int
    called: bool = False
    member: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    """What one pickle references: every global with its use, plus anomalies found on the way."""

    member: str = ""
    globals: list[GlobalRef] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    end: int = 0  # offset just past STOP
    protocol: int = 0
    calls: dict[int, int] = field(default_factory=dict)  # index in globals -> times called
    # uses of known globals that would run code under real unpickling all the same (a class's
    # ``__init__`` called by ``copyreg._reconstructor``): not known to be safe, though ckptfit runs none
    unsafe_uses: list[str] = field(default_factory=list)

    def calls_of(self, index: int) -> int:
        """How many times ``globals[index]`` was called or instantiated (a memoised global can be many)."""
        return self.calls.get(index, 0)

    @property
    def dangerous(self) -> list[GlobalRef]:
        return [g for g in self.globals if g.kind == "dangerous"]


# --------------------------------------------------------------------------- placeholders

class PlaceholderClass:
    """An inert stand-in for a class or function the pickle names but ckptfit does not rebuild."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"

    def __reduce__(self):
        raise TypeError("a ckptfit placeholder cannot be pickled: it stands for a class that was never imported")


class Placeholder:
    """An inert object standing for ``cls(*args)`` plus its pickled state; nothing of it ever ran.

    Attributes:
        cls: the :class:`PlaceholderClass` it was made from.
        args: the arguments the pickle passed.
        state: what BUILD gave it (a dict, usually ``__dict__``), or None.
        items: list items (APPEND/APPENDS) and dict items (SETITEM/SETITEMS) it received.
    """

    __slots__ = ("cls", "args", "kwargs", "state", "list_items", "dict_items")

    def __init__(self, cls: PlaceholderClass, args: tuple = (), kwargs: dict | None = None):
        self.cls = cls
        self.args = args
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.list_items: list = []
        self.dict_items: dict = {}

    @property
    def qualname(self) -> str:
        return self.cls.qualname

    def attributes(self) -> dict:
        """The object's pickled ``__dict__`` (from its state), or an empty dict."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], dict | type(None)):
            st = {**(st[0] or {}), **(st[1] or {})} if isinstance(st[1], dict) else st[0]
        return st if isinstance(st, dict) else {}

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname} instance>"

    def __reduce__(self):
        raise TypeError("a ckptfit placeholder cannot be pickled: it stands for an object that was never built")


class StorageType:
    """``torch.FloatStorage`` and friends as they appear in persistent ids: just a dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _Dangerous:
    """A dangerous callable as the pickle named it. Calling it records the call and returns a placeholder."""

    __slots__ = ("ref_index", "module", "name")

    def __init__(self, module: str, name: str, ref_index: int):
        self.module = module
        self.name = name
        self.ref_index = ref_index

    def __reduce__(self):
        raise TypeError("a ckptfit placeholder cannot be pickled")


class _Handler:
    """A known global rebuilt by our own code: ``fn`` takes the pickle's arguments."""

    def __reduce__(self):
        raise TypeError("a ckptfit placeholder cannot be pickled")


    __slots__ = ("module", "name", "fn", "kind", "value")

    def __init__(self, module: str, name: str, fn: Callable | None, kind: Kind, value: Any = None):
        self.module = module
        self.name = name
        self.fn = fn
        self.kind = kind
        self.value = value


# --------------------------------------------------------------------------- rebuild handlers

def _ints(x: Any, what: str) -> tuple[int, ...]:
    if type(x) is not tuple:  # (a plain tuple, the usual case, skips both tests)
        if isinstance(x, torch.Size):
            x = tuple(x)
        if not isinstance(x, tuple | list):
            raise CorruptCheckpoint(f"tensor {what} is not a tuple of integers: {type(x).__name__}")
    for i in x:  # (a loop: all() over a generator costs more than the check for 1-4 dimensions)
        if type(i) is not int:
            raise CorruptCheckpoint(f"tensor {what} is not a tuple of integers: {type(x).__name__}")
    return tuple(x)


_MAX_DIM = 1 << 62
# Dtypes whose storages may be materialised as tensors (read, viewed with as_strided, copied): plain
# numbers only. Quantized (qint8 ...), bit-packed (bits8, quint4x2) and sub-byte (int4, uint2) dtypes
# have no plain element layout; torch crashes the process on some of them (as_strided of a qint8 view).
_PLAIN_DTYPES = frozenset(getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16", "int8",
    "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz") if isinstance(getattr(torch, n, None), torch.dtype))


def _check_dtype(dtype: Any, what: str = "tensor") -> None:
    if dtype not in _PLAIN_DTYPES:
        raise UnsupportedFormat(f"the checkpoint holds a {what} of dtype {dtype}, which ckptfit does not rebuild "
                                f"(only plain number dtypes)",
                                hint="convert it to a plain dtype (dequantize it) with the code that wrote it")


def _check_view(storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    if type(offset) is not int or offset < 0:
        raise CorruptCheckpoint(f"tensor storage offset {offset!r} is invalid")
    if len(size) != len(stride):
        raise CorruptCheckpoint(f"tensor has {len(size)} sizes but {len(stride)} strides")
    # size and stride are tuples of ints (_ints) of the same length: min/max test every element, as
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
        _charge((numel - storage.numel) * storage.dtype.itemsize)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None, *, dtype: torch.dtype | None = None) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpoint(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    _check_dtype(storage.dtype if dtype is None else dtype)
    size_t, stride_t = _ints(size, "size"), _ints(stride, "stride")
    if dtype is not None and dtype != storage.dtype:
        # untyped storage (v3): re-express element counts in the tensor's dtype
        itemsize = dtype.itemsize
        if storage.nbytes % itemsize:
            raise CorruptCheckpoint(f"storage {storage.key!r} of {storage.nbytes} bytes is not a whole number "
                                    f"of {dtype} elements")
        base = storage

        def read_cast():
            return base.read().view(dtype)

        storage = StorageRef(base.key, dtype, base.nbytes // itemsize, base.location,
                             read_cast if base.read is not None else None)
    _check_view(storage, storage_offset, size_t, stride_t)
    return LazyTensor(size_t, storage.dtype, strided_reader(storage, storage_offset, size_t, stride_t),
                      device=storage.location, requires_grad=bool(requires_grad), storage_key=storage.key,
                      storage_offset=storage_offset, stride=stride_t)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpoint("tensor dtype is not a torch dtype")
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata,
                           dtype=dtype)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, LazyTensor):
        raise CorruptCheckpoint(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    data.requires_grad = bool(requires_grad)
    data.is_parameter = True
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if isinstance(func, _Dangerous):
        raise _would_call(func, "torch._tensor._rebuild_from_type_v2")
    if isinstance(new_type, _Dangerous):
        raise _would_call(new_type, "torch._tensor._rebuild_from_type_v2 (as the tensor's class)")
    if not isinstance(func, _Handler) or func.fn is None or func.kind != "tensor":
        raise CorruptCheckpoint("tensor subclass rebuilt by something that is not torch's tensor machinery")
    if not isinstance(args, tuple):
        raise CorruptCheckpoint("tensor rebuild arguments are not a tuple")
    t = func.fn(*args)
    if isinstance(new_type, _Handler) and new_type.name == "Parameter":
        t.is_parameter = True
    return t


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    size_t = _ints(size, "size")
    if not isinstance(dtype, torch.dtype) or len(size_t) > 64 or any(not 0 <= s < _MAX_DIM for s in size_t):
        raise CorruptCheckpoint(f"meta tensor with an invalid dtype or size {list(size_t)[:8]}")
    _check_dtype(dtype, "meta tensor")
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
            _check_key(kv[0])
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
            if isinstance(a, Placeholder | PlaceholderClass | _Dangerous | _Handler):
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
                    _check_key(item)
            if typ is dict and isinstance(a, list | tuple):
                for item in a:
                    _check_key(item[0] if isinstance(item, tuple | list) and item else item)
        if typ in (bytes, bytearray, str) and len(args) > 1:
            _check_codec(*args[1:3])
        try:
            value = typ(*args)
        except LookupError as e:  # an unknown codec or error handler (KeyError/IndexError are caught by call)
            raise CorruptCheckpoint(f"{typ.__name__}() with an unknown codec or error handler ({e})") from e
        _charge(_held(value))
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


# Bytes that handlers allocate beyond the interpreter's own per-opcode estimate (a bytearray(n), a copy
# of a memoised list, a numpy array, a tensor view that repeats its storage), not yet added to the
# running total of the pickle being interpreted: `interpret` takes them at its next call and at STOP.
_PENDING = threading.local()


def _charge(n: int) -> None:
    """Count ``n`` bytes a handler holds against the current pickle's :data:`MAX_OBJECT_BYTES`."""
    if n <= 0:
        return
    total = getattr(_PENDING, "n", 0) + n
    _PENDING.n = total
    if total > MAX_OBJECT_BYTES:
        _PENDING.n = 0
        raise ResourceLimitExceeded(f"the pickle builds more than {MAX_OBJECT_BYTES >> 20} MiB of objects (a memory "
                                    f"bomb?); ckptfit stopped before allocating more",
                                    hint="no checkpoint's structure needs that much; nothing was executed")


def _take_charge() -> int:
    n = getattr(_PENDING, "n", 0)
    if n:
        _PENDING.n = 0
    return n


def _held(value: Any) -> int:
    """Bytes a rebuilt plain value holds of its own (its items are counted where they were built)."""
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if isinstance(value, dict | set | frozenset):
        return 64 * len(value)
    if isinstance(value, list | tuple):
        return 8 * len(value)
    return 0


MAX_KEY_NODES = 10_000
MAX_KEY_DEPTH = 64  # a dict key / set item nested deeper is no checkpoint's (repr and hash recurse in C)


def _check_key(key: Any) -> None:
    """Refuse a dict key / set item whose hashing would be exponential or recurse without bound.

    ``hash((t, t))`` hashes ``t`` twice, so a tuple nested 100 deep through the memo takes 2**100
    steps, and a tuple nested 10**6 deep overflows the C stack. Keys are walked iteratively, counting
    every visit, so such a key is rejected in bounded time.
    """
    if type(key) in (str, int, bytes, float, bool, type(None)):
        return
    budget = MAX_KEY_NODES
    stack = [(key, 1)]
    while stack:
        k, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ResourceLimitExceeded(f"a dict key or set item nests more than {MAX_KEY_NODES} values "
                                        f"(a hashing bomb?)")
        if isinstance(k, tuple | frozenset):
            if depth > MAX_KEY_DEPTH:
                raise ResourceLimitExceeded(f"a dict key or set item nests tuples more than {MAX_KEY_DEPTH} deep "
                                            f"(a hashing bomb?)")
            stack.extend((x, depth + 1) for x in k)
        elif isinstance(k, list | dict | set | bytearray):
            raise CorruptCheckpoint(f"unhashable dict key or set item ({type(k).__name__})")


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CorruptCheckpoint(f"_codecs.encode called with unexpected arguments ({str(encoding)[:40]!r})")
    _check_codec(encoding, errors)
    try:
        value = codecs.encode(obj, encoding, errors)
    except LookupError as e:  # pragma: no cover - both names are checked above
        raise CorruptCheckpoint(f"_codecs.encode with an unknown codec or error handler ({e})") from e
    _charge(len(value))
    return value


def _torch_size(*args):
    return torch.Size(_ints(args[0] if args else (), "size"))


def _torch_device(*args):
    if not args or not all(isinstance(a, str | int) for a in args):
        raise CorruptCheckpoint("torch.device called with unexpected arguments")
    return str(torch.device(*args))


def _would_call(obj: _Dangerous, by: str) -> UnsafeCheckpoint:
    """The refusal for a dangerous callable handed to a function that real unpickling runs."""
    q = f"{obj.module}.{obj.name}"
    return UnsafeCheckpoint(f"refusing to load: its pickled data passes {q} to {by}, which would call it on load",
                            globals=[q], hint="nothing was executed. Do not load this file unless you wrote it "
                                              "yourself; `ckptfit scan` lists every reference. No automatic unsafe "
                                              "fallback is performed.")


# Bases whose ``__init__`` copyreg._reconstructor may call without running anything the file chose
_PLAIN_BASES = {("builtins", n) for n in ("object", "dict", "list", "set", "frozenset", "tuple", "int", "float",
                                          "str", "bytes", "bytearray", "complex")}


def _reconstructor(cls, base, state=None):
    for obj, what in ((cls, "class"), (base, "base")):
        if isinstance(obj, _Dangerous):
            raise _would_call(obj, f"copyreg._reconstructor (as the {what})")
    if isinstance(cls, PlaceholderClass):
        return Placeholder(cls, ())
    if isinstance(cls, _Handler) and cls.fn is not None and cls.kind == "data":
        return cls.fn()
    raise CorruptCheckpoint("copyreg._reconstructor on something that is not a class")


def _newobj(cls, *args):
    if isinstance(cls, _Dangerous):
        raise _would_call(cls, "copyreg.__newobj__ (as the class)")
    if isinstance(cls, PlaceholderClass):
        return Placeholder(cls, args)
    if isinstance(cls, _Handler) and cls.fn is not None:
        return cls.fn(*args)
    raise CorruptCheckpoint("__newobj__ on something that is not a class")


# numpy -------------------------------------------------------------------------

class _NumpyDtype:
    __slots__ = ("spec", "order")

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str):
            raise CorruptCheckpoint("numpy dtype spec is not a string")
        self.spec = spec
        self.order = "|"

    def build(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
            self.order = state[1]

    def resolve(self):
        import numpy as np

        spec = self.spec
        if self.order in "<>" and spec[:1] not in "<>|=":
            spec = self.order + spec
        try:
            dt = np.dtype(spec)
        except TypeError as e:
            raise CorruptCheckpoint(f"unknown numpy dtype {self.spec!r}") from e
        return dt


class _NumpyArray:
    __slots__ = ("value",)

    def __init__(self, *args):
        self.value = None

    def build(self, state):
        import numpy as np

        if not isinstance(state, tuple) or len(state) != 5:
            raise CorruptCheckpoint("numpy array state is malformed")
        _, shape, dtype, fortran, raw = state
        shape = _ints(shape, "numpy shape")
        dt = dtype.resolve() if isinstance(dtype, _NumpyDtype) else None
        if dt is None:
            raise CorruptCheckpoint("numpy array without a dtype")
        n = 1
        for s in shape:
            n *= s
        if dt.hasobject:
            if not isinstance(raw, list) or len(raw) != n:  # before allocating: n comes from the pickle
                raise CorruptCheckpoint("numpy object array state is malformed")
            arr = np.empty(shape, dtype=object)
            for i, v in enumerate(raw):
                arr.flat[i] = v
        else:
            if isinstance(raw, str):
                raw = raw.encode("latin1")
            if not isinstance(raw, bytes | bytearray) or len(raw) != n * dt.itemsize:
                raise CorruptCheckpoint(f"numpy array of shape {list(shape)} and dtype {dt} "
                                        f"has {len(raw) if hasattr(raw, '__len__') else '?'} bytes of data")
            arr = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()
        _charge(arr.nbytes if not dt.hasobject else 8 * arr.size)
        self.value = arr


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, _NumpyDtype):
        raise CorruptCheckpoint("numpy scalar without a dtype")
    dt = dtype.resolve()
    if isinstance(data, str):
        data = data.encode("latin1")
    if dt.hasobject or not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise CorruptCheckpoint("numpy scalar data is malformed")
    return np.frombuffer(data, dtype=dt)[0]


def _numpy_frombuffer(buf, dtype, shape, order):
    import numpy as np

    dt = dtype.resolve() if isinstance(dtype, _NumpyDtype) else None
    if dt is None or dt.hasobject or not isinstance(buf, bytes | bytearray):
        raise CorruptCheckpoint("numpy buffer is malformed")
    shape = _ints(shape, "numpy shape")
    n = 1
    for s in shape:
        n *= s
    if len(buf) != n * dt.itemsize:
        raise CorruptCheckpoint("numpy buffer size does not match its shape")
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape, order=order if order in ("C", "F") else "C").copy()


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
    h[("torch.storage", "UntypedStorage")] = (None, StorageType("UntypedStorage", torch.uint8))
    h[("torch.storage", "TypedStorage")] = (None, StorageType("TypedStorage", torch.uint8))
    return h


_TENSOR = _tensor_handlers()

_DATA: dict[tuple[str, str], tuple[Callable | None, Any]] = {
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
    ("copyreg", "_reconstructor"): (_reconstructor, None),
    ("copyreg", "__newobj__"): (_newobj, None),
    ("codecs", "encode"): (_codecs_encode, None),
    ("datetime", "datetime"): (_plain_ctor(datetime.datetime, "datetime"), None),
    ("datetime", "date"): (_plain_ctor(datetime.date, "datetime"), None),
    ("datetime", "time"): (_plain_ctor(datetime.time, "datetime"), None),
    ("datetime", "timedelta"): (_plain_ctor(datetime.timedelta, "datetime"), None),
    ("numpy._core.multiarray", "_reconstruct"): (lambda cls, shape, dtype: _NumpyArray(), None),
    ("numpy._core.multiarray", "scalar"): (_numpy_scalar, None),
    ("numpy._core.numeric", "_frombuffer"): (_numpy_frombuffer, None),
    ("numpy", "dtype"): (_NumpyDtype, None),
    ("numpy", "ndarray"): (None, "ndarray"),
    # TorchScript's pickles (``constants.pkl``, ``*.debug_pkl``) tag typed lists with these helpers
    ("torch.jit._pickle", "restore_type_tag"): (lambda value, type_str=None: value, None),
}
for _n in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_complexlist"):
    _DATA[("torch.jit._pickle", _n)] = (lambda data=(): list(data) if isinstance(data, list | tuple) else [], None)
for _dtname in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_",
                "Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
    _DATA[("numpy", _dtname)] = (None, _dtname)
    _DATA[("numpy.dtypes", _dtname)] = (None, _dtname)


def classify(module: str, name: str) -> Kind:
    """How ckptfit treats the global ``module.name`` (after alias normalisation)."""
    raw = (module, name)
    module, name = _normalise(module, name)
    if (module, name) in _TENSOR or (module == "torch" and _torch_constant(name) is not None):
        return "tensor"
    if (module, name) in _DATA:
        return "data"
    if _is_dangerous(module, name) or _is_dangerous(*raw):
        return "dangerous"
    return "unknown"


# Classes ckptfit reads as inert placeholders that are also inert under real unpickling
# (``torch.load(weights_only=False)``): importing their module runs only library code, and
# creating them (``cls.__new__``, ``cls(*args)``, ``__setstate__`` / ``__dict__`` update) runs
# nothing the file chose. Matched exactly, like every table here; a dotted name never matches.
_INERT: frozenset[tuple[str, str]] = frozenset({
    ("argparse", "Namespace"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
    *(("pathlib._local", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                      "PureWindowsPath")),
    ("typing", "Any"),
    ("torch.torch_version", "TorchVersion"),
    # OmegaConf configs (Lightning's hyper_parameters): containers, nodes and their metadata
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"),
    *(("omegaconf.nodes", n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                       "BytesNode", "PathNode", "EnumNode")),
    # torch.distributed.checkpoint's .metadata: plain dataclasses and one enum
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})
_TORCH_NN_PREFIX = "torch.nn.modules."


def is_inert(module: str, name: str) -> bool:
    """Whether the class ``module.name`` is known to be inert under real unpickling too.

    True for the exact entries of a fixed table (``argparse.Namespace``, ``pathlib`` paths,
    OmegaConf containers, DCP metadata classes, ``typing.Any``) and for the ``nn.Module``
    classes of ``torch.nn`` itself (``torch.nn.modules.linear.Linear``): torch has already
    imported them, and their ``__new__``/``__setstate__`` only store attributes. A module class
    from anywhere else is not: importing its module runs that module's code.
    """
    module, name = _normalise(module, name)
    if (module, name) in _INERT:
        return True
    if module.startswith(_TORCH_NN_PREFIX) and name.isidentifier() and not name.startswith("_"):
        import sys

        mod = sys.modules.get(module)  # never imported here: torch imports all of torch.nn.modules
        cls = vars(mod).get(name) if mod is not None else None
        return (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module
                and cls.__qualname__ == name)
    return False


def _torch_constant(name: str) -> Any:
    """``torch.float32``, ``torch.strided``, ``torch.channels_last`` ... looked up without ``getattr``
    (``torch.__getattr__`` imports submodules lazily; a pickle must never trigger an import)."""
    v = vars(torch).get(name)
    return v if isinstance(v, torch.dtype | torch.layout | torch.memory_format) else None


# --------------------------------------------------------------------------- the interpreter

class _Mark:
    __slots__ = ()


_MARK = _Mark()


class _Frame:
    __slots__ = ("end",)


def interpret(data: bytes | memoryview, *, persistent_load: Callable[[Any], Any] | None = None,
              start: int = 0, member: str = "", path: str | None = None,
              allow_trailing: bool = False) -> tuple[Any, PickleScan]:
    """Run one pickle in ``data`` (from ``start``) on ckptfit's restricted stack machine.

    Args:
        data: the bytes holding the pickle.
        persistent_load: called with each persistent id (torch's storage references); its
            result is pushed. Without it a persistent id is an error.
        start: where the pickle starts in ``data``.
        member: a name for messages and the scan (zip member, ``pickle #2``).
        path: the file, for messages.
        allow_trailing: whether bytes after STOP are expected (legacy files hold several
            pickles); otherwise they are recorded as an anomaly.

    Returns:
        ``(value, scan)``: the rebuilt object (tensors as :class:`LazyTensor`, unknown
        objects as :class:`Placeholder`) and the :class:`PickleScan` of everything referenced.
        Dangerous globals are *not* raised here; see :func:`load_pickle`.

    Raises:
        CorruptCheckpoint: malformed or truncated pickle (never a raw pickle/struct error).
        ResourceLimitExceeded: memo, stack or sizes beyond sane limits.
    """
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    n = len(mv)
    scan = PickleScan(member=member)
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    pos = start
    frame_end = -1  # -1: not inside a frame
    globals_idx: dict[int, int] = {}  # id(handle) -> index in scan.globals
    kinds: dict[tuple[str, str], Kind] = {}  # classification of each distinct global, once
    unpack = struct.unpack_from
    alloc = 0  # estimated bytes of Python objects built so far (see MAX_OBJECT_BYTES)

    def fail(msg: str) -> CorruptCheckpoint:
        where = f" (in {member})" if member else ""
        return CorruptCheckpoint(f"damaged pickle data at byte {pos}{where}: {msg}", path=path,
                                 hint="the file is truncated or corrupt; download or copy it again")

    def need(k: int) -> None:
        if pos + k > n:
            raise fail("the data ends in the middle of an opcode")
        if frame_end >= 0 and pos + k > frame_end:
            raise fail("an opcode crosses the end of its FRAME")

    def pop_mark() -> list:
        nonlocal stack
        if not metastack:
            raise fail("MARK expected on the stack")
        items = stack
        stack = metastack.pop()
        return items

    def find(module: str, name: str, opcode: str, at: int) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise fail("global name is not a string")
        module, name = _normalise(module, name)
        kind = kinds.get((module, name))
        if kind is None:
            if len(kinds) >= MAX_DISTINCT_GLOBALS:
                raise ResourceLimitExceeded(f"the pickle names more than {MAX_DISTINCT_GLOBALS} distinct globals; no "
                                            f"checkpoint needs that many", path=path)
            kind = kinds[(module, name)] = classify(module, name)
        if len(scan.globals) >= MAX_GLOBALS:
            raise ResourceLimitExceeded(f"the pickle references globals more than {MAX_GLOBALS} times; no checkpoint "
                                        f"does (torch memoises each global once)", path=path)
        idx = len(scan.globals)
        nonlocal alloc
        alloc += 200  # the GlobalRef record, its strings and its handle
        scan.globals.append(GlobalRef(module, name, kind, opcode, at, member=member))
        if kind == "tensor":
            if (module, name) in _TENSOR:
                fn, value = _TENSOR[(module, name)]
                if fn is None and isinstance(value, StorageType):
                    obj: Any = value
                else:
                    obj = _Handler(module, name, fn, kind, value)
            else:
                obj = _torch_constant(name)  # a dtype / layout / memory format constant
        elif kind == "data":
            fn, value = _DATA[(module, name)]
            obj = _Handler(module, name, fn, kind, value)
        elif kind == "dangerous":
            obj = _Dangerous(module, name, idx)
        else:
            obj = PlaceholderClass(module, name)
        globals_idx[id(obj)] = idx
        return obj

    calls = scan.calls
    refs = scan.globals

    def mark_called(obj: Any) -> None:
        idx = globals_idx.get(id(obj))
        if idx is None:
            return
        calls[idx] = calls.get(idx, 0) + 1
        g = refs[idx]
        if not g.called:
            refs[idx] = GlobalRef(g.module, g.name, g.kind, g.opcode, g.position, True, g.member)

    def call(fn: Any, args: Any, kwargs: dict | None = None) -> Any:
        nonlocal alloc
        alloc += 160 + _take_charge()
        if type(args) is not tuple and not isinstance(args, tuple):
            if isinstance(args, list):
                args = tuple(args)
            else:
                raise fail("call arguments are not a tuple")
        mark_called(fn)
        # the classes below are unrelated, so the order of these tests only matters for speed
        if isinstance(fn, _Handler):  # torch's rebuild functions, OrderedDict ...: by far the most called
            if fn.fn is None:
                if fn.value in ("Tensor", "Parameter", "Buffer") and not args:
                    return Placeholder(PlaceholderClass(fn.module, fn.name), args)
                return Placeholder(PlaceholderClass(fn.module, fn.name), args, kwargs)
            if fn.fn is _reconstructor and len(args) >= 2:
                base = args[1]
                if not (isinstance(base, _Handler) and (base.module, base.name) in _PLAIN_BASES):
                    bq = base.qualname if isinstance(base, PlaceholderClass) else (
                        f"{base.module}.{base.name}" if isinstance(base, _Handler | _Dangerous) else type(base).__name__)
                    scan.unsafe_uses.append(f"copyreg._reconstructor at byte {at} would call {bq}.__init__ "
                                            f"(a base other than object)")
            try:
                return fn.fn(*args, **kwargs) if kwargs else fn.fn(*args)
            except (CorruptCheckpoint, UnsupportedFormat, UnsafeCheckpoint):
                raise
            except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError,
                    RuntimeError) as e:
                raise fail(f"{fn.module}.{fn.name} got unexpected arguments ({e})") from e
        if isinstance(fn, _Dangerous):
            return Placeholder(PlaceholderClass(fn.module, fn.name), args)
        if isinstance(fn, PlaceholderClass):
            return Placeholder(fn, args, kwargs)
        if isinstance(fn, StorageType):
            return Placeholder(PlaceholderClass("torch", fn.name), args)
        if isinstance(fn, Placeholder):  # calling an object built by the pickle
            # real unpickling would run its __call__ (a module's forward and hooks): no checkpoint does this.
            # (A persistent id stands for what the file format's loader returns: legacy files' module classes.)
            if fn.cls.module != "<persistent id>":
                scan.unsafe_uses.append(f"the pickle calls a {fn.qualname} object it built, at byte {at} "
                                        f"(real unpickling would run its __call__)")
            return Placeholder(fn.cls, args, kwargs)
        raise fail(f"the pickle calls a {type(fn).__name__}, which is not callable")

    def build(obj: Any, state: Any) -> None:
        if isinstance(obj, Placeholder):
            obj.state = state
        elif isinstance(obj, _NumpyArray | _NumpyDtype):
            obj.build(state)
        elif isinstance(obj, LazyTensor):
            pass  # tensor python state (e.g. an attribute set on it): ignored
        elif isinstance(obj, dict) and isinstance(state, dict):
            # torch's state dicts carry `_metadata` as an attribute of the OrderedDict
            if isinstance(obj, collections.OrderedDict):
                for k, v in state.items():
                    if k == "_metadata":
                        try:
                            obj._metadata = v  # type: ignore[attr-defined]
                        except AttributeError:
                            pass
        elif isinstance(obj, collections.Counter | set | list | tuple | str | bytes | int | float | type(None)):
            pass
        else:
            raise fail(f"BUILD applied to a {type(obj).__name__}")

    def setitems(target: Any, items: list) -> None:
        if len(items) % 2:
            raise fail("SETITEMS with an odd number of items")
        nonlocal alloc
        alloc += 40 * len(items)
        if isinstance(target, dict):
            try:
                for i in range(0, len(items), 2):
                    k = items[i]
                    if type(k) is not str:
                        _check_key(k)
                    target[k] = items[i + 1]
            except TypeError as e:
                raise fail(f"unhashable dict key ({e})") from e
        elif isinstance(target, Placeholder):
            for i in range(0, len(items), 2):
                k = items[i]
                try:
                    _check_key(k)
                    target.dict_items[k] = items[i + 1]
                except (TypeError, CorruptCheckpoint):
                    target.dict_items[f"<unhashable key #{len(target.dict_items)}>"] = items[i + 1]
        else:
            raise fail(f"SETITEM on a {type(target).__name__}")

    def appends(target: Any, items: list) -> None:
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.list_items.extend(items)
        elif isinstance(target, set):
            try:
                for item in items:
                    _check_key(item)
                target.update(items)
            except TypeError as e:
                raise fail(f"unhashable set item ({e})") from e
        else:
            raise fail(f"APPEND on a {type(target).__name__}")

    def text_line() -> bytes:
        nonlocal pos
        if isinstance(data, bytes):
            end = data.find(b"\n", pos, pos + 65536)
            line = data[pos:end] if end >= 0 else b""
        else:
            window = bytes(mv[pos:pos + 65536])
            k = window.find(b"\n")
            end = pos + k if k >= 0 else -1
            line = window[:k] if k >= 0 else b""
        if end < 0:
            raise fail("unterminated text argument")
        if frame_end >= 0 and end + 1 > frame_end:
            raise fail("an opcode crosses the end of its FRAME")
        pos = end + 1
        return line

    def memo_put(idx: int) -> None:
        if not stack:
            raise fail("memo store on an empty stack")
        nonlocal alloc
        if idx < 0 or len(memo) >= max_memo:
            raise ResourceLimitExceeded(f"pickle memo exceeds {max_memo} entries or has a bad index", path=path)
        alloc += 100
        memo[idx] = stack[-1]

    def memo_get(idx: int) -> None:
        if idx not in memo:
            raise fail(f"memo entry {idx} is used before it is defined")
        stack.append(memo[idx])

    if n - start > MAX_PICKLE_BYTES:
        raise ResourceLimitExceeded(f"pickle of {n - start} bytes exceeds the {MAX_PICKLE_BYTES}-byte limit",
                                    path=path)
    # Everything built here counts towards MAX_OBJECT_BYTES, garbage included, so the cyclic collector
    # can wait until the end; run meanwhile, it re-walks the growing memo many times (see ckptfit._gc).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    _take_charge()  # anything left by an earlier pickle that stopped with an error
    # Limits read once (tests and users may change the module's values between calls).
    max_objects, max_stack, max_memo = MAX_OBJECT_BYTES, MAX_STACK, MAX_MEMO
    # Every opcode adds at least 8 to `alloc` and pushes at most one item on the stack (MARK starts an
    # empty one), so before each opcode len(stack) < alloc / 8: neither limit can be exceeded while
    # `alloc` is at most `check_from`, and the stack is measured only past it.
    check_from = min(max_objects, 8 * max_stack)
    # No opcode argument may cross `limit`: the end of the current FRAME, else of the data (a frame
    # never ends past the data). `pos + k > limit` is the fast test; need(k) then says which end.
    limit = n
    try:
        while True:
            if pos >= limit:
                if frame_end >= 0 and pos == frame_end:
                    frame_end = -1
                    limit = n
                if pos >= n:
                    raise fail("the pickle ends before its STOP opcode")
            at = pos
            op = mv[pos]
            pos += 1
            alloc += 8
            if alloc > check_from and (alloc > max_objects or len(stack) > max_stack):
                where = f" ({member})" if member else ""
                raise ResourceLimitExceeded(
                    f"the pickle{where} builds more than {max_objects >> 20} MiB of Python objects by byte "
                    f"{at} (a memory bomb?); ckptfit stopped before allocating more", path=path,
                    hint="no checkpoint's structure needs that much; nothing was executed. If this is a genuine "
                         "checkpoint with a huge pickle, raise ckptfit.safety.MAX_OBJECT_BYTES, or save the weights "
                         "with safetensors")
            # ---- most frequent opcodes first (torch.save writes protocol 2: LONG_BINPUT after 256 memo entries)
            if op == 0x72:  # LONG_BINPUT
                if pos + 4 > limit: need(4)
                idx = unpack("<I", mv, pos)[0]
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[idx] = stack[-1]
                else:
                    memo_put(idx)  # raises
                pos += 4
            elif op == 0x68:  # BINGET
                if pos >= limit: need(1)
                idx = mv[pos]
                if idx not in memo: memo_get(idx)  # raises
                stack.append(memo[idx]); pos += 1
            elif op == 0x4B:  # BININT1
                if pos >= limit: need(1)
                stack.append(mv[pos]); pos += 1
            elif op == 0x71:  # BINPUT
                if pos >= limit: need(1)
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[mv[pos]] = stack[-1]
                else:
                    memo_put(mv[pos])  # raises
                pos += 1
            elif op == 0x28:  # MARK
                metastack.append(stack); stack = []; alloc += 64
            elif op == 0x58:  # BINUNICODE
                if pos + 4 > limit: need(4)
                (k,) = unpack("<I", mv, pos); pos += 4
                if pos + k > limit: need(k)
                stack.append(str(mv[pos:pos + k], "utf-8", "surrogatepass")); pos += k
            elif op == 0x74:  # TUPLE
                if not metastack: raise fail("MARK expected on the stack")
                stack_items = stack; stack = metastack.pop()
                stack.append(tuple(stack_items)); alloc += 48 + 8 * len(stack_items)
            elif op == 0x52:  # REDUCE
                if len(stack) < 2: raise fail("REDUCE needs a callable and arguments")
                args = stack.pop(); fn = stack[-1]; stack[-1] = call(fn, args)
            elif op == 0x94:  # MEMOIZE
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[len(memo)] = stack[-1]
                else:
                    memo_put(len(memo))  # raises
            elif op == 0x8C:  # SHORT_BINUNICODE
                if pos >= limit: need(1)
                k = mv[pos]; pos += 1
                if pos + k > limit: need(k)
                stack.append(str(mv[pos:pos + k], "utf-8", "surrogatepass")); pos += k
            elif op == 0x51:  # BINPERSID
                if not stack: raise fail("BINPERSID on an empty stack")
                pid = stack.pop()
                if persistent_load is None:
                    raise fail("persistent id found, but this kind of file has no storage records")
                stack.append(persistent_load(pid))
            elif op == 0x86:  # TUPLE2
                if len(stack) < 2: raise fail("TUPLE2 needs two items")
                b = stack.pop(); stack[-1] = (stack[-1], b); alloc += 64
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x85:  # TUPLE1
                if not stack: raise fail("TUPLE1 on an empty stack")
                stack[-1] = (stack[-1],); alloc += 56
            elif op == 0x4D:  # BININT2
                if pos + 2 > limit: need(2)
                stack.append(unpack("<H", mv, pos)[0]); pos += 2; alloc += 32
            elif op == 0x4A:  # BININT
                if pos + 4 > limit: need(4)
                stack.append(unpack("<i", mv, pos)[0]); pos += 4; alloc += 32
            elif op == 0x87:  # TUPLE3
                if len(stack) < 3: raise fail("TUPLE3 needs three items")
                c = stack.pop(); b = stack.pop(); stack[-1] = (stack[-1], b, c); alloc += 72
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({}); alloc += 256
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([]); alloc += 64
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                if not stack: raise fail("SETITEMS without a dict")
                setitems(stack[-1], items)
            elif op == 0x73:  # SETITEM
                if len(stack) < 3: raise fail("SETITEM needs a dict, a key and a value")
                v = stack.pop(); k = stack.pop(); setitems(stack[-1], [k, v])
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                if not stack: raise fail("APPENDS without a list")
                appends(stack[-1], items)
            elif op == 0x61:  # APPEND
                if len(stack) < 2: raise fail("APPEND needs a list and an item")
                v = stack.pop(); appends(stack[-1], [v])
            elif op == 0x62:  # BUILD
                if len(stack) < 2: raise fail("BUILD needs an object and a state")
                state = stack.pop(); build(stack[-1], state)
            elif op == 0x63:  # GLOBAL
                mod = text_line().decode("utf-8", "replace"); name = text_line().decode("utf-8", "replace")
                stack.append(find(mod, name, "GLOBAL", at))
            elif op == 0x93:  # STACK_GLOBAL
                if len(stack) < 2: raise fail("STACK_GLOBAL needs a module and a name")
                name = stack.pop(); mod = stack.pop()
                stack.append(find(mod, name, "STACK_GLOBAL", at))
            elif op == 0x81:  # NEWOBJ
                if len(stack) < 2: raise fail("NEWOBJ needs a class and arguments")
                args = stack.pop(); cls = stack[-1]; stack[-1] = call(cls, args)
            elif op == 0x92:  # NEWOBJ_EX
                if len(stack) < 3: raise fail("NEWOBJ_EX needs a class, arguments and keywords")
                kwargs = stack.pop(); args = stack.pop(); cls = stack[-1]
                if not isinstance(kwargs, dict): raise fail("NEWOBJ_EX keywords are not a dict")
                stack[-1] = call(cls, args, kwargs)
            elif op == 0x80:  # PROTO
                need(1); scan.protocol = mv[pos]; pos += 1
                if scan.protocol > 5:
                    raise fail(f"unsupported pickle protocol {scan.protocol}")
            elif op == 0x95:  # FRAME
                need(8); (k,) = unpack("<Q", mv, pos); pos += 8
                if frame_end >= 0:
                    raise fail("a new FRAME begins before the end of the current one")
                if pos + k > n:
                    raise fail(f"FRAME of {k} bytes runs past the end of the data")
                frame_end = pos + k if k else -1
                limit = frame_end if k else n
            elif op == 0x2E:  # STOP
                if metastack:
                    scan.anomalies.append(f"{len(metastack)} unclosed MARK(s) at STOP")
                if len(stack) != 1:
                    if not stack:
                        raise fail("STOP on an empty stack")
                    scan.anomalies.append(f"{len(stack) - 1} extra item(s) left on the stack at STOP")
                if frame_end >= 0 and pos != frame_end:
                    raise fail("STOP before the end of its FRAME")
                scan.end = pos
                alloc += _take_charge()
                if alloc > max_objects:
                    raise ResourceLimitExceeded(f"the pickle builds more than {max_objects >> 20} MiB of Python "
                                                f"objects (a memory bomb?)", path=path)
                if pos < n and not allow_trailing:
                    scan.anomalies.append(f"{n - pos} byte(s) of trailing data after STOP")
                    merge_extra(scan, scan_trailing(data, pos, member=member, path=path))
                return stack[-1], scan
            elif op == 0x6A:  # LONG_BINGET
                need(4); memo_get(unpack("<I", mv, pos)[0]); pos += 4
            elif op == 0x47:  # BINFLOAT
                need(8); stack.append(unpack(">d", mv, pos)[0]); pos += 8; alloc += 24
            elif op == 0x8A:  # LONG1
                need(1); k = mv[pos]; pos += 1; need(k)
                stack.append(int.from_bytes(mv[pos:pos + k], "little", signed=True)); pos += k
            elif op == 0x8B:  # LONG4
                need(4); (k,) = unpack("<i", mv, pos); pos += 4
                if k < 0 or k > MAX_INT_BYTES:
                    raise ResourceLimitExceeded(f"LONG4 integer of {k} bytes", path=path)
                need(k); stack.append(int.from_bytes(mv[pos:pos + k], "little", signed=True)); pos += k
            elif op == 0x43:  # SHORT_BINBYTES
                need(1); k = mv[pos]; pos += 1; need(k); stack.append(bytes(mv[pos:pos + k])); pos += k
            elif op == 0x42:  # BINBYTES
                need(4); (k,) = unpack("<I", mv, pos); pos += 4; need(k)
                stack.append(bytes(mv[pos:pos + k])); pos += k
            elif op == 0x8E:  # BINBYTES8
                need(8); (k,) = unpack("<Q", mv, pos); pos += 8; need(k)
                stack.append(bytes(mv[pos:pos + k])); pos += k
            elif op == 0x96:  # BYTEARRAY8
                need(8); (k,) = unpack("<Q", mv, pos); pos += 8; need(k)
                stack.append(bytearray(mv[pos:pos + k])); pos += k
            elif op == 0x8D:  # BINUNICODE8
                need(8); (k,) = unpack("<Q", mv, pos); pos += 8; need(k)
                stack.append(str(mv[pos:pos + k], "utf-8", "surrogatepass")); pos += k
            elif op == 0x54:  # BINSTRING
                need(4); (k,) = unpack("<i", mv, pos); pos += 4
                if k < 0: raise fail("negative BINSTRING length")
                need(k); stack.append(bytes(mv[pos:pos + k]).decode("latin1")); pos += k
            elif op == 0x55:  # SHORT_BINSTRING
                need(1); k = mv[pos]; pos += 1; need(k)
                stack.append(bytes(mv[pos:pos + k]).decode("latin1")); pos += k
            elif op == 0x8F:  # EMPTY_SET
                stack.append(set()); alloc += 256
            elif op == 0x90:  # ADDITEMS
                items = pop_mark()
                if not stack or not isinstance(stack[-1], set): raise fail("ADDITEMS without a set")
                appends(stack[-1], items)
            elif op == 0x91:  # FROZENSET
                items = pop_mark()
                alloc += 256 + 40 * len(items)
                for item in items:
                    _check_key(item)
                try:
                    stack.append(frozenset(items))
                except TypeError as e:
                    raise fail(f"unhashable frozenset item ({e})") from e
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                if not stack: raise fail("DUP on an empty stack")
                stack.append(stack[-1])
            elif op == 0x64:  # DICT
                items = pop_mark(); d: dict = {}; setitems(d, items); stack.append(d); alloc += 240
            elif op == 0x6C:  # LIST
                items = pop_mark(); stack.append(items); alloc += 64
            elif op == 0x69:  # INST
                mod = text_line().decode("utf-8", "replace"); name = text_line().decode("utf-8", "replace")
                cls = find(mod, name, "INST", at)
                args = tuple(pop_mark())
                stack.append(call(cls, args))
            elif op == 0x6F:  # OBJ
                items = pop_mark()
                if not items: raise fail("OBJ without a class")
                stack.append(call(items[0], tuple(items[1:])))
            elif op == 0x50:  # PERSID
                pid = text_line().decode("ascii", "replace")
                if persistent_load is None:
                    raise fail("persistent id found, but this kind of file has no storage records")
                stack.append(persistent_load(pid))
            elif op == 0x49:  # INT
                line = text_line()
                if line == b"00":
                    stack.append(False)
                elif line == b"01":
                    stack.append(True)
                else:
                    if len(line) > 4300:
                        raise ResourceLimitExceeded("INT literal too long", path=path)
                    stack.append(int(line))
            elif op == 0x4C:  # LONG
                line = text_line()
                if len(line) > 4300:
                    raise ResourceLimitExceeded("LONG literal too long", path=path)
                stack.append(int(line.rstrip(b"L")))
            elif op == 0x46:  # FLOAT
                stack.append(float(text_line()))
            elif op == 0x53:  # STRING
                line = text_line()
                if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
                    raise fail("STRING argument is not quoted")
                stack.append(codecs.escape_decode(line[1:-1])[0].decode("latin1"))
            elif op == 0x56:  # UNICODE
                stack.append(str(text_line(), "raw-unicode-escape"))
            elif op == 0x67:  # GET
                memo_get(int(text_line()))
            elif op == 0x70:  # PUT
                memo_put(int(text_line()))
            elif op in (0x82, 0x83, 0x84):  # EXT1/2/4: the copyreg extension registry can name any callable
                k = {0x82: 1, 0x83: 2, 0x84: 4}[op]
                need(k); code = int.from_bytes(mv[pos:pos + k], "little"); pos += k
                ref = GlobalRef("copyreg", f"extension #{code}", "dangerous", f"EXT{k}", at, member=member)
                scan.globals.append(ref)
                obj = _Dangerous("copyreg", f"extension #{code}", len(scan.globals) - 1)
                globals_idx[id(obj)] = len(scan.globals) - 1
                stack.append(obj)
            elif op == 0x97:  # NEXT_BUFFER
                raise fail("out-of-band buffers (NEXT_BUFFER) are not part of any checkpoint format")
            elif op == 0x98:  # READONLY_BUFFER
                pass
            else:
                raise fail(f"unknown opcode 0x{op:02x}")
    except (CorruptCheckpoint, UnsupportedFormat, UnsafeCheckpoint) as e:
        if e.path is None and path is not None:
            e.path = path
            e.args = (f"{path}: {e.args[0]}",) if e.args else e.args
        if not isinstance(e, UnsafeCheckpoint) and scan.dangerous:
            raise _unsafe_instead(e, scan, path) from e
        e.partial_scan = scan  # type: ignore[attr-defined]  # what was referenced before the error
        raise
    except RecursionError as e:  # pragma: no cover - the machine is iterative
        err = ResourceLimitExceeded("pickle nesting too deep", path=path)
        err.partial_scan = scan  # type: ignore[attr-defined]
        raise err from e
    except MemoryError as e:
        err = ResourceLimitExceeded("pickle needs more memory than allowed", path=path)
        err.partial_scan = scan  # type: ignore[attr-defined]
        raise err from e
    except (ValueError, UnicodeDecodeError, OverflowError, struct.error, IndexError, TypeError, KeyError,
            AttributeError) as e:
        err = fail(f"{type(e).__name__}: {e}"[:300])
        if scan.dangerous:
            raise _unsafe_instead(err, scan, path) from e
        err.partial_scan = scan  # type: ignore[attr-defined]
        raise err from e
    finally:
        # Drop the machine's own references (the value, if any, was taken above): an error's traceback
        # keeps this frame alive, and with it up to MAX_OBJECT_BYTES of half-built objects.
        stack.clear()
        metastack.clear()
        memo.clear()
        _take_charge()
        if gc_was_enabled:
            gc.enable()


def _unsafe_instead(e: Exception, scan: PickleScan, path: str | None) -> UnsafeCheckpoint:
    """A pickle that names code to run and then fails to rebuild is refused as unsafe, not as damaged.

    Whatever stopped the interpreter (a dangerous callable passed as an argument, used as a
    class, built upon), real unpickling would have reached the code first; users catch
    :class:`UnsafeCheckpoint` to quarantine such files.
    """
    names = list(dict.fromkeys(g.qualname for g in scan.dangerous))
    detail = getattr(e, "detail", str(e)).splitlines()[0].replace("_Dangerous", "dangerous callable")
    err = UnsafeCheckpoint(f"refusing to load: its pickled data references code that would run on load: "
                           f"{', '.join(names)} (the pickle then stops: {detail})", path=path, globals=names,
                           hint="nothing was executed. Do not load this file unless you wrote it yourself; "
                                "`ckptfit scan` lists every reference. No automatic unsafe fallback is performed.")
    err.partial_scan = scan  # type: ignore[attr-defined]
    return err


def _inert_persistent(pid: Any) -> Placeholder:
    return Placeholder(PlaceholderClass("<persistent id>", "ref"), (pid,))


def scan_trailing(data: bytes | memoryview, start: int, *, member: str = "",
                  path: str | None = None) -> list[PickleScan]:
    """Interpret whatever pickles follow ``start`` (bytes after a pickle's STOP), with the same machine.

    ``torch.load`` ignores them, but another tool may not: a file that hides ``os.system`` in a
    second pickle is reported, and refused, like one that hides it in the first. Bytes that are
    not a pickle end the walk (the caller has already recorded them as trailing data).
    """
    n = len(data)
    out: list[PickleScan] = []
    pos = start
    while pos < n and len(out) < MAX_EXTRA_PICKLES:
        label = f"{member + ' ' if member else ''}extra pickle at byte {pos}"
        try:
            _, sc = interpret(data, start=pos, member=label, path=path, allow_trailing=True,
                              persistent_load=_inert_persistent)
        except (CorruptCheckpoint, UnsupportedFormat) as e:
            partial = getattr(e, "partial_scan", None)
            if partial is not None and partial.globals:  # a damaged pickle still names what it would run
                partial.anomalies.insert(0, f"the bytes after STOP at byte {pos} hold a damaged pickle")
                out.append(partial)
            break
        sc.anomalies.insert(0, f"an extra pickle follows STOP at byte {pos} (torch.load ignores it; other "
                               f"tools may not)")
        out.append(sc)
        if sc.end <= pos:
            break
        pos = sc.end
    return out


def merge_extra(scan: PickleScan, extra: Iterable[PickleScan]) -> None:
    """Fold the scans of extra pickles into ``scan`` (their globals keep their own member label)."""
    for sc in extra:
        base = len(scan.globals)
        scan.globals.extend(sc.globals)
        scan.calls.update({base + i: c for i, c in sc.calls.items()})
        scan.anomalies.extend(f"{sc.member}: {a}" for a in sc.anomalies)


def short_repr(obj: Any, limit: int = 80) -> str:
    """A bounded rendering of a pickled value for messages (never an exponential ``repr``)."""
    text = repr(to_plain(obj, max_items=8, max_depth=3, max_nodes=40))
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_NAMED = 20  # dangerous globals named in a message; the error's `globals` holds all


def refuse_if_dangerous(scans: Iterable[PickleScan], *, path: str | None) -> None:
    """Raise :class:`UnsafeCheckpoint` naming every dangerous global in ``scans``."""
    found: dict[str, None] = {}  # ordered and O(1) per global: a pickle can name 100,000s of them
    for scan in scans:
        for g in scan.dangerous:
            found[g.qualname + (" (called)" if g.called else "")] = None
    bad = list(found)
    if bad:
        shown = ", ".join(bad[:_MAX_NAMED]) + (f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else "")
        raise UnsafeCheckpoint(
            f"refusing to load: its pickled data references code that would run on load: {shown}",
            path=path, globals=list(dict.fromkeys(b.removesuffix(" (called)") for b in bad)),
            hint="nothing was executed. Do not load this file unless you wrote it yourself; `ckptfit scan` "
                 "lists every reference. No automatic unsafe fallback is performed.")


MAX_DEPTH = 1000  # containers nested deeper than this are refused by the loader (no checkpoint comes close)
_LEAVES = (str, bytes, int, float, bool, type(None), LazyTensor, StorageRef)


def check_depth(value: Any, *, path: str | None = None, member: str = "") -> None:
    """Refuse a rebuilt value whose containers nest more than :data:`MAX_DEPTH` deep.

    The interpreter itself is iterative, but everything that later walks the tree (key paths
    such as ``a.0.0.0...``, reports, renderings) costs at least the square of the depth, so a
    1e6-deep list, a few MB of pickle, is stopped here. Walked breadth first, each object once.
    """
    level = [value]
    seen: set[int] = set()
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            where = f" ({member})" if member else ""
            raise ResourceLimitExceeded(f"the pickled data{where} nests containers more than {MAX_DEPTH} deep",
                                        path=path, hint="no checkpoint is shaped like this; nothing was executed")
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, _LEAVES) or id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, dict):
                nxt.extend(v for v in o.values() if not isinstance(v, _LEAVES))
            elif isinstance(o, list | tuple | set | frozenset):
                nxt.extend(v for v in o if not isinstance(v, _LEAVES))
            elif isinstance(o, Placeholder):
                nxt.extend(o.args)
                nxt.append(o.state)
                nxt.extend(o.list_items)
                nxt.extend(o.dict_items.values())
                nxt.extend(o.kwargs.values())
        level = nxt


def load_pickle(data: bytes | memoryview, *, persistent_load: Callable[[Any], Any] | None = None,
                start: int = 0, member: str = "", path: str | None = None,
                allow_trailing: bool = False) -> tuple[Any, PickleScan]:
    """:func:`interpret`, then refuse the file if anything dangerous was referenced or it nests absurdly."""
    value, scan = interpret(data, persistent_load=persistent_load, start=start, member=member, path=path,
                            allow_trailing=allow_trailing)
    refuse_if_dangerous([scan], path=path)
    check_depth(value, path=path, member=member)
    return value, scan


# --------------------------------------------------------------------------- plain rendering

def to_plain(obj: Any, *, max_items: int = 200, max_depth: int = 6, max_nodes: int = 5000) -> Any:
    """Render a rebuilt pickle value as JSON-ready plain data (for metadata and reports).

    Tensors become ``"<tensor float32 [3, 4]>"``, placeholders ``{"__class__": "argparse.Namespace", ...}``
    with their attributes, numpy values lists/numbers; output is bounded in size and depth, and
    shared references are rendered at most once per path (no exponential walk).
    """
    budget = [max_nodes]

    def rec(o: Any, depth: int, seen: frozenset) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return "..."
        if o is None or isinstance(o, bool | int | float | str):
            if isinstance(o, str) and len(o) > 500:
                return o[:500] + "..."
            return o
        if isinstance(o, LazyTensor):
            return f"<tensor {str(o.dtype).removeprefix('torch.')} {list(o.shape)}>"
        if isinstance(o, torch.dtype):
            return str(o)
        if isinstance(o, bytes | bytearray):
            return f"<{len(o)} bytes>"
        if id(o) in seen:
            return "<cycle>"
        if depth >= max_depth:
            return "..."
        seen = seen | {id(o)}
        try:
            import numpy as np

            if isinstance(o, np.ndarray):
                return o.tolist() if o.size <= max_items and not o.dtype.hasobject else f"<ndarray {o.dtype} {list(o.shape)}>"
            if isinstance(o, np.generic):
                return o.item()
        except ImportError:  # pragma: no cover
            pass
        if isinstance(o, dict):
            out = {}
            for i, (k, v) in enumerate(o.items()):
                if i >= max_items:
                    out["..."] = f"{len(o) - max_items} more"
                    break
                out[k if isinstance(k, str) else repr(k) if not isinstance(k, int) else str(k)] = rec(v, depth + 1, seen)
            return out
        if isinstance(o, list | tuple | set | frozenset):
            seq = list(o)
            out_l = [rec(v, depth + 1, seen) for v in seq[:max_items]]
            if len(seq) > max_items:
                out_l.append(f"... {len(seq) - max_items} more")
            return out_l
        if isinstance(o, Placeholder):
            q = o.qualname
            if q.startswith("pathlib.") and o.args and all(isinstance(a, str) for a in o.args):
                import pathlib  # pure paths only: string arithmetic, no file system access

                pure = pathlib.PureWindowsPath if "Windows" in q else pathlib.PurePosixPath
                return str(pure(*o.args[:max_items]))
            d: dict[str, Any] = {"__class__": q}
            if o.args:
                d["args"] = rec(list(o.args), depth + 1, seen)
            attrs = o.attributes()
            if attrs:
                d.update({str(k): rec(v, depth + 1, seen) for k, v in list(attrs.items())[:max_items]})
            elif o.state is not None:
                d["state"] = rec(o.state, depth + 1, seen)
            if o.dict_items:
                d["items"] = rec(o.dict_items, depth + 1, seen)
            if o.list_items:
                d["list"] = rec(o.list_items, depth + 1, seen)
            return d
        if isinstance(o, PlaceholderClass):
            return f"<class {o.qualname}>"
        if isinstance(o, _NumpyArray):
            return rec(o.value, depth, seen)
        if isinstance(o, datetime.date | datetime.time | datetime.timedelta):
            return str(o)
        return f"<{type(o).__name__}>"

    return rec(obj, 0, frozenset())
