"""Generative fuzzing of every entry point: hostile pickles and folder metadata built by hypothesis.

Each example is a file or folder made from a real one with one part generated: a value of
``data.pkl`` (or a dict key) written as opcodes, from real stdlib/torch/numpy callables, tensor
rebuilds with any storage type, offset, size and stride, memo tricks and raw opcode bytes; a
``model.safetensors.index.json`` or ``config.json`` of any JSON shape; a safetensors header; a DCP
``.metadata`` with a field replaced. Every entry point runs on it (``_hostile_builders.run_entry_point``,
plus two CLI commands) and may only work or raise a ckptfit error.

The examples run in a child process (:func:`main`) under an address-space limit, with a deadline
per example; the parent (:func:`run_child`) reports a crash or a hang with the example that caused it
(written to ``current.bin`` before each example runs). ``tests/test_fuzz.py`` runs a few examples;
``python bench/fuzz.py --entrypoints --examples 20000`` runs many.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tempfile

from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))

# Real callables a pickle can name: rebuilt, placeholders or dangerous, all must end in a ckptfit error or a load.
CALLABLES = [
    ("builtins", n) for n in ("bytes", "bytearray", "str", "int", "float", "list", "tuple", "dict", "set", "frozenset",
                              "complex", "range", "slice", "bool", "getattr", "eval", "object", "type")
] + [
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "Counter"),
    ("_codecs", "encode"), ("codecs", "decode"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"), ("torch._utils", "_rebuild_qtensor"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Size"), ("torch", "device"), ("torch", "float32"),
    ("torch", "qint8"), ("torch", "FloatStorage"), ("torch", "QInt8Storage"), ("torch.nn.parameter", "Parameter"),
    ("torch.nn.modules.linear", "Linear"), ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.numeric", "_frombuffer"), ("datetime", "datetime"),
    ("datetime", "timedelta"), ("argparse", "Namespace"), ("pathlib", "PosixPath"), ("os", "system"),
    ("functools", "partial"), ("operator", "attrgetter"), ("torch.jit._pickle", "build_intlist"),
    ("torch.jit._pickle", "restore_type_tag"), ("[/x]", "\x1b[31m"),
]
STORAGES = ["FloatStorage", "HalfStorage", "LongStorage", "ByteStorage", "BoolStorage", "QInt8Storage", "QUInt8Storage",
            "QInt32Storage", "UntypedStorage", "BFloat16Storage", "ComplexFloatStorage", "NoSuchStorage"]
TEXT = st.sampled_from(["", "a", "weight", "[/x]", "[bold]", "\x1b[2J", "utf-8", "latin1", "rot13", "zlib", "strict",
                        "no-such", "storage", "0", "cpu", "cuda:0", "\udc80", "x" * 300])


def _u(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if -(2 ** 31) <= i < 2 ** 31:
        return b"J" + struct.pack("<i", i)
    n = (i.bit_length() + 8) // 8
    return b"\x8b" + struct.pack("<i", n) + i.to_bytes(n, "little", signed=True)


def _glob(mod: str, name: str) -> bytes:
    return b"c" + mod.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n"


INTS = st.one_of(st.integers(-3, 20), st.integers(-(2 ** 40), 2 ** 40), st.sampled_from([2 ** 31, 2 ** 61, 2 ** 62,
                                                                                           2 ** 63, -1, 10 ** 3000]))
LEAF = st.one_of(
    INTS.map(_int), TEXT.map(_u), st.binary(max_size=40).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.floats(allow_nan=True).map(lambda f: b"G" + struct.pack(">d", f)), st.just(b"N"), st.just(b"\x88"),
    st.just(b")"), st.integers(1, 200).map(lambda d: b")" + b"\x85" * d),
    st.sampled_from(CALLABLES).map(lambda mn: _glob(*mn)),
)


def _tensor(storage: str, numel: int, offset: int, size: list[int], stride: list[int], v3: bool) -> bytes:
    pid = b"(" + _u("storage") + _glob("torch", storage) + _u("0") + _u("cpu") + _int(numel) + b"tQ"
    tup = lambda xs: b"(" + b"".join(_int(x) for x in xs) + b"t"  # noqa: E731
    fn = "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2"
    extra = _glob("torch", "qint8" if storage.startswith("Q") else "float32") if v3 else b""
    return (_glob("torch._utils", fn) + b"(" + pid + _int(offset) + tup(size) + tup(stride) + b"\x89"
            + _glob("collections", "OrderedDict") + b")R" + extra + b"tR")


TENSOR = st.builds(_tensor, st.sampled_from(STORAGES), st.one_of(st.integers(0, 16), INTS.filter(lambda i: i >= 0)),
                   st.one_of(st.integers(0, 16), INTS), st.lists(st.one_of(st.integers(0, 5), INTS), max_size=3),
                   st.lists(st.one_of(st.integers(0, 5), INTS), max_size=3), st.booleans())


def _combine(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    items = st.lists(children, max_size=4)
    return st.one_of(
        items.map(lambda xs: b"(" + b"".join(xs) + b"t"),  # tuple
        items.map(lambda xs: b"](" + b"".join(xs) + b"e"),  # list
        items.map(lambda xs: b"}(" + b"".join(xs) + b"u"),  # dict (odd item counts are damage)
        items.map(lambda xs: b"\x8f(" + b"".join(xs) + b"\x90"),  # set
        st.tuples(st.sampled_from(CALLABLES), items).map(lambda t: _glob(*t[0]) + b"(" + b"".join(t[1]) + b"tR"),
        st.tuples(st.sampled_from(CALLABLES), items).map(lambda t: _glob(*t[0]) + b"(" + b"".join(t[1]) + b"t\x81"),
        st.tuples(children, children).map(lambda t: t[0] + t[1] + b"b"),  # BUILD
        st.tuples(children, st.integers(0, 3)).map(lambda t: t[0] + b"q" + bytes([t[1]]) + b"0h" + bytes([t[1]])),
        # one value memoised, then a tuple of many references to it
        st.tuples(children, st.integers(1, 30)).map(lambda t: t[0] + b"q\x07" + b"0(" + b"h\x07" * t[1] + b"t"),
        TENSOR,
    )


EXPR = st.recursive(LEAF, _combine, max_leaves=12)
RAW = st.binary(min_size=1, max_size=12)
# A value expression, sometimes followed by raw opcode bytes (then usually damaged, sometimes not)
FRAGMENT = st.tuples(EXPR, st.one_of(st.just(b""), RAW), st.booleans())

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 2 ** 70), st.floats(allow_nan=False),
                              TEXT), lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(TEXT, c, max_size=4)), max_leaves=10)
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = st.one_of(
    JSON,
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["weight", "bias", "x", "[/x]"]),
                                                         st.one_of(st.sampled_from(SHARDS + [".", "..", "", "/etc/passwd",
                                                                                              "config.json"]), JSON),
                                                         max_size=4)},
                          optional={"metadata": JSON}),
)
CONFIG = st.one_of(JSON, st.fixed_dictionaries({"model_type": st.one_of(TEXT, JSON)},
                                               optional={"architectures": st.one_of(JSON, st.lists(TEXT, max_size=2))}))
DCP_FIELDS = ["fqn", "offset", "index", "relative_path", "length", "chunks", "size", "properties", "offsets", "sizes",
              "dtype", "storage_data", "state_dict_metadata", "planner_data"]
DCP_VALUE = st.one_of(JSON, st.sampled_from([[1], [[1]], (1, 2), (2 ** 62,), -1, 2 ** 70, "[/x]", ".", "..", None]))

EXAMPLE = st.one_of(
    st.tuples(st.just("pickle-value"), FRAGMENT),
    st.tuples(st.just("pickle-key"), FRAGMENT),
    st.tuples(st.just("plain-pickle"), FRAGMENT),
    st.tuples(st.just("hf-index"), INDEX),
    st.tuples(st.just("hf-config"), CONFIG),
    st.tuples(st.just("safetensors-header"), JSON),
    st.tuples(st.just("dcp-metadata"), st.tuples(st.sampled_from(DCP_FIELDS), DCP_VALUE, st.integers(0, 50))),
)


# ------------------------------------------------------------------------------------------- building

def _set_some(obj, field: str, value, pick: int, depth: int = 0) -> bool:
    """Replace the ``pick``-th attribute named ``field`` found in the DCP metadata tree (dataclasses, dicts)."""
    seen = [0]

    def walk(o, d):
        if d > 6:
            return False
        if hasattr(o, "__dict__") or hasattr(o, "__dataclass_fields__"):
            names = list(getattr(o, "__dataclass_fields__", {}) or vars(o))
            for n in names:
                if n == field:
                    if seen[0] == pick % 3:
                        object.__setattr__(o, n, value)
                        return True
                    seen[0] += 1
                if walk(getattr(o, n, None), d + 1):
                    return True
        elif isinstance(o, dict):
            for k, v in list(o.items()):
                if walk(k, d + 1) or walk(v, d + 1):
                    return True
        elif isinstance(o, list | tuple):
            return any(walk(v, d + 1) for v in o[:4])
        return False

    return walk(obj, depth)


def build_example(example, work: pathlib.Path, cache: dict) -> pathlib.Path:
    """The file or folder for one example, under ``work``."""
    from _hostile_builders import dcp_folder, hf_folder, torch_zip_bytes, write

    kind, spec = example
    if kind in ("pickle-value", "pickle-key", "plain-pickle"):
        expr, raw, with_raw = spec
        frag = expr + (raw if with_raw else b"")
        if kind == "plain-pickle":
            return write(work / "m.pkl", b"\x80\x02}(" + _u("x") + frag + b"u.")
        key = "fragment" if kind == "pickle-value" else "key_fragment"
        return write(work / "m.pt", torch_zip_bytes(**{key: frag}))
    if kind == "hf-index":
        return hf_folder(work / "hf", index=json.dumps(spec))
    if kind == "hf-config":
        return hf_folder(work / "hf", config=json.dumps(spec))
    if kind == "safetensors-header":
        raw = json.dumps(spec).encode()
        return write(work / "m.safetensors", struct.pack("<Q", len(raw)) + raw)
    field, value, pick = spec
    if "dcp" not in cache:
        base = dcp_folder(pathlib.Path(tempfile.mkdtemp()) / "dcp")
        with open(base / ".metadata", "rb") as f:
            cache["dcp"] = (base, f.read())
    base, raw_md = cache["dcp"]
    import shutil

    d = work / "dcp"
    shutil.copytree(base, d)
    md = pickle.loads(raw_md)  # our own file
    _set_some(md, field, value, pick)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return d


# ------------------------------------------------------------------------------------------- the child

ENTRY = ("open", "load", "build", "inspect", "scan", "convert-st", "convert-pt", "diff", "identify", "from_checkpoint")


def check(path: pathlib.Path, work: pathlib.Path) -> None:
    """Every entry point, and two CLI commands: a load or a ckptfit error, nothing else (raises otherwise)."""
    from _hostile_builders import run_cli, run_entry_point

    for ep in ENTRY:
        run_entry_point(ep, str(path), str(work))
    for c in ("inspect", "load"):
        code, out, err = run_cli(c, str(path), str(work))
        assert code in (0, 1, 2), (c, code, err)
        assert "\x1b" not in out + err and "Traceback" not in out + err, (c, out, err)
        if code == 1:
            assert err.startswith("error: ") and not err.startswith(("error: RecursionError", "error: TypeError",
                                                                    "error: ValueError", "error: LookupError")), err


def main(examples: int, seed: int | None, out_dir: str, deadline_s: int, memory: int) -> None:
    """Run ``examples`` examples here (the child): address space capped, a deadline per example."""
    import faulthandler
    import resource
    import shutil

    sys.path.insert(0, HERE)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.environ.setdefault("CKPTFIT_IDENTIFY_FAMILIES", "torchvision.models.resnet18")
    from hypothesis import HealthCheck, given, settings, seed as hseed

    cache: dict = {}
    root = pathlib.Path(out_dir)
    current = root / "current.bin"
    count = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(example=EXAMPLE)
    def run(example) -> None:
        count[0] += 1
        current.write_bytes(pickle.dumps(example))
        work = pathlib.Path(tempfile.mkdtemp(dir=root))
        try:
            faulthandler.dump_traceback_later(deadline_s, exit=True)
            path = build_example(example, work, cache)
            check(path, work)
        finally:
            faulthandler.cancel_dump_traceback_later()
            shutil.rmtree(work, ignore_errors=True)

    if seed is not None:
        run = hseed(seed)(run)
    run()
    print(f"FUZZ-OK {count[0]} examples", flush=True)


def run_child(examples: int, *, seed: int | None = None, deadline_s: int = 60, memory: int = 8 << 30,
              timeout: float | None = None) -> tuple[int, str]:
    """Run :func:`main` in a child process; ``(examples run, "")`` or ``(0, what went wrong)``."""
    out = tempfile.mkdtemp(prefix="ckptfit-fuzz-")
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import _fuzz_entrypoints as F; "
            f"F.main({examples}, {seed!r}, {out!r}, {deadline_s}, {memory})")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout or (deadline_s * examples + 120))
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = str(e.stdout or ""), str(e.stderr or ""), -9
    for line in stdout.splitlines():
        if line.startswith("FUZZ-OK ") and rc == 0:
            return int(line.split()[1]), ""
    last = pathlib.Path(out, "current.bin")
    example = pickle.loads(last.read_bytes()) if last.exists() else None
    return 0, f"exit code {rc}; last example: {example!r}\n{stdout[-3000:]}\n{stderr[-5000:]}"
