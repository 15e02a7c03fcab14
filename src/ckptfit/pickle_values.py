"""The values the restricted interpreter builds that are not plain data, and its budget for building.

A class the pickle names but ckptfit does not rebuild is a :class:`PlaceholderClass`; calling
it gives an inert :class:`Placeholder` that records its arguments and state. A dangerous
callable is a :class:`DangerousRef` (never called), a known one a :class:`Handler` (rebuilt by
:mod:`ckptfit.pickle_rebuild` / :mod:`ckptfit.pickle_numpy`). Handlers charge what they
allocate with :func:`charge`, so a few bytes of pickle cannot make gigabytes of objects, and
check dict keys with :func:`check_key`, so hashing stays bounded.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import CorruptCheckpoint, ResourceLimitExceeded
from .pickle_policy import Kind

if TYPE_CHECKING:
    import torch

__all__ = ["PlaceholderClass", "Placeholder", "StorageType", "DangerousRef", "Handler", "int_tuple", "charge",
           "take_charge", "held", "check_key", "MAX_OBJECT_BYTES", "MAX_KEY_NODES", "MAX_KEY_DEPTH"]

# Python objects one pickle may build, in estimated bytes (pointers, containers, memo entries; not
# the bytes/str payloads, which are bounded by the file itself). One opcode byte can allocate a
# 232-byte set, so without this a 5 MB pickle could take 1 GB. A torch state dict costs about
# 2 KB per tensor here (20,000 tensors: 40 MB), so the limit allows ~390,000 tensors in one pickle.
# (The interpreter reads ckptfit.safety.MAX_OBJECT_BYTES, which starts as this value.)
MAX_OBJECT_BYTES = 768 << 20


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


class DangerousRef:
    """A dangerous callable as the pickle named it. Calling it records the call and returns a placeholder."""

    __slots__ = ("ref_index", "module", "name")

    def __init__(self, module: str, name: str, ref_index: int):
        self.module = module
        self.name = name
        self.ref_index = ref_index

    def __reduce__(self):
        raise TypeError("a ckptfit placeholder cannot be pickled")


class Handler:
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


def int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if type(x) is not tuple:  # (a plain tuple, the usual case, skips the test; torch.Size is a tuple)
        if not isinstance(x, tuple | list):
            raise CorruptCheckpoint(f"tensor {what} is not a tuple of integers: {type(x).__name__}")
    for i in x:  # (a loop: all() over a generator costs more than the check for 1-4 dimensions)
        if type(i) is not int:
            raise CorruptCheckpoint(f"tensor {what} is not a tuple of integers: {type(x).__name__}")
    return tuple(x)


# Bytes that handlers allocate beyond the interpreter's own per-opcode estimate (a bytearray(n), a copy
# of a memoised list, a numpy array, a tensor view that repeats its storage), not yet added to the
# running total of the pickle being interpreted: `interpret` takes them at its next call and at STOP.
_PENDING = threading.local()


def charge(n: int) -> None:
    """Count ``n`` bytes a handler holds against the current pickle's object budget (see :func:`take_charge`)."""
    if n <= 0:
        return
    total = getattr(_PENDING, "n", 0) + n
    _PENDING.n = total
    limit = getattr(_PENDING, "limit", MAX_OBJECT_BYTES)
    if total > limit:
        _PENDING.n = 0
        raise ResourceLimitExceeded(f"the pickle builds more than {limit >> 20} MiB of objects (a memory "
                                    f"bomb?); ckptfit stopped before allocating more",
                                    hint="no checkpoint's structure needs that much; nothing was executed")


def take_charge(limit: int | None = None) -> int:
    """The bytes charged since the last call (and reset); ``limit``, when given, becomes the budget that
    :func:`charge` enforces from now on in this thread (the interpreter passes its ``MAX_OBJECT_BYTES``)."""
    if limit is not None:
        _PENDING.limit = limit
        if not hasattr(_PENDING, "n"):
            _PENDING.n = 0  # so that the calls below find it (a missing attribute costs an exception each time)
    n = getattr(_PENDING, "n", 0)
    if n:
        _PENDING.n = 0
    return n


def held(value: Any) -> int:
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


def check_key(key: Any) -> None:
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
