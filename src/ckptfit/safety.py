"""One restricted pickle interpreter, used both to scan and to load: nothing in a file runs.

:func:`interpret` executes a pickle's opcodes (protocols 0-5) on a stack machine of its own.
Every global the pickle names is looked up in fixed tables (:mod:`ckptfit.pickle_policy`),
matched exactly as ``(module, name)``:

- **tensor machinery** (``torch._utils._rebuild_tensor_v2``, storages, dtypes ...) is
  rebuilt as :class:`~ckptfit.lazy.LazyTensor` objects: no tensor byte is read
  (:mod:`ckptfit.pickle_rebuild`);
- **known data** (``OrderedDict``, ``set``, numpy arrays and scalars, ``datetime`` ...) is
  rebuilt by our own code from plain values (:mod:`ckptfit.pickle_rebuild`,
  :mod:`ckptfit.pickle_numpy`);
- **anything else** (``argparse.Namespace``, ``pathlib`` paths, a user's ``nn.Module``
  subclass, OmegaConf containers) becomes an inert :class:`Placeholder` that records its
  class path, arguments and state; no module is imported, no ``__reduce__``,
  ``__setstate__`` or ``__getattr__`` of it ever runs (:mod:`ckptfit.pickle_values`);
- **dangerous** callables (``os.system``, ``builtins.eval``, ``subprocess``, ``importlib``,
  ``runpy``, ``pickle.loads`` ...) are never called: they are recorded, and the caller
  refuses the file naming each of them (a pickle that names one and then cannot be rebuilt,
  say because it passes one to a tensor rebuild function, is refused as unsafe too).

Placeholders are safe for ckptfit, which never imports them; :func:`is_inert` says which of
them are also safe under real unpickling (``torch.load(weights_only=False)``), the allowlist
behind ``ckptfit scan``'s ``clean`` verdict.

The same pass records every global, call and object construction with its opcode and
position (a :class:`PickleScan`), so ``ckptfit scan`` and loading can never disagree.

This module is the interpreter and the entry points around it, and it stays one module over
600 lines on purpose. What could leave it has: the policy tables (:mod:`ckptfit.pickle_policy`),
the rebuild emulation (:mod:`ckptfit.pickle_rebuild`, :mod:`ckptfit.pickle_numpy`), the values
it builds (:mod:`ckptfit.pickle_values`, :mod:`ckptfit.pickle_plain`). What is left is one thing:
:func:`interpret`, about 570 lines, and the ~100 lines of entry points that call it with its
limits and turn its failures into one error (:func:`load_pickle`, :func:`scan_trailing`,
:func:`refuse_if_dangerous`). :func:`interpret` is one long function on purpose: its opcode
dispatch is a single ``if``/``elif`` chain over local variables (the stack, the memo, the
position, the object budget), ordered by how often ``torch.save`` writes each opcode. Split into
methods or a dispatch table, each opcode would pay a call and attribute lookups, which is most
of the cost of reading a 20,000-tensor pickle, and the limits checked on every opcode would be
spread over many places. The limits are module globals read at each call
(``ckptfit.safety.MAX_OBJECT_BYTES`` can be raised), so they live here beside the machine.
"""
from __future__ import annotations

import codecs
import collections
import gc
import struct
from collections.abc import Callable, Iterable
from typing import Any

from .errors import CorruptCheckpoint, ResourceLimitExceeded, UnsafeCheckpoint, UnsupportedFormat
from .lazy import LazyTensor
from .pickle_numpy import NumpyArray, NumpyDtype
from .pickle_plain import check_depth, short_repr, to_plain
from .pickle_policy import GlobalRef, Kind, PickleScan, is_inert, normalise
from .pickle_rebuild import DATA_HANDLERS, PLAIN_BASES, TENSOR_HANDLERS, classify, reconstructor, torch_constant
from .pickle_values import (MAX_OBJECT_BYTES, DangerousRef, Handler, Placeholder, PlaceholderClass, StorageType,
                            check_key, take_charge)

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

MAX_PICKLE_BYTES = 1 << 31  # a model's structure pickle, never its tensor data
MAX_MEMO = 50_000_000
MAX_STACK = 50_000_000
# LONG/LONG1/LONG4 arguments: 1 KiB is 2,467 decimal digits, under Python's 4,300-digit limit on int <-> str
# conversions, so every integer a pickle holds can be printed, used as a key and compared as text
MAX_INT_BYTES = 1 << 10
# MAX_OBJECT_BYTES (imported above): Python objects one pickle may build, in estimated bytes; read from
# this module at each call, so it can be raised here.
# Global references in one pickle: each is recorded (GlobalRef) and classified. torch's pickler memoises
# every global, so a real checkpoint names a few dozen, once each; a flood of them is only slow to scan.
MAX_GLOBALS = 1_000_000
MAX_DISTINCT_GLOBALS = 2_048
MAX_EXTRA_PICKLES = 16  # pickles after STOP that a scan interprets before giving up


# --------------------------------------------------------------------------- the interpreter

class _Mark:
    __slots__ = ()


_MARK = _Mark()


class _Frame:
    __slots__ = ("end",)


_U32, _U16, _I32 = (struct.Struct(f).unpack_from for f in ("<I", "<H", "<i"))  # opcode arguments, compiled once


def interpret(data: bytes | memoryview, *, persistent_load: Callable[[Any], Any] | None = None,
              start: int = 0, member: str = "", path: str | None = None,
              allow_trailing: bool = False, scan: PickleScan | None = None) -> tuple[Any, PickleScan]:
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
        scan: the record to fill (a new one by default). A caller that passes its own keeps
            what the pickle referenced before an error stopped it (``ckptfit scan`` does).

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
    if scan is None:
        scan = PickleScan(member=member)
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    pos = start
    frame_end = -1  # -1: not inside a frame
    globals_idx: dict[int, int] = {}  # id(handle) -> index in scan.globals
    kinds: dict[tuple[str, str], Kind] = {}  # classification of each distinct global, once
    unpack = struct.unpack_from
    u32, u16, i32 = _U32, _U16, _I32
    at = start  # the position of the opcode that records one (a global, a call)
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
        module, name = normalise(module, name)
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
            if (module, name) in TENSOR_HANDLERS:
                fn, value = TENSOR_HANDLERS[(module, name)]
                if fn is None and isinstance(value, StorageType):
                    obj: Any = value
                else:
                    obj = Handler(module, name, fn, kind, value)
            else:
                obj = torch_constant(name)  # a dtype / layout / memory format constant
        elif kind == "data":
            fn, value = DATA_HANDLERS[(module, name)]
            obj = Handler(module, name, fn, kind, value)
        elif kind == "dangerous":
            obj = DangerousRef(module, name, idx)
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
        if not refs[idx].called:
            mark_called_first(idx)

    def mark_called_first(idx: int) -> None:
        g = refs[idx]
        refs[idx] = GlobalRef(g.module, g.name, g.kind, g.opcode, g.position, True, g.member)

    def call(fn: Any, args: Any, kwargs: dict | None = None) -> Any:
        nonlocal alloc
        alloc += 160 + take_charge()
        if type(args) is not tuple and not isinstance(args, tuple):
            if isinstance(args, list):
                args = tuple(args)
            else:
                raise fail("call arguments are not a tuple")
        mark_called(fn)
        # the classes below are unrelated, so the order of these tests only matters for speed
        if isinstance(fn, Handler):  # torch's rebuild functions, OrderedDict ...: by far the most called
            if fn.fn is None:
                if fn.value in ("Tensor", "Parameter", "Buffer") and not args:
                    return Placeholder(PlaceholderClass(fn.module, fn.name), args)
                return Placeholder(PlaceholderClass(fn.module, fn.name), args, kwargs)
            if fn.fn is reconstructor and len(args) >= 2:
                base = args[1]
                if not (isinstance(base, Handler) and (base.module, base.name) in PLAIN_BASES):
                    bq = base.qualname if isinstance(base, PlaceholderClass) else (
                        f"{base.module}.{base.name}" if isinstance(base, Handler | DangerousRef) else type(base).__name__)
                    scan.unsafe_uses.append(f"copyreg._reconstructor at byte {at} would call {bq}.__init__ "
                                            f"(a base other than object)")
            try:
                return fn.fn(*args, **kwargs) if kwargs else fn.fn(*args)
            except (CorruptCheckpoint, UnsupportedFormat, UnsafeCheckpoint):
                raise
            except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError,
                    RuntimeError) as e:
                raise fail(f"{fn.module}.{fn.name} got unexpected arguments ({e})") from e
        if isinstance(fn, DangerousRef):
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
        elif isinstance(obj, NumpyArray | NumpyDtype):
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
                        check_key(k)
                    target[k] = items[i + 1]
            except TypeError as e:
                raise fail(f"unhashable dict key ({e})") from e
        elif isinstance(target, Placeholder):
            for i in range(0, len(items), 2):
                k = items[i]
                try:
                    check_key(k)
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
                    check_key(item)
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
    # Limits read once (tests and users may change the module's values between calls).
    max_objects, max_stack, max_memo = MAX_OBJECT_BYTES, MAX_STACK, MAX_MEMO
    take_charge(max_objects)  # drops anything left by an earlier pickle that stopped with an error
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
            op = mv[pos]  # (the opcode's own position, `at`, is set only by the opcodes that record it)
            pos += 1
            alloc += 8
            if alloc > check_from and (alloc > max_objects or len(stack) > max_stack):
                where = f" ({member})" if member else ""
                raise ResourceLimitExceeded(
                    f"the pickle{where} builds more than {max_objects >> 20} MiB of Python objects by byte "
                    f"{pos - 1} (a memory bomb?); ckptfit stopped before allocating more", path=path,
                    hint="no checkpoint's structure needs that much; nothing was executed. If this is a genuine "
                         "checkpoint with a huge pickle, raise ckptfit.safety.MAX_OBJECT_BYTES, or save the weights "
                         "with safetensors")
            # ---- most frequent opcodes first, in the order of their counts in a torch.save state dict (protocol
            # 2: LONG_BINPUT after 256 memo entries; MEMOIZE and SHORT_BINUNICODE where protocol 4 writes them)
            if op == 0x72:  # LONG_BINPUT
                if pos + 4 > limit: need(4)
                idx = u32(mv, pos)[0]
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[idx] = stack[-1]
                else:
                    memo_put(idx)  # raises
                pos += 4
            elif op == 0x94:  # MEMOIZE
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[len(memo)] = stack[-1]
                else:
                    memo_put(len(memo))  # raises
            elif op == 0x4B:  # BININT1
                if pos >= limit: need(1)
                stack.append(mv[pos]); pos += 1
            elif op == 0x68:  # BINGET
                if pos >= limit: need(1)
                idx = mv[pos]
                if idx not in memo: memo_get(idx)  # raises
                stack.append(memo[idx]); pos += 1
            elif op == 0x58:  # BINUNICODE
                if pos + 4 > limit: need(4)
                (k,) = u32(mv, pos); pos += 4
                if pos + k > limit: need(k)
                stack.append(str(mv[pos:pos + k], "utf-8", "surrogatepass")); pos += k
            elif op == 0x8C:  # SHORT_BINUNICODE
                if pos >= limit: need(1)
                k = mv[pos]; pos += 1
                if pos + k > limit: need(k)
                stack.append(str(mv[pos:pos + k], "utf-8", "surrogatepass")); pos += k
            elif op == 0x28:  # MARK
                metastack.append(stack); stack = []; alloc += 64
            elif op == 0x52:  # REDUCE
                if len(stack) < 2: raise fail("REDUCE needs a callable and arguments")
                args = stack.pop(); fn = stack[-1]
                if type(fn) is Handler and type(args) is tuple and fn.fn is not None and fn.fn is not reconstructor:
                    # call(fn, args) for what torch's pickles call (its rebuild functions, OrderedDict), inline
                    alloc += 160 + take_charge()
                    idx = globals_idx.get(id(fn))
                    if idx is not None:  # mark_called(fn)
                        calls[idx] = calls.get(idx, 0) + 1
                        if not refs[idx].called:
                            mark_called_first(idx)
                    try:
                        stack[-1] = fn.fn(*args)
                    except (CorruptCheckpoint, UnsupportedFormat, UnsafeCheckpoint):
                        raise
                    except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError,
                            RuntimeError) as e:
                        raise fail(f"{fn.module}.{fn.name} got unexpected arguments ({e})") from e
                else:
                    at = pos - 1
                    stack[-1] = call(fn, args)
            elif op == 0x74:  # TUPLE
                if not metastack: raise fail("MARK expected on the stack")
                stack_items = stack; stack = metastack.pop()
                stack.append(tuple(stack_items)); alloc += 48 + 8 * len(stack_items)
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
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
            elif op == 0x85:  # TUPLE1
                if not stack: raise fail("TUPLE1 on an empty stack")
                stack[-1] = (stack[-1],); alloc += 56
            elif op == 0x71:  # BINPUT
                if pos >= limit: need(1)
                if stack and len(memo) < max_memo:
                    alloc += 100; memo[mv[pos]] = stack[-1]
                else:
                    memo_put(mv[pos])  # raises
                pos += 1
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({}); alloc += 256
            elif op == 0x73:  # SETITEM
                if len(stack) < 3: raise fail("SETITEM needs a dict, a key and a value")
                v = stack.pop(); k = stack.pop()
                if type(stack[-1]) is dict and type(k) is str:  # setitems(stack[-1], [k, v]) for a plain dict
                    alloc += 80; stack[-1][k] = v
                else:
                    setitems(stack[-1], [k, v])
            elif op == 0x6A:  # LONG_BINGET
                if pos + 4 > limit: need(4)
                idx = u32(mv, pos)[0]
                if idx not in memo: memo_get(idx)  # raises
                stack.append(memo[idx]); pos += 4
            elif op == 0x4D:  # BININT2
                if pos + 2 > limit: need(2)
                stack.append(u16(mv, pos)[0]); pos += 2; alloc += 32
            elif op == 0x4A:  # BININT
                if pos + 4 > limit: need(4)
                stack.append(i32(mv, pos)[0]); pos += 4; alloc += 32
            elif op == 0x87:  # TUPLE3
                if len(stack) < 3: raise fail("TUPLE3 needs three items")
                c = stack.pop(); b = stack.pop(); stack[-1] = (stack[-1], b, c); alloc += 72
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([]); alloc += 64
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                if not stack: raise fail("SETITEMS without a dict")
                setitems(stack[-1], items)
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
                at = pos - 1
                mod = text_line().decode("utf-8", "replace"); name = text_line().decode("utf-8", "replace")
                stack.append(find(mod, name, "GLOBAL", at))
            elif op == 0x93:  # STACK_GLOBAL
                at = pos - 1
                if len(stack) < 2: raise fail("STACK_GLOBAL needs a module and a name")
                name = stack.pop(); mod = stack.pop()
                stack.append(find(mod, name, "STACK_GLOBAL", at))
            elif op == 0x81:  # NEWOBJ
                at = pos - 1
                if len(stack) < 2: raise fail("NEWOBJ needs a class and arguments")
                args = stack.pop(); cls = stack[-1]; stack[-1] = call(cls, args)
            elif op == 0x92:  # NEWOBJ_EX
                at = pos - 1
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
                alloc += take_charge()
                if alloc > max_objects:
                    raise ResourceLimitExceeded(f"the pickle builds more than {max_objects >> 20} MiB of Python "
                                                f"objects (a memory bomb?)", path=path)
                if pos < n and not allow_trailing:
                    scan.anomalies.append(f"{n - pos} byte(s) of trailing data after STOP")
                    merge_extra(scan, scan_trailing(data, pos, member=member, path=path))
                return stack[-1], scan
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
                    check_key(item)
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
                at = pos - 1
                mod = text_line().decode("utf-8", "replace"); name = text_line().decode("utf-8", "replace")
                cls = find(mod, name, "INST", at)
                args = tuple(pop_mark())
                stack.append(call(cls, args))
            elif op == 0x6F:  # OBJ
                at = pos - 1
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
                at = pos - 1
                k = {0x82: 1, 0x83: 2, 0x84: 4}[op]
                need(k); code = int.from_bytes(mv[pos:pos + k], "little"); pos += k
                ref = GlobalRef("copyreg", f"extension #{code}", "dangerous", f"EXT{k}", at, member=member)
                scan.globals.append(ref)
                obj = DangerousRef("copyreg", f"extension #{code}", len(scan.globals) - 1)
                globals_idx[id(obj)] = len(scan.globals) - 1
                stack.append(obj)
            elif op == 0x97:  # NEXT_BUFFER
                raise fail("out-of-band buffers (NEXT_BUFFER) are not part of any checkpoint format")
            elif op == 0x98:  # READONLY_BUFFER
                pass
            else:
                raise fail(f"unknown opcode 0x{op:02x}")
    except (CorruptCheckpoint, UnsupportedFormat, UnsafeCheckpoint) as e:
        if not isinstance(e, UnsafeCheckpoint) and scan.dangerous:
            raise _unsafe_instead(e, scan, path) from e
        if e.path is None and path is not None:  # raised by a handler or persistent_load, which know no path
            raise _located(e, path) from e
        raise
    except RecursionError as e:  # pragma: no cover - the machine is iterative
        raise ResourceLimitExceeded("pickle nesting too deep", path=path) from e
    except MemoryError as e:
        raise ResourceLimitExceeded("pickle needs more memory than allowed", path=path) from e
    except (ValueError, UnicodeDecodeError, OverflowError, struct.error, IndexError, TypeError, KeyError,
            AttributeError) as e:
        err = fail(f"{type(e).__name__}: {e}"[:300])
        if scan.dangerous:
            raise _unsafe_instead(err, scan, path) from e
        raise err from e
    finally:
        # Drop the machine's own references (the value, if any, was taken above): an error's traceback
        # keeps this frame alive, and with it up to MAX_OBJECT_BYTES of half-built objects.
        stack.clear()
        metastack.clear()
        memo.clear()
        take_charge()
        if gc_was_enabled:
            gc.enable()


def _unsafe_instead(e: Exception, scan: PickleScan, path: str | None) -> UnsafeCheckpoint:
    """A pickle that names code to run and then fails to rebuild is refused as unsafe, not as damaged.

    Whatever stopped the interpreter (a dangerous callable passed as an argument, used as a
    class, built upon), real unpickling would have reached the code first; users catch
    :class:`UnsafeCheckpoint` to quarantine such files.
    """
    names = list(dict.fromkeys(g.qualname for g in scan.dangerous))
    detail = getattr(e, "detail", str(e)).splitlines()[0].replace("DangerousRef", "dangerous callable")
    err = UnsafeCheckpoint(f"refusing to load: its pickled data references code that would run on load: "
                           f"{', '.join(names)} (the pickle then stops: {detail})", path=path, globals=names,
                           hint="nothing was executed. Do not load this file unless you wrote it yourself; "
                                "`ckptfit scan` lists every reference. No automatic unsafe fallback is performed.")
    return err


def _located(e: CorruptCheckpoint | UnsupportedFormat | UnsafeCheckpoint, path: str):
    """The same error, saying which file it is about (a new exception: a raised one is never changed)."""
    if isinstance(e, UnsafeCheckpoint):
        return UnsafeCheckpoint(e.detail, path=path, hint=e.hint, globals=e.globals)
    return type(e)(e.detail, path=path, hint=e.hint)


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
        partial = PickleScan(member=label)
        try:
            _, sc = interpret(data, start=pos, member=label, path=path, allow_trailing=True,
                              persistent_load=_inert_persistent, scan=partial)
        except (CorruptCheckpoint, UnsupportedFormat):
            if partial.globals:  # a damaged pickle still names what it would run
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


def load_pickle(data: bytes | memoryview, *, persistent_load: Callable[[Any], Any] | None = None,
                start: int = 0, member: str = "", path: str | None = None,
                allow_trailing: bool = False) -> tuple[Any, PickleScan]:
    """:func:`interpret`, then refuse the file if anything dangerous was referenced or it nests absurdly."""
    value, scan = interpret(data, persistent_load=persistent_load, start=start, member=member, path=path,
                            allow_trailing=allow_trailing)
    refuse_if_dangerous([scan], path=path)
    check_depth(value, path=path, member=member)
    return value, scan
