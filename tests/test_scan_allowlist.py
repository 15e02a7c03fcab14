"""``scan`` says clean only when every global is known to be safe, and loading agrees with it.

Each gadget is a pickle built here opcode by opcode: it would run code (write a file, run a
command, evaluate a string, load a library) under ``torch.load(weights_only=False)``. Each is
written as a plain pickle and as the ``data.pkl`` of a real ``torch.save`` archive, and must
scan ``dangerous`` (exit 5) or ``not known to be safe`` (exit 3), never ``clean``; a real
training checkpoint still scans clean. Nothing here is ever unpickled for real.
"""
from __future__ import annotations

import argparse
import collections
import io
import pathlib
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ckptfit
from ckptfit import CorruptCheckpoint, NotACheckpoint, UnsafeCheckpoint
from ckptfit.cli import main
from ckptfit.scanning import EXIT_CODES, scan

# ----------------------------------------------------------------------------------------- an opcode builder


def u(text: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE when long)."""
    b = text.encode()
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b


def g(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0-3 form)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4-5 form)."""
    return u(module) + u(name) + b"\x93"


def i1(n: int) -> bytes:
    return b"K" + bytes([n])


P2, P4 = b"\x80\x02", b"\x80\x04"
MARK, TUPLE, TUPLE1, TUPLE2, TUPLE3, EMPTY_TUPLE = b"(", b"t", b"\x85", b"\x86", b"\x87", b")"
REDUCE, BUILD, NEWOBJ, STOP, EMPTY_DICT, SETITEM, NONE = b"R", b"b", b"\x81", b".", b"}", b"s", b"N"


def put(i: int) -> bytes:
    return b"q" + bytes([i])


def get(i: int) -> bytes:
    return b"h" + bytes([i])


def call(fn: bytes, *args: bytes) -> bytes:
    """``fn(*args)`` through REDUCE."""
    return fn + MARK + b"".join(args) + TUPLE + REDUCE


def namespace(**attrs: bytes) -> bytes:
    """An argparse.Namespace (NEWOBJ + BUILD), as torch.save writes one."""
    state = EMPTY_DICT + b"".join(u(k) + v + SETITEM for k, v in attrs.items())
    return g("argparse", "Namespace") + EMPTY_TUPLE + NEWOBJ + state + BUILD


CANARY = "/tmp/ckptfit-canary-never-created"


@dataclass(frozen=True)
class Gadget:
    id: str
    pickle: bytes
    verdict: str  # "dangerous" or "not known to be safe"
    names: tuple[str, ...]  # qualnames the scan must list as dangerous / unknown (empty: a concern instead)


def _npy_object_array(element: bytes) -> bytes:
    """A numpy object array holding ``element``, as numpy pickles it (protocol 2)."""
    dtype = call(g("numpy", "dtype"), u("O8"), b"\x89", b"\x88") + MARK + i1(3) + u("|") + NONE + NONE + NONE \
        + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i1(63) + TUPLE + BUILD
    return (call(g("numpy._core.multiarray", "_reconstruct"), g("numpy", "ndarray"), i1(0) + TUPLE1, b"C\x01b")
            + MARK + i1(1) + i1(1) + TUPLE1 + dtype + b"\x89" + b"]" + element + b"a" + TUPLE + BUILD)


GADGETS: list[Gadget] = [
    # ---- known code runners, in every opcode form and name spelling
    Gadget("os.system-GLOBAL", P2 + call(g("os", "system"), u(f"touch {CANARY}")) + STOP,
           "dangerous", ("os.system",)),
    Gadget("posix.system-STACK_GLOBAL-memo", P4 + u("posix") + b"\x94" + u("system") + b"\x94" + b"h\x00h\x01\x93"
           + u(f"touch {CANARY}") + TUPLE1 + REDUCE + STOP, "dangerous", ("posix.system",)),
    Gadget("builtins.getattr-STACK_GLOBAL-BINGET", P4 + u("builtins") + put(0) + u("getattr") + put(1)
           + get(0) + get(1) + b"\x93" + MARK + g("argparse", "Namespace") + u("__init__") + TUPLE + REDUCE + STOP,
           "dangerous", ("builtins.getattr",)),
    Gadget("INST", b"(" + b"S'touch " + CANARY.encode() + b"'\n" + b"ios\nsystem\n" + STOP,
           "dangerous", ("os.system",)),
    Gadget("OBJ", b"(" + g("posix", "system") + b"S'touch " + CANARY.encode() + b"'\n" + b"o" + STOP,
           "dangerous", ("posix.system",)),
    # ---- the gadgets a denylist called clean
    Gadget("typing.get_type_hints", P2 + call(g("typing", "get_type_hints"), namespace(
        __annotations__=EMPTY_DICT + u("x") + u(f"__import__('os').system('touch {CANARY}')") + SETITEM)) + STOP,
        "dangerous", ("typing.get_type_hints",)),
    Gadget("torch.utils.collect_env.run", P2 + call(g("torch.utils.collect_env", "run"), u(f"touch {CANARY}"))
           + STOP, "dangerous", ("torch.utils.collect_env.run",)),
    Gadget("logging.FileHandler", P2 + call(g("logging", "FileHandler"), u(CANARY)) + STOP,
           "dangerous", ("logging.FileHandler",)),
    Gadget("codecs.open", P2 + call(g("codecs", "open"), u(CANARY), u("w")) + STOP, "dangerous", ("codecs.open",)),
    Gadget("pathlib.Path.touch-dotted", P4 + call(sg("pathlib", "Path.touch"), call(sg("pathlib", "PosixPath"),
                                                                                      u(CANARY))) + STOP,
           "dangerous", ("pathlib.Path.touch",)),
    Gadget("numpy.savetxt", P2 + call(g("numpy", "savetxt"), u(CANARY), b"]" + i1(1) + b"a") + STOP,
           "dangerous", ("numpy.savetxt",)),
    Gadget("py_compile.compile", P2 + call(g("py_compile", "compile"), u("/etc/hostname"), u(CANARY)) + STOP,
           "dangerous", ("py_compile.compile",)),
    Gadget("numpy2-load-in-object-array", P2 + _npy_object_array(
        call(g("numpy.lib._npyio_impl", "load"), u("/tmp/evil.npy"), b"\x88")) + STOP,
        "dangerous", ("numpy.lib._npyio_impl.load",)),
    Gadget("torch.ops.load_library-dotted", P4 + call(sg("torch", "ops.load_library"), u("/tmp/evil.so")) + STOP,
           "dangerous", ("torch.ops.load_library",)),
    Gadget("numpy-dotted-attribute-path", P4 + call(sg("numpy", "lib._npyio_impl.load"), u("/tmp/evil.npy"))
           + STOP, "dangerous", ("numpy.lib._npyio_impl.load",)),
    Gadget("functools.partial-of-system", P2 + call(call(g("functools", "partial"), g("os", "system"),
                                                         u(f"touch {CANARY}"))) + STOP,
           "dangerous", ("os.system",)),
    Gadget("rebuild_from_type_v2-system", P2 + call(g("torch._tensor", "_rebuild_from_type_v2"), g("os", "system"),
                                                    g("torch", "Tensor"), u(f"touch {CANARY}") + TUPLE1,
                                                    EMPTY_DICT) + STOP,
           "dangerous", ("os.system",)),
    # ---- not known to be dangerous, not known to be safe: importing it runs its module's code
    Gadget("user-module-class", P2 + g("my_training_code.models", "Net") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + BUILD
           + STOP, "not known to be safe", ("my_training_code.models.Net",)),
    Gadget("user-nn-Module-subclass-in-state", P2 + EMPTY_DICT + u("model") + g("__main__", "Net") + EMPTY_TUPLE
           + NEWOBJ + EMPTY_DICT + u("_modules") + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + SETITEM
           + BUILD + SETITEM + STOP, "not known to be safe", ("__main__.Net",)),
    Gadget("unlisted-stdlib-callable", P2 + call(g("shlex", "split"), u("a b")) + STOP,
           "not known to be safe", ("shlex.split",)),
    Gadget("torch-nn-dotted-name-is-not-the-class", P4 + sg("torch.nn.modules.linear", "Linear.__init__.__globals__")
           + STOP, "dangerous", ("torch.nn.modules.linear.Linear.__init__.__globals__",)),
    Gadget("copyreg._reconstructor-non-object-base", P2 + call(g("copyreg", "_reconstructor"),
                                                               g("argparse", "Namespace"),
                                                               g("torch.nn.modules.module", "Module"),
                                                               u(CANARY)) + STOP,
           "not known to be safe", ()),
    Gadget("calling-an-inert-instance", P2 + call(g("torch.nn.modules.linear", "Linear") + EMPTY_TUPLE + NEWOBJ
                                                  + EMPTY_DICT + BUILD, u("x")) + STOP,
           "not known to be safe", ()),
]


def _torch_zip_bytes(data_pkl: bytes) -> bytes:
    """A real torch.save archive whose data.pkl is replaced."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return out.getvalue()


def _files(tmp: pathlib.Path, gadget: Gadget) -> list[pathlib.Path]:
    plain = tmp / f"{gadget.id}.pkl"
    plain.write_bytes(gadget.pickle)
    zipped = tmp / f"{gadget.id}.pt"
    zipped.write_bytes(_torch_zip_bytes(gadget.pickle))
    return [plain, zipped]


def _load_all(path: pathlib.Path) -> ckptfit.Checkpoint:
    ckpt = ckptfit.open(path)
    ckpt.metadata  # noqa: B018
    for _, t in ckpt.tensors():
        t.load()
    return ckpt


# ----------------------------------------------------------------------------------------- the gadgets


def test_enough_gadgets() -> None:
    assert len(GADGETS) >= 16 and len({gd.id for gd in GADGETS}) == len(GADGETS)


@pytest.mark.parametrize("gadget", GADGETS, ids=[gd.id for gd in GADGETS])
def test_gadget_never_scans_clean(gadget: Gadget, tmp_path: pathlib.Path) -> None:
    for path in _files(tmp_path, gadget):
        report = scan(path)
        assert report.verdict == gadget.verdict, (path.name, str(report))
        assert report.exit_code == EXIT_CODES[gadget.verdict] != 0
        listed = {r.qualname for r in (report.dangerous if gadget.verdict == "dangerous" else report.unknown)}
        assert set(gadget.names) <= listed, (path.name, listed)
        if not gadget.names:
            assert report.concerns and ("__init__" in report.concerns[0] or "__call__" in report.concerns[0]), report
        r = CliRunner().invoke(main, ["scan", str(path)])
        assert r.exit_code == EXIT_CODES[gadget.verdict], r.output
        assert ("DANGEROUS" if gadget.verdict == "dangerous" else "NOT KNOWN TO BE SAFE") in r.output
    assert not pathlib.Path(CANARY).exists()


@pytest.mark.parametrize("gadget", GADGETS, ids=[gd.id for gd in GADGETS])
def test_loading_and_scanning_agree(gadget: Gadget, tmp_path: pathlib.Path) -> None:
    """What load refuses as unsafe never scans clean, and open/inspect never call it safe."""
    for path in _files(tmp_path, gadget):
        report = scan(path)
        try:
            ckpt = _load_all(path)
        except UnsafeCheckpoint as e:
            assert report.verdict == "dangerous", report
            assert set(e.globals) <= {r.qualname for r in report.dangerous}
            r = CliRunner().invoke(main, ["inspect", str(path)])
            assert r.exit_code == 1 and "safety: safe" not in r.output
            continue
        except NotACheckpoint:
            # ckptfit's readers take pickles of protocol 2 and up; torch.load would still unpickle this one
            assert path.suffix == ".pkl" and not gadget.pickle.startswith(b"\x80"), path.name
            assert report.verdict == gadget.verdict
            continue
        except CorruptCheckpoint:
            pytest.fail(f"{path.name}: a gadget must be refused as unsafe or read as inert placeholders")
        # read as inert placeholders: loading ran nothing; the verdict still names the unknown classes
        assert gadget.verdict == "not known to be safe"
        assert ckpt.safety.verdict != "safe", ckpt.safety
        assert set(gadget.names) <= set(ckpt.safety.unknown)
    assert not pathlib.Path(CANARY).exists()


def test_the_dangerous_gadgets_are_refused_by_load(tmp_path: pathlib.Path) -> None:
    for gadget in GADGETS:
        if gadget.verdict == "dangerous":
            for path in _files(tmp_path, gadget)[0 if gadget.pickle.startswith(b"\x80") else 1:]:
                with pytest.raises(UnsafeCheckpoint, match="refusing to load"):
                    _load_all(path)


# ----------------------------------------------------------------------------------------- benign files


class _Args(argparse.Namespace):
    pass


def test_a_real_training_checkpoint_scans_clean(tmp_path: pathlib.Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    ckpt = {
        "epoch": 90, "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "args": argparse.Namespace(lr=0.1, arch="resnet18", data=pathlib.Path("/data/imagenet"), steps=[30, 60]),
        "best_acc1": np.float64(76.1), "acc": np.float32(0.5), "step": np.int64(3), "hist": np.arange(4.0),
        "rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "meta": collections.OrderedDict(a=1),
        "torch_version": torch.__version__, "when": __import__("datetime").datetime(2024, 1, 2),
        "tags": {"a", "b"}, "module": nn.Linear(2, 2), "size": torch.Size([3, 4]), "dtype": torch.bfloat16,
    }
    for proto in (2, 4):
        path = tmp_path / f"train{proto}.pth"
        torch.save(ckpt, path, pickle_protocol=proto)
        report = scan(path)
        assert report.verdict == "clean" and report.exit_code == 0, str(report)
        assert {"argparse.Namespace", "pathlib.PosixPath", "torch.nn.modules.linear.Linear"} <= \
            {r.qualname for r in report.inert}
        r = CliRunner().invoke(main, ["scan", str(path), "--json"])
        assert r.exit_code == 0 and '"verdict": "clean"' in r.output
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert scan(tmp_path / "legacy.pt").verdict == "clean"


def test_inert_means_known_not_merely_placeholder(tmp_path: pathlib.Path) -> None:
    # a subclass of an inert class from the user's own module is not inert: importing it runs that module
    torch.save({"args": _Args(lr=1)}, tmp_path / "sub.pt")
    report = scan(tmp_path / "sub.pt")
    assert report.verdict == "not known to be safe" and report.exit_code == 3
    assert [r.qualname for r in report.unknown] == [f"{__name__}._Args"]
    assert f"would import {__name__}._Args: not known to be safe" in str(report)
    # ckptfit itself still loads it, as an inert placeholder
    assert ckptfit.open(tmp_path / "sub.pt").safety.unknown == (f"{__name__}._Args",)


def test_reconstructor_with_object_base_is_clean() -> None:
    import pickle

    data = pickle.dumps(argparse.Namespace(a=1), protocol=0)  # protocol 0: copyreg._reconstructor(cls, object, None)
    assert b"copy_reg\n_reconstructor" in data
    from ckptfit.safety import interpret

    _, sc = interpret(data)
    assert not sc.unsafe_uses
    _, sc = interpret(GADGETS[-2].pickle)
    assert sc.unsafe_uses and "torch.nn.modules.module.Module.__init__" in sc.unsafe_uses[0]


# ----------------------------------------------------------------------------------------- issue 11: refusals say unsafe

REFUSALS = {
    "rebuild_from_type_v2(os.system)": GADGETS[[gd.id for gd in GADGETS].index("rebuild_from_type_v2-system")].pickle,
    "rebuild_from_type_v2 new_type=os.system": P2 + call(
        g("torch._tensor", "_rebuild_from_type_v2"), g("torch._utils", "_rebuild_tensor_v2"), g("os", "system"),
        EMPTY_TUPLE, EMPTY_DICT) + STOP,
    "copyreg.__newobj__(os.system)": P2 + call(g("copyreg", "__newobj__"), g("os", "system")) + STOP,
    "copyreg._reconstructor(os.system)": P2 + call(g("copyreg", "_reconstructor"), g("os", "system"),
                                                   g("builtins", "object"), NONE) + STOP,
    "copyreg._reconstructor(base=os.system)": P2 + call(g("copyreg", "_reconstructor"), g("argparse", "Namespace"),
                                                        g("os", "system"), NONE) + STOP,
    "BUILD on os.system": P2 + g("os", "system") + EMPTY_DICT + BUILD + STOP,
    "SETITEM on os.system": P2 + g("os", "system") + u("k") + u("v") + SETITEM + STOP,
    "APPEND to os.system": P2 + g("os", "system") + u("v") + b"a" + STOP,
    "OrderedDict(os.system)": P2 + call(g("collections", "OrderedDict"), g("os", "system")) + STOP,
    "tensor rebuilt from os.system": P2 + call(g("torch._utils", "_rebuild_tensor_v2"), g("os", "system"), i1(0),
                                               EMPTY_TUPLE, EMPTY_TUPLE) + STOP,
    "os.system then truncated": P2 + call(g("os", "system"), u("x")),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_dangerous_callable_anywhere_is_unsafe_not_corrupt(name: str, tmp_path: pathlib.Path) -> None:
    for path, member in ((tmp_path / "a.pkl", REFUSALS[name]), (tmp_path / "a.pt", _torch_zip_bytes(REFUSALS[name]))):
        path.write_bytes(member)
        with pytest.raises(UnsafeCheckpoint, match=r"refusing to load: its pickled data (references code that "
                                                   r"would run on load: |passes )(posix|os)\.system") as info:
            _load_all(path)
        assert info.value.globals and info.value.globals[0] in ("os.system", "posix.system")
        assert scan(path).verdict == "dangerous"


def test_rebuild_from_type_v2_names_what_it_would_call(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.pt"
    path.write_bytes(_torch_zip_bytes(REFUSALS["rebuild_from_type_v2(os.system)"]))
    with pytest.raises(UnsafeCheckpoint, match=r"passes os\.system to torch\._tensor\._rebuild_from_type_v2, which "
                                               r"would call it on load"):
        ckptfit.open(path)


def test_a_file_naming_many_globals_shows_the_riskiest_first_in_a_bounded_table(tmp_path: pathlib.Path) -> None:
    # 300 distinct unknown globals (GLOBAL pushes each and POP drops it), then one dangerous one last.
    body = b"".join(g(f"pkg{i}", "thing") + b"0" for i in range(300))
    path = tmp_path / "many.pkl"
    path.write_bytes(P2 + body + g("os", "system") + u("true") + TUPLE1 + REDUCE + STOP)
    result = CliRunner().invoke(main, ["scan", str(path)])
    assert result.exit_code == EXIT_CODES["dangerous"], result.output
    lines = result.output.splitlines()
    first_row = next(i for i, ln in enumerate(lines) if "pkg" in ln or "os.system" in ln)
    assert "os.system" in lines[first_row]                   # the dangerous one leads, though it came last
    assert sum("pkg" in ln for ln in lines) <= 60              # the table is bounded
    assert "more globals" in result.output and "--json" in result.output
