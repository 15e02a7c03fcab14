"""Hostile and broken files: each gets a specific ckptfit error, runs nothing, and stays small and fast.

Every case is built here, in the test: code execution in every opcode form and every place a
pickle can hide (zip, legacy, nested in metadata, popped, after STOP, TorchScript's
constants.pkl, an object .npy), resource attacks (deflate bomb, huge sizes, deep nesting,
memo and hashing bombs), broken zip integrity and files that are not checkpoints at all.
Payloads point at a canary file: it must never appear. Benign files that torch's
``weights_only`` loader rejects must load exactly.

Run ``python tests/test_hostile.py`` to run every case in one process and print its peak
memory (the suite does that in a subprocess, see ``test_memory_and_time_bounds``).
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

import ckptfit
from ckptfit import (CheckpointError, CorruptCheckpoint, NotACheckpoint, ResourceLimitExceeded, UnsafeCheckpoint,
                     UnsupportedFormat)
from ckptfit.scanning import scan
from _checkpoints import linear_state_dict

MEMORY_LIMIT = 1 << 30


# ----------------------------------------------------------------------------------------- builders

def _cmd(canary: pathlib.Path) -> bytes:
    return f"touch {canary}".encode()


def _s(text: bytes) -> bytes:
    """A protocol-0 STRING argument line."""
    return b"S'" + text + b"'\n"


def _u(text: bytes) -> bytes:
    """A SHORT_BINUNICODE argument."""
    return b"\x8c" + bytes([len(text)]) + text


def _torch_zip(path: pathlib.Path, data_pkl: bytes | None = None, *, obj=None, extra: dict[str, bytes] | None = None,
               drop: tuple[str, ...] = ()) -> pathlib.Path:
    """A real torch.save archive of ``obj`` (default: a state dict), with members replaced or added."""
    buf = io.BytesIO()
    torch.save(obj if obj is not None else linear_state_dict(), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    prefix = src.namelist()[0].split("/")[0] + "/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info.filename)
            if info.filename == prefix + "data.pkl" and data_pkl is not None:
                data = data_pkl
            out.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile warns about the duplicate names written on purpose
                out.writestr(prefix + name, data)
    return path


def _legacy(path: pathlib.Path, obj_pickle: bytes, keys_pickle: bytes = b"\x80\x02]q\x00.") -> pathlib.Path:
    """A legacy torch file: magic, protocol, sys info, the object pickle, the storage key list."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    path.write_bytes(head + obj_pickle + keys_pickle)
    return path


class _Reduce:
    """An object that pickles as ``fn(*args)``: how real payloads are written."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _system(canary) -> _Reduce:
    return _Reduce(os.system, f"touch {canary}")


# ----------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    id: str
    build: Callable[[pathlib.Path, pathlib.Path], pathlib.Path]  # (tmp_path, canary) -> file
    error: type[CheckpointError]
    match: str
    action: str = "load"  # "load": open + every tensor; "scan": ckptfit.scan; "both"

    @property
    def heavy(self) -> bool:
        """Resource attacks: also run in a fresh process whose peak memory is measured."""
        return issubclass(self.error, ResourceLimitExceeded) or self.id.startswith(("deflate", "deep"))


def _p(tmp: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    p = tmp / name
    p.write_bytes(data)
    return p


DANGER = r"refusing to load: its pickled data references code that would run on load: "

CASES: list[Case] = [
    # ---- code execution, every opcode form, in a plain pickle file
    Case("GLOBAL+REDUCE", lambda t, c: _p(t, "a.pkl", b"\x80\x02cos\nsystem\n(" + _s(_cmd(c)) + b"tR."),
         UnsafeCheckpoint, DANGER + r"os\.system \(called\)", "both"),
    Case("STACK_GLOBAL", lambda t, c: _p(t, "a.pkl", b"\x80\x04" + _u(b"posix") + _u(b"system") + b"\x93"
                                         + _u(_cmd(c)) + b"\x85R."),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("INST", lambda t, c: _p(t, "a.pkl", b"(" + _s(_cmd(c)) + b"ios\nsystem\n."),
         UnsafeCheckpoint, DANGER + r"os\.system \(called\)", "scan"),
    Case("OBJ", lambda t, c: _p(t, "a.pkl", b"\x80\x01(cos\nsystem\n" + _s(_cmd(c)) + b"o."),
         UnsafeCheckpoint, DANGER + r"os\.system \(called\)", "both"),
    Case("NEWOBJ", lambda t, c: _p(t, "a.pkl", b"\x80\x02csubprocess\nPopen\n(" + _s(_cmd(c)) + b"t\x81."),
         UnsafeCheckpoint, DANGER + r"subprocess\.Popen \(called\)", "both"),
    Case("NEWOBJ_EX", lambda t, c: _p(t, "a.pkl", b"\x80\x04csubprocess\nrun\n(" + _s(_cmd(c)) + b"t}\x92."),
         UnsafeCheckpoint, DANGER + r"subprocess\.run \(called\)", "both"),
    Case("EXT-opcode", lambda t, c: _p(t, "a.pkl", b"\x80\x02\x82\x01(" + _s(_cmd(c)) + b"tR."),
         UnsafeCheckpoint, DANGER + r"copyreg\.extension #1 \(called\)", "both"),
    Case("builtin-alias-eval", lambda t, c: _p(t, "a.pkl", b"\x80\x02c__builtin__\neval\n("
                                               + _s(b"__import__('os').system('" + _cmd(c) + b"')") + b"tR."),
         UnsafeCheckpoint, DANGER + r"builtins\.eval \(called\)", "both"),
    Case("py2-commands-alias", lambda t, c: _p(t, "a.pkl", b"\x80\x02ccommands\ngetoutput\n(" + _s(_cmd(c))
                                               + b"tR."),
         UnsafeCheckpoint, DANGER + r"subprocess\.getoutput \(called\)", "both"),
    Case("dotted-name", lambda t, c: _p(t, "a.pkl", b"\x80\x04" + _u(b"pathlib") + _u(b"os.system") + b"\x93"
                                        + _u(_cmd(c)) + b"\x85R."),
         UnsafeCheckpoint, DANGER + r"pathlib\.os\.system \(called\)", "both"),
    Case("getattr-chain", lambda t, c: _p(t, "a.pkl", b"\x80\x02cbuiltins\ngetattr\n(cimportlib\nimport_module\n("
                                          + _s(b"os") + b"tR" + _s(b"system") + b"tR(" + _s(_cmd(c)) + b"tR."),
         UnsafeCheckpoint, DANGER + r"builtins\.getattr \(called\), importlib\.import_module \(called\)", "both"),
    Case("runpy", lambda t, c: _p(t, "a.pkl", pickle.dumps(_Reduce(__import__("runpy").run_path, str(c))) ),
         UnsafeCheckpoint, DANGER + r"runpy\.run_path \(called\)", "both"),
    Case("nested-pickle-loads", lambda t, c: _p(t, "a.pkl", pickle.dumps(_Reduce(pickle.loads,
                                                                                 pickle.dumps(_system(c))))),
         UnsafeCheckpoint, DANGER + r"_pickle\.loads \(called\)", "both"),
    Case("popped-result", lambda t, c: _p(t, "a.pkl", b"\x80\x02cos\nsystem\n(" + _s(_cmd(c)) + b"tR0}."),
         UnsafeCheckpoint, DANGER + r"os\.system \(called\)", "both"),
    Case("named-never-called", lambda t, c: _p(t, "a.pkl", b"\x80\x02}(X\x01\x00\x00\x00acos\nsystem\nu."),
         UnsafeCheckpoint, DANGER + r"os\.system\n", "both"),
    Case("torch-fx-exec", lambda t, c: _p(t, "a.pkl", b"\x80\x02ctorch.fx.graph_module\nreduce_graph_module\n(}"
                                          + _s(b"import os") + b"tR."),
         UnsafeCheckpoint, DANGER + r"torch\.fx\.graph_module\.reduce_graph_module", "both"),
    # ---- in a torch zip, a legacy file, nested in metadata, hidden after STOP / beside data.pkl
    Case("zip-metadata", lambda t, c: _torch_zip(t / "m.pt", obj={"state_dict": linear_state_dict(), "meta": [{"x": _system(c)}]}),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("zip-after-stop", lambda t, c: _torch_zip(t / "m.pt", _zip_data_pkl() + pickle.dumps(_system(c))),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("zip-constants-pkl", lambda t, c: _torch_zip(t / "m.pt", extra={"constants.pkl": pickle.dumps(_system(c))}),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("legacy-object", lambda t, c: _legacy(t / "l.pt", pickle.dumps({"w": _system(c)}, protocol=2)),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("legacy-5th-pickle", lambda t, c: _legacy(t / "l.pt", pickle.dumps({}, protocol=2),
                                                   pickle.dumps(_system(c), protocol=2)),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    Case("legacy-after-storages", lambda t, c: _p(t, "l.pt", _legacy_bytes() + pickle.dumps(_system(c))),
         UnsafeCheckpoint, DANGER + r"posix\.system \(called\)", "both"),
    # ---- resource attacks
    Case("deflate-bomb", lambda t, c: _deflate_bomb(t / "bomb.pt"),
         ResourceLimitExceeded, r"would inflate from \d+ to \d+ bytes \(a zip bomb\?\)", "both"),
    Case("deflate-bomb-lying-size", lambda t, c: _deflate_bomb(t / "bomb.pt", lie=True),
         CorruptCheckpoint, r"inflates to more than its declared \d+ bytes"),
    Case("huge-storage", lambda t, c: _torch_zip(t / "h.pt", _zip_data_pkl().replace(b"K\x0c", b"\x8a\x06" + (1 << 44).to_bytes(6, "little"), 1)),
         CorruptCheckpoint, r"storage '0' declares \d+ bytes but its record holds 48"),
    Case("huge-view", lambda t, c: _torch_zip(t / "h.pt", _zip_data_pkl().replace(b"K\x04K\x03\x86", b"\x8a\x06" + (1 << 44).to_bytes(6, "little") + b"K\x03\x86", 1)),
         CorruptCheckpoint, r"reaches element \d+ of storage '0', which holds only 12 elements"),
    Case("legacy-huge-storage", lambda t, c: _p(t, "l.pt", _legacy_bytes(numel=1 << 50)),
         CorruptCheckpoint, r"storage '\d+' declares \d+ elements .* but the whole file holds \d+ bytes"),
    Case("deep-nesting", lambda t, c: _p(t, "a.pkl", b"\x80\x02" + b"]" * 1_000_000 + b"a" * 999_999 + b"."),
         ResourceLimitExceeded, r"the pickled data \(pickle\) nests containers more than 1000 deep"),
    Case("deep-tuple-key", lambda t, c: _p(t, "a.pkl", b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns."),
         ResourceLimitExceeded, r"a dict key or set item nests .* \(a hashing bomb\?\)"),
    Case("billion-laughs-key", lambda t, c: _p(t, "a.pkl", _laughs(b"\x86", 100) + b"}h\x00Ns."),
         ResourceLimitExceeded, r"a hashing bomb"),
    Case("billion-laughs-str", lambda t, c: _p(t, "a.pkl", b"\x80\x02cbuiltins\nstr\n" + _laughs(b"\x86", 100)[2:]
                                               + b"\x85R."),
         CorruptCheckpoint, r"str\(\) of a container"),
    Case("billion-laughs-persid", lambda t, c: _torch_zip(t / "b.pt", _laughs(b"\x86", 100) + b"Q.")
         , CorruptCheckpoint, r"unexpected persistent id in data\.pkl: \[\["),
    Case("set-memory-bomb", lambda t, c: _p(t, "a.pkl", b"\x80\x02" + b"\x8f" * 4_000_000 + b"."),
         ResourceLimitExceeded, r"builds more than \d+ MiB of Python objects by byte \d+ \(a memory bomb\?\)"),
    Case("bytes-alloc", lambda t, c: _p(t, "a.pkl", b"\x80\x02cbuiltins\nbytes\n\x8a\x06" + (1 << 44).to_bytes(6, "little")
                                        + b"\x85R."),
         ResourceLimitExceeded, r"bytes\(17592186044416\) would allocate"),
    Case("list-of-range", lambda t, c: _p(t, "a.pkl", b"\x80\x02cbuiltins\nlist\ncbuiltins\nrange\n\x8a\x06"
                                          + (1 << 44).to_bytes(6, "little") + b"\x85R\x85R."),
         CorruptCheckpoint, r"list\(\) applied to a range"),
    Case("long-binput-huge-index", lambda t, c: _p(t, "a.pkl", b"\x80\x02Nr\xff\xff\xff\xff0j\x00\x00\x00\x00."),
         CorruptCheckpoint, r"memo entry 0 is used before it is defined"),
    Case("long4-huge", lambda t, c: _p(t, "a.pkl", b"\x80\x02\x8b\xff\xff\xff\x7f."),
         ResourceLimitExceeded, r"LONG4 integer of 2147483647 bytes"),
    Case("binbytes8-huge", lambda t, c: _p(t, "a.pkl", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"."),
         CorruptCheckpoint, r"the data ends in the middle of an opcode"),
    Case("frame-overrun", lambda t, c: _p(t, "a.pkl", b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N."),
         CorruptCheckpoint, r"FRAME of \d+ bytes runs past the end of the data"),
    Case("opcode-across-frame", lambda t, c: _p(t, "a.pkl", b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00"
                                                 + b"\x8c\x05hello."),
         CorruptCheckpoint, r"an opcode crosses the end of its FRAME"),
    Case("numpy-object-huge-shape", lambda t, c: _p(t, "a.pkl", _np_object_huge()),
         CorruptCheckpoint, r"numpy object array state is malformed"),
    # ---- zip integrity
    Case("bad-crc-data-pkl", lambda t, c: _corrupt_member(_torch_zip(t / "c.pt"), "data.pkl"),
         CorruptCheckpoint, r"member 'archive/data\.pkl' fails its CRC check"),
    Case("bad-crc-tensor", lambda t, c: _corrupt_member(_torch_zip(t / "c.pt"), "data/0"),
         CorruptCheckpoint, r"tensor record 'archive/data/0' fails its CRC check", "load"),
    Case("truncated-zip", lambda t, c: _p(t, "c.pt", _torch_zip(t / "x.pt").read_bytes()[:-30]),
         CorruptCheckpoint, r"torch zip archive is truncated or damaged"),
    Case("overlapping-members", lambda t, c: _overlap(t / "o.pt"),
         CorruptCheckpoint, r"members 'o/data/0' and 'o/data/1' overlap"),
    Case("duplicate-members", lambda t, c: _torch_zip(t / "d.pt", extra={"data.pkl": pickle.dumps(_system(c))}),
         CorruptCheckpoint, r"has the member 'archive/data\.pkl' twice"),
    Case("path-traversal", lambda t, c: _torch_zip(t / "p.pt", extra={"../../evil.pkl": b"x"}),
         CorruptCheckpoint, r"has a member with an absolute or '\.\.' path: 'archive/\.\./\.\./evil\.pkl'"),
    Case("name-mismatch", lambda t, c: _rename_local(_torch_zip(t / "n.pt"), b"archive/data.pkl", b"archive/data.pkX"),
         CorruptCheckpoint, r"member 'archive/data\.pkl' is named 'archive/data\.pkX' in its local header"),
    Case("method-mismatch", lambda t, c: _patch_local_method(_torch_zip(t / "n.pt")),
         CorruptCheckpoint, r"compressed with method 8 in its local header but 0 in the directory"),
    Case("encrypted", lambda t, c: _encrypt_flag(_torch_zip(t / "e.pt")),
         UnsupportedFormat, r"member 'archive/.*' is encrypted"),
    # ---- not checkpoints
    Case("empty", lambda t, c: _p(t, "e.pt", b""), NotACheckpoint, r"the file is empty \(0 bytes\)"),
    Case("html", lambda t, c: _p(t, "e.pt", b"<!DOCTYPE html><html><body>Sign in</body></html>"),
         NotACheckpoint, r"this is an HTML/XML page, not a checkpoint"),
    Case("git-lfs", lambda t, c: _p(t, "e.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"),
         NotACheckpoint, r"this is a Git LFS pointer"),
    Case("random-bytes", lambda t, c: _p(t, "e.pt", np.random.default_rng(0).bytes(4096).replace(b"\x80", b"\x00")),
         NotACheckpoint, r"unrecognised content|looks like pickle data|text file"),
    Case("gzip-wrapped", lambda t, c: _p(t, "e.pt.gz", gzip.compress(_torch_zip(t / "x.pt").read_bytes())),
         NotACheckpoint, r"this is a gzip-compressed file"),
    Case("7z-wrapped", lambda t, c: _p(t, "e.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(56)),
         NotACheckpoint, r"this is a 7-Zip archive"),
]


def _zip_data_pkl() -> bytes:
    """data.pkl of ``_torch_zip``'s default state dict (weight [4, 3], bias [4])."""
    buf = io.BytesIO()
    torch.save(linear_state_dict(), buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _legacy_bytes(numel: int | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    if numel is not None:  # the storage record in the object pickle declares 4 elements: K\x04
        i = data.index(b"cpu")
        j = data.index(b"K\x04", i)
        data = data[:j] + b"\x8a\x08" + numel.to_bytes(8, "little") + data[j + 2:]
    return data


def _laughs(tuple_op: bytes, depth: int) -> bytes:
    """x0 = (); x_k = (x_{k-1}, x_{k-1}) through the memo: 2**depth leaves in depth*6 bytes."""
    out = b"\x80\x02)q\x000"
    for _ in range(depth):
        out += b"h\x00h\x00" + tuple_op + b"q\x000"
    return out + b"h\x00"  # x_depth on the stack


def _np_object_huge() -> bytes:
    arr = np.empty((2,), dtype=object)
    arr[0], arr[1] = 1, 2
    data = pickle.dumps(arr, protocol=2)
    return data.replace(b"K\x02\x85", b"J\x00\xca\x9a;J\x00\xca\x9a;\x86", 1)  # shape (1e9, 1e9)


def _raw_zip(path: pathlib.Path, members: list[tuple[str, bytes, int, int, int]]) -> pathlib.Path:
    """A zip written byte by byte: (name, raw bytes as stored, method, crc, declared size) per member."""
    out = bytearray()
    central = bytearray()
    for name, raw, method, crc, size in members:
        n = name.encode()
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(raw), size, len(n), 0)
        out += n + raw
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(raw), size,
                               len(n), 0, 0, 0, 0, 0, offset) + n
    start = len(out)
    out += central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), start, 0)
    path.write_bytes(bytes(out))
    return path


def _deflate_bomb(path: pathlib.Path, lie: bool = False) -> pathlib.Path:
    """data.pkl replaced by 256 MiB of zeros deflated to ~250 KB (built in 1 MiB steps, never whole)."""
    buf = io.BytesIO()
    torch.save(linear_state_dict(), buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    bomb = b"".join(c.compress(chunk) for _ in range(256)) + c.flush()
    members = []
    for info in z.infolist():
        if info.filename.endswith("/data.pkl"):
            members.append((info.filename, bomb, 8, 0, 1000 if lie else 256 << 20))
        else:
            data = z.read(info.filename)
            members.append((info.filename, data, 0, zlib.crc32(data), len(data)))
    return _raw_zip(path, members)


def _corrupt_member(path: pathlib.Path, member: str) -> pathlib.Path:
    z = zipfile.ZipFile(path)
    prefix = z.namelist()[0].split("/")[0] + "/"
    info = z.getinfo(prefix + member)
    data = bytearray(path.read_bytes())
    off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    z.close()
    data[off + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _overlap(path: pathlib.Path) -> pathlib.Path:
    """data/0's declared size reaches over data/1's header (the classic overlapping-file zip trick)."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(4), "b": torch.ones(4)}, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    members = []
    for info in z.infolist():
        data = z.read(info.filename)
        members.append((info.filename.replace("archive/", "o/"), data, 0, zlib.crc32(data), len(data)))
    _raw_zip(path, members)
    z = zipfile.ZipFile(path)
    a = z.getinfo("o/data/0")
    b = z.getinfo("o/data/1")
    z.close()
    grow = b.header_offset + 40 - a.header_offset - 30 - len(a.filename) - a.compress_size
    data = bytearray(path.read_bytes())
    for sig, at, hdr in ((b"PK\x01\x02", 20, 46), (b"PK\x03\x04", 18, 30)):
        i = data.index(sig + b"", data.index(b"o/data/0", data.index(sig)) - hdr) if sig == b"PK\x01\x02" \
            else a.header_offset
        i = data.rfind(sig, 0, data.index(b"o/data/0", i) + 1) if sig == b"PK\x01\x02" else i
        struct.pack_into("<II", data, i + at, a.compress_size + grow, a.file_size + grow)
    path.write_bytes(bytes(data))
    return path


def _rename_local(path: pathlib.Path, old: bytes, new: bytes) -> pathlib.Path:
    data = path.read_bytes()
    i = data.index(old)  # the first occurrence is the local header
    path.write_bytes(data[:i] + new + data[i + len(old):])
    return path


def _patch_local_method(path: pathlib.Path) -> pathlib.Path:
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 8)  # the first member's local header says deflate
    path.write_bytes(bytes(data))
    return path


def _encrypt_flag(path: pathlib.Path) -> pathlib.Path:
    data = bytearray(path.read_bytes())
    i = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, i + 8, struct.unpack_from("<H", data, i + 8)[0] | 1)
    path.write_bytes(bytes(data))
    return path


def _load_everything(path: pathlib.Path) -> None:
    with ckptfit.open(path) as ckpt:
        ckpt.metadata  # noqa: B018 - renders every placeholder and container
        ckpt.state_dict()
        for _, t in ckpt.tensors():
            t.load()


def run_case(case: Case, tmp: pathlib.Path) -> None:
    canary = tmp / "canary"
    path = case.build(tmp, canary)
    if case.action in ("load", "both"):
        with pytest.raises(case.error, match=case.match) as info:
            _load_everything(path)
        assert "Traceback" not in str(info.value)
    if case.action in ("scan", "both"):
        if issubclass(case.error, UnsafeCheckpoint):
            report = scan(path)
            assert report.verdict == "dangerous", report
            assert report.exit_code == 5
        elif issubclass(case.error, NotACheckpoint):
            with pytest.raises(NotACheckpoint, match=case.match):
                scan(path)
        else:
            report = scan(path)
            assert report.verdict == "error" and any(__import__("re").search(case.match, e) for e in report.errors), \
                report
    assert not canary.exists(), f"{case.id}: the payload ran"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptfit.safety

    # A lower object budget keeps the memory-bomb case fast here; test_memory_and_time_bounds runs
    # it against the real limit in a fresh process and measures its memory.
    if case.id == "set-memory-bomb":
        monkeypatch.setattr(ckptfit.safety, "MAX_OBJECT_BYTES", 64 << 20)
    run_case(case, tmp_path)  # the cases that could hang or blow up run isolated, under a watchdog


def test_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.slow
def test_memory_and_time_bounds(tmp_path: pathlib.Path) -> None:
    """The resource attacks in one fresh process, real limits: peak RSS stays within 1 GB of the baseline."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    worst = max(((int(line.split()[1]), line.split()[0]) for line in proc.stdout.splitlines()
                 if line.startswith("case-")), default=(0, ""))
    assert worst[0] < MEMORY_LIMIT, f"{worst[1]} took {worst[0] >> 20} MiB extra"
    assert "case-set-memory-bomb" in proc.stdout and "case-deflate-bomb" in proc.stdout


def test_scan_cli_exit_codes(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from ckptfit.cli import main

    canary = tmp_path / "canary"
    bad = _torch_zip(tmp_path / "bad.pt", obj={"state_dict": linear_state_dict(), "x": _system(canary)})
    good = _torch_zip(tmp_path / "good.pt")
    runner = CliRunner()
    r = runner.invoke(main, ["scan", str(bad)])
    assert r.exit_code == 5 and "posix.system" in r.output and "DANGEROUS" in r.output
    r = runner.invoke(main, ["scan", str(good), "--json"])
    assert r.exit_code == 0
    assert __import__("json").loads(r.output)["verdict"] == "clean"
    empty = _p(tmp_path, "empty.pt", b"")
    r = runner.invoke(main, ["scan", str(empty)])
    lines = r.stderr.strip().splitlines()  # one error line, then its hint
    assert r.exit_code == 1 and len(lines) == 2 and "the file is empty" in lines[0] and lines[1].startswith("  hint: ")
    assert not canary.exists()


def test_scan_reports_anomalies_and_every_pickle(tmp_path: pathlib.Path) -> None:
    path = _corrupt_member(_torch_zip(tmp_path / "c.pt", _zip_data_pkl() + b"junk",
                                      extra={"constants.pkl": pickle.dumps(argparse.Namespace(a=1))}), "data/0")
    report = scan(path)
    assert set(report.pickles) == {"archive/data.pkl", "archive/constants.pkl"}
    assert any("archive/data/0: CRC mismatch" in a for a in report.anomalies)
    assert any("4 byte(s) of trailing data after STOP" in a for a in report.anomalies)
    assert [r.qualname for r in report.inert] == ["argparse.Namespace"] and not report.unknown  # allowlisted
    assert report.verdict not in ("dangerous", "not known to be safe")
    d = report.to_dict()
    assert d["crc_checked"] == len(zipfile.ZipFile(path).namelist()) and d["inert"] == ["argparse.Namespace"]
    assert "argparse.Namespace" in str(report)


def test_scan_npy_npz(tmp_path: pathlib.Path) -> None:
    canary = tmp_path / "canary"
    arr = np.empty((2,), dtype=object)
    arr[0], arr[1] = _system(canary), 1
    np.save(tmp_path / "obj.npy", arr, allow_pickle=True)
    assert scan(tmp_path / "obj.npy").verdict == "dangerous"
    np.savez(tmp_path / "a.npz", x=np.arange(3), y=arr)
    report = scan(tmp_path / "a.npz")
    assert report.format == "npz" and report.verdict == "dangerous"
    assert [r.qualname for r in report.dangerous] == ["posix.system"]
    np.save(tmp_path / "plain.npy", np.arange(5.0))
    assert scan(tmp_path / "plain.npy").verdict == "clean"
    assert not canary.exists()


def test_scan_legacy_and_torchscript_are_clean(tmp_path: pathlib.Path) -> None:
    torch.save({"sd": linear_state_dict()}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    r = scan(tmp_path / "l.pt")
    assert r.format == "torch-legacy" and r.verdict == "clean" and len(r.pickles) == 5
    torch.jit.save(torch.jit.trace(nn.Linear(3, 4), torch.randn(1, 3)), tmp_path / "ts.pt")
    r = scan(tmp_path / "ts.pt")
    assert r.format == "torchscript" and r.verdict == "clean"
    assert any(p.endswith("constants.pkl") for p in r.pickles)


# ----------------------------------------------------------------------------------------- benign files

def _check_loads_exactly(path: pathlib.Path, sd: dict[str, torch.Tensor]) -> ckptfit.Checkpoint:
    ckpt = ckptfit.open(path)
    got = ckpt.state_dict().tensors
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert torch.equal(got[k].load(), v), k
    model = nn.Linear(3, 4)
    report = ckptfit.load(model, path)
    assert report is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    return ckpt


@pytest.mark.parametrize("protocol", [4, 5])
def test_benign_protocols(tmp_path: pathlib.Path, protocol: int) -> None:
    sd = linear_state_dict()
    torch.save(sd, tmp_path / "p.pt", pickle_protocol=protocol)
    _check_loads_exactly(tmp_path / "p.pt", sd)


def test_benign_metadata(tmp_path: pathlib.Path) -> None:
    from omegaconf import OmegaConf

    sd = linear_state_dict()
    obj = {"state_dict": sd, "args": argparse.Namespace(lr=0.1, name="run"), "np_scalar": np.float32(1.5),
           "np_int": np.int64(7), "np_array": np.arange(6, dtype=np.float64).reshape(2, 3),
           "path": pathlib.PosixPath("/data/run1"), "win": pathlib.PureWindowsPath("C:/data/run1"),
           "cfg": OmegaConf.create({"model": {"depth": 18, "widths": [1, 2]}}), "epoch": 3}
    torch.save(obj, tmp_path / "m.pt")
    ckpt = _check_loads_exactly(tmp_path / "m.pt", sd)
    md = ckpt.metadata
    assert md["args"] == {"__class__": "argparse.Namespace", "lr": 0.1, "name": "run"}
    assert md["np_scalar"] == 1.5 and md["np_int"] == 7
    assert md["np_array"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert md["path"] == "/data/run1" and md["win"] == "C:\\data\\run1" and md["epoch"] == 3
    assert md["cfg"]["__class__"] == "omegaconf.dictconfig.DictConfig"
    assert ckpt.safety.verdict == "safe, with placeholders"


def test_benign_windows_path_crafted(tmp_path: pathlib.Path) -> None:
    """A pickle naming pathlib.WindowsPath (what Windows writes; not instantiable on Linux) loads as data."""
    sd = linear_state_dict()
    torch.save({"state_dict": sd, "out": pathlib.PureWindowsPath("D:/out")}, tmp_path / "w.pt")
    data = zipfile.ZipFile(tmp_path / "w.pt").read("w/data.pkl").replace(b"PureWindowsPath", b"WindowsPath")
    _torch_zip(tmp_path / "w2.pt", data, obj={"state_dict": sd, "out": pathlib.PureWindowsPath("D:/out")})
    ckpt = _check_loads_exactly(tmp_path / "w2.pt", sd)
    assert ckpt.metadata["out"] == "D:\\out"


def test_placeholders_cannot_be_pickled_back(tmp_path: pathlib.Path) -> None:
    torch.save({"state_dict": linear_state_dict(), "args": argparse.Namespace(a=1)}, tmp_path / "m.pt")
    ckpt = ckptfit.open(tmp_path / "m.pt")
    with pytest.raises(TypeError, match="placeholder cannot be pickled"):
        pickle.dumps(ckpt.tree["args"])


if __name__ == "__main__":  # one process, every case: print the peak RSS each adds over the baseline
    import resource
    import tempfile

    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    _torch_zip(root / "warmup.pt")
    _load_everything(root / "warmup.pt")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i, case in enumerate(CASES):
        if not case.heavy:
            continue
        d = root / f"case{i}"
        d.mkdir()
        start = time.perf_counter()
        try:
            run_case(case, d)
        except BaseException as e:  # noqa: BLE001 - report and go on
            print(f"case-{case.id} 0 FAILED {type(e).__name__}: {e}")
            sys.exit(1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"case-{case.id} {peak - base} {time.perf_counter() - start:.2f}s")
