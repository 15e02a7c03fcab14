"""numpy values in pickles, rebuilt by ckptfit's own code: arrays, scalars, dtypes.

``pickle`` rebuilds a numpy array by calling ``numpy._core.multiarray._reconstruct`` and then
``__setstate__`` with ``(version, shape, dtype, fortran, raw bytes)``; the restricted interpreter
(:mod:`ckptfit.safety`) calls the stand-ins here instead, which check every size against the data
before allocating and charge what they allocate to the pickle's object budget. Nothing of numpy
runs but ``np.dtype`` / ``np.frombuffer`` on checked plain values. A new numpy reconstructor is
one function here and one entry in :data:`NUMPY_HANDLERS`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CorruptCheckpoint
from .pickle_values import charge, int_tuple

__all__ = ["NumpyDtype", "NumpyArray", "numpy_scalar", "numpy_frombuffer", "NUMPY_HANDLERS"]


class NumpyDtype:
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


class NumpyArray:
    __slots__ = ("value",)

    def __init__(self, *args):
        self.value = None

    def build(self, state):
        import numpy as np

        if not isinstance(state, tuple) or len(state) != 5:
            raise CorruptCheckpoint("numpy array state is malformed")
        _, shape, dtype, fortran, raw = state
        shape = int_tuple(shape, "numpy shape")
        dt = dtype.resolve() if isinstance(dtype, NumpyDtype) else None
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
        charge(arr.nbytes if not dt.hasobject else 8 * arr.size)
        self.value = arr


def numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, NumpyDtype):
        raise CorruptCheckpoint("numpy scalar without a dtype")
    dt = dtype.resolve()
    if isinstance(data, str):
        data = data.encode("latin1")
    if dt.hasobject or not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise CorruptCheckpoint("numpy scalar data is malformed")
    return np.frombuffer(data, dtype=dt)[0]


def numpy_frombuffer(buf, dtype, shape, order):
    import numpy as np

    dt = dtype.resolve() if isinstance(dtype, NumpyDtype) else None
    if dt is None or dt.hasobject or not isinstance(buf, bytes | bytearray):
        raise CorruptCheckpoint("numpy buffer is malformed")
    shape = int_tuple(shape, "numpy shape")
    n = 1
    for s in shape:
        n *= s
    if len(buf) != n * dt.itemsize:
        raise CorruptCheckpoint("numpy buffer size does not match its shape")
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape, order=order if order in ("C", "F") else "C").copy()


# (module, name) -> (handler, value), merged into the rebuild module's data table: numpy's own
# reconstructors, and its dtype classes as plain names.
NUMPY_HANDLERS: dict[tuple[str, str], tuple[Callable | None, Any]] = {
    ("numpy._core.multiarray", "_reconstruct"): (lambda cls, shape, dtype: NumpyArray(), None),
    ("numpy._core.multiarray", "scalar"): (numpy_scalar, None),
    ("numpy._core.numeric", "_frombuffer"): (numpy_frombuffer, None),
    ("numpy", "dtype"): (NumpyDtype, None),
    ("numpy", "ndarray"): (None, "ndarray"),
}
for _dtname in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_",
                "Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
    NUMPY_HANDLERS[("numpy", _dtname)] = (None, _dtname)
    NUMPY_HANDLERS[("numpy.dtypes", _dtname)] = (None, _dtname)
