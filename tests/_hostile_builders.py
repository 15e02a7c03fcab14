"""Builders of hostile inputs for every entry point, and the oracle that runs every entry point on one.

Shared by ``tests/test_hostile_entrypoints.py`` (one test per case) and ``tests/test_fuzz.py`` /
``bench/fuzz.py`` (generated pickles and folders). Every file is built here by code, from a real
``torch.save`` / ``save_file`` / ``dcp.save`` output with one part replaced.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable

import torch
import torch.nn as nn
from _checkpoints import linear_state_dict

MARKER = "MARKERMARKER"  # a string value in data.pkl that a fragment replaces
_MARKER_OP = b"X" + struct.pack("<I", len(MARKER)) + MARKER.encode()


sd = linear_state_dict  # the smallest real checkpoint (tests/_checkpoints.py)


# ----------------------------------------------------------------------------------------- pickle pieces

def u(text: str | bytes) -> bytes:
    """BINUNICODE of ``text``."""
    b = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call(module: str, name: str, *args: bytes) -> bytes:
    """``module.name(*args)``: GLOBAL, MARK, args, TUPLE, REDUCE."""
    return glob(module, name) + b"(" + b"".join(args) + b"tR"


def long4(value: int) -> bytes:
    n = (value.bit_length() + 8) // 8
    return b"\x8b" + struct.pack("<i", n) + value.to_bytes(n, "little", signed=True)


def binint(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def nested_tuple(depth: int) -> bytes:
    return b")" + b"\x85" * depth


def torch_zip_bytes(obj=None, *, fragment: bytes | None = None, key_fragment: bytes | None = None,
                    pkl_edit: Callable[[bytes], bytes] | None = None,
                    member_edit: Callable[[str, bytes], bytes] | None = None, compress: bool = False) -> bytes:
    """A torch.save archive of ``{"state_dict": sd, "x": <fragment>}`` (or ``{<key_fragment>: 1}``)."""
    if obj is None:
        obj = {"state_dict": sd()}
        if fragment is not None:
            obj["x"] = MARKER
        if key_fragment is not None:
            obj[MARKER] = 1
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                if fragment is not None or key_fragment is not None:
                    assert data.count(_MARKER_OP) == 1
                    data = data.replace(_MARKER_OP, fragment if fragment is not None else key_fragment)
                if pkl_edit is not None:
                    data = pkl_edit(data)
            if member_edit is not None:
                data = member_edit(info.filename, data)
            ctype = zipfile.ZIP_DEFLATED if compress and "/data/" in info.filename else zipfile.ZIP_STORED
            z.writestr(info.filename, data, compress_type=ctype, compresslevel=1)
    return out.getvalue()


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def plain_pickle(body: bytes) -> bytes:
    """A protocol-2 pickle of ``{"x": <body>}``."""
    return b"\x80\x02}(" + u("x") + body + b"u."


# ----------------------------------------------------------------------------------------- folders

def hf_folder(d: pathlib.Path, *, index: object | None = None, config: str | bytes | None = None,
              shards: int = 2) -> pathlib.Path:
    """A sharded Hugging Face folder (safetensors shards + index), index and config replaceable."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    s = sd()
    keys = list(s)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: s[k].contiguous() for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    idx = index if index is not None else {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(idx if isinstance(idx, str) else json.dumps(idx))
    if config is not None:
        p = d / "config.json"
        p.write_bytes(config if isinstance(config, bytes) else config.encode())
    return d


def dcp_folder(d: pathlib.Path, edit: Callable[[object], None] | None = None) -> pathlib.Path:
    """A torch.distributed.checkpoint folder, its metadata object edited in place by ``edit``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd(), "step": 5}, checkpoint_id=str(d))
    if edit is not None:
        with open(d / ".metadata", "rb") as f:
            md = pickle.load(f)  # our own file, written just above
        edit(md)
        with open(d / ".metadata", "wb") as f:
            pickle.dump(md, f)
    return d


def deflate_member_bomb(members: int, size: int) -> bytes:
    """A torch zip whose storages are deflate members that each inflate ``size`` bytes, each at a ratio
    (about 120) under the per-member limit: only the file's total gives it away."""
    data = bytearray(size)
    noise = bytes(torch.randint(0, 256, (len(data[::1000]),), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0)))
    data[::1000] = noise
    t = torch.frombuffer(data, dtype=torch.uint8)
    obj = {f"t{i}": t.clone() for i in range(members)}
    return torch_zip_bytes(obj, compress=True)


def raw_crc(data: bytes) -> int:
    return zlib.crc32(data)


# ----------------------------------------------------------------------------------------- the oracle

ENTRY_POINTS = ("open", "load", "build", "inspect", "scan", "convert-st", "convert-pt", "diff", "identify",
                "from_checkpoint")


def _console_text(renderable) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=120, highlight=False).print(renderable)
    return buf.getvalue()


def run_entry_point(name: str, path: str, work: str) -> str:
    """Run one entry point on ``path``: "ok", or the name of the CheckpointError it raised (others escape)."""
    import ckptfit
    from ckptfit import CheckpointError

    try:
        if name == "open":
            with ckptfit.open(path) as ck:
                ck.metadata  # noqa: B018
                ck.safety  # noqa: B018
                for c in ck.state_dicts():
                    c.tensors  # noqa: B018
                for _, t in ck.tensors():
                    t.load()
        elif name == "load":
            ckptfit.load(nn.Linear(3, 4), path, partial=True)
        elif name == "build":
            _, report = ckptfit.build(lambda: nn.Linear(3, 4), path, partial=True)
            str(report)
            _console_text(report)
        elif name == "inspect":
            from ckptfit.inspection import inspect_checkpoint

            info = inspect_checkpoint(path)
            json.dumps(info.to_dict(), default=str)
            from rich.console import Console

            info.print(Console(file=io.StringIO(), width=120, highlight=False))
        elif name == "scan":
            from ckptfit.scanning import render_rich, render_text, scan

            r = scan(path)
            render_text(r)
            _console_text(render_rich(r))
            json.dumps(r.to_dict(), default=str) if hasattr(r, "to_dict") else None
        elif name in ("convert-st", "convert-pt"):
            from ckptfit.conversion import convert

            dst = os.path.join(work, "out.safetensors" if name == "convert-st" else "out.pt")
            for p in (dst,):
                if os.path.exists(p):
                    os.remove(p)
            str(convert(path, dst))
        elif name == "diff":
            from ckptfit.diffing import diff_sources

            d = diff_sources(path, path)
            str(d)
            json.dumps(d.to_dict(), default=str)
        elif name == "identify":
            from ckptfit.identification import identify

            r = identify(path)
            str(r)
            json.dumps(r.to_dict(), default=str)
        elif name == "from_checkpoint":
            from ckptfit.auto import from_checkpoint

            _, report = from_checkpoint(path)
            str(report)
        else:
            raise ValueError(name)
        return "ok"
    except CheckpointError as e:
        assert str(e), "a ckptfit error says something"
        return type(e).__name__


CLI_COMMANDS = ("inspect", "scan", "load", "convert", "diff", "identify")


def run_cli(command: str, path: str, work: str) -> tuple[int, str, str]:
    """One CLI command through click's runner: (exit code, stdout, stderr); a foreign exception escapes."""
    from click.testing import CliRunner

    from ckptfit.cli import main

    args = {"inspect": ["inspect", path], "scan": ["scan", path], "load": ["load", path],
            "convert": ["convert", path, os.path.join(work, "cli-out.safetensors")],
            "diff": ["diff", path, path], "identify": ["identify", path]}[command]
    out = os.path.join(work, "cli-out.safetensors")
    if os.path.exists(out):
        os.remove(out)
    r = CliRunner().invoke(main, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr
