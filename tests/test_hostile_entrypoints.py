"""Hostile files against every entry point: each works or raises a ckptfit error, within time and memory.

Every case is built here, by code (``tests/_hostile_builders.py``), and every entry point is run on
it: ``open`` (+ metadata, safety, every tensor), ``load``, ``build``, ``inspect`` (+ rendering),
``scan`` (+ rendering), ``convert`` to safetensors and to ``.pt``, ``diff``, ``identify`` and
``from_checkpoint`` (what ``ckptfit load FILE`` runs without ``--model``), in-process; then each CLI
command through click's runner: exit code 0, 1, 2 or its verdict code, one ``error:`` line on stderr, no traceback,
no terminal escape. Cases that crashed, hung or blew up memory before run in a child process under
a timeout and an address-space limit, which measures its peak memory.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import ckptfit
from ckptfit import CheckpointError

sys.path.insert(0, os.path.dirname(__file__))
from _hostile_builders import (CLI_COMMANDS, ENTRY_POINTS, call, dcp_folder, deflate_member_bomb,  # noqa: E402
                               glob, hf_folder, long4, nested_tuple, run_cli, run_entry_point, sd, torch_zip_bytes,
                               u, write)

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = "torchvision.models.resnet18"  # identify's index: one family, built once per session
TIMEOUT_S = 60
MEMORY_LIMIT = 1 << 30  # peak RSS a case may add over the child's baseline


@pytest.fixture(scope="module", autouse=True)
def _identify_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("ckptfit-cache")
    mp.setenv("CKPTFIT_CACHE", str(path))
    mp.setenv("CKPTFIT_IDENTIFY_FAMILIES", FAMILIES)
    yield path
    mp.undo()


# ----------------------------------------------------------------------------------------- builders

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(3, 4)


def _module_with(attr: str, value) -> Callable[[pathlib.Path], pathlib.Path]:
    def build(t: pathlib.Path) -> pathlib.Path:
        m = _Net()
        object.__setattr__(m.sub, attr, value)
        return write(t / "m.pt", torch_zip_bytes(m))
    return build


def _dcp_edit(fn) -> Callable[[pathlib.Path], pathlib.Path]:
    return lambda t: dcp_folder(t / "dcp", fn)


def _set_first_index(attr, value):
    def edit(md):
        object.__setattr__(next(iter(md.storage_data)), attr, value)
    return edit


def _set_chunks(value):
    def edit(md):
        object.__setattr__(md.state_dict_metadata["model.weight"], "chunks", value)
    return edit


def _fifo_shard(t: pathlib.Path) -> pathlib.Path:
    d = hf_folder(t / "hf")
    p = d / "model-00001-of-00002.safetensors"
    p.unlink()
    os.mkfifo(p)
    return d


def _fifo_file(t: pathlib.Path) -> pathlib.Path:
    os.mkfifo(t / "f.pt")
    return t / "f.pt"


def _fifo_config(t: pathlib.Path) -> pathlib.Path:
    d = hf_folder(t / "hf")
    os.mkfifo(d / "config.json")
    return d


def _symlink_to_fifo(t: pathlib.Path) -> pathlib.Path:
    os.mkfifo(t / "pipe")
    os.symlink(t / "pipe", t / "link.pt")
    return t / "link.pt"


def _symlink_loop(t: pathlib.Path) -> pathlib.Path:
    os.symlink(t / "b.pt", t / "a.pt")
    os.symlink(t / "a.pt", t / "b.pt")
    return t / "a.pt"


def _st_header(header: str) -> Callable[[pathlib.Path], pathlib.Path]:
    raw = header.encode()
    return lambda t: write(t / "m.safetensors", struct.pack("<Q", len(raw)) + raw)


def _tensor_edit(old: bytes, new: bytes) -> Callable[[pathlib.Path], pathlib.Path]:
    """The archive of ``{"state_dict": Linear(3, 4)}`` with one byte sequence of data.pkl replaced."""
    def edit(d: bytes) -> bytes:
        assert old in d
        return d.replace(old, new, 1)
    return lambda t: write(t / "m.pt", torch_zip_bytes(pkl_edit=edit))


# the weight's record in data.pkl: BINPERSID, offset 0, size (4, 3), stride (3, 1)
_W_VIEW = b"QK\x00K\x04K\x03\x86q\x0bK\x03K\x01\x86"


def _many_bytearrays(n: int) -> bytes:
    """A list of ``n`` bytearray(2**24): 16 MiB each from 8 bytes of pickle (the callable memoised)."""
    return (glob("builtins", "bytearray") + b"r\x00\x00\x10\x000" + b"](" +
            b"".join(b"j\x00\x00\x10\x00(J\x00\x00\x00\x01tR" for _ in range(n)) + b"e")


def _many_globals(n: int) -> bytes:
    return b"(" + b"".join(b"cmod%d\nname%d\n0" % (i, i) for i in range(n)) + b"1" + u("y")


def _long_keys(t: pathlib.Path) -> pathlib.Path:
    run = "1" * 20_000
    s = {f"{run}x1": torch.zeros(1), f"{run}y1": torch.zeros(1), f"a.{run}x1": torch.zeros(1)}
    return write(t / "m.pt", torch_zip_bytes({"state_dict": s}))


def _tensor_fragment() -> bytes:
    from _fuzz_entrypoints import _tensor

    return _tensor("FloatStorage", 0, 0, [], [], False)


def _markup(t: pathlib.Path) -> pathlib.Path:
    s = sd()
    s["[/x]"] = torch.zeros(1)
    s["a\x1b[31m\x1b]0;pwned\x07.weight"] = torch.zeros(1)
    return write(t / "m.pt", torch_zip_bytes({"[/state]": s, "[/x]": "[bold red]\x1b[2J", "note": "[/]"}))


def _markup_global(t: pathlib.Path) -> pathlib.Path:
    frag = call("[/x]", "\x1b[31mred", u("[/y]"))
    return write(t / "m.pt", torch_zip_bytes(fragment=frag))


def _markup_device(t: pathlib.Path) -> pathlib.Path:
    # the storage's saved location, shown in inspect's table
    return _tensor_edit(b"X\x03\x00\x00\x00cpu", u("[/x]\x1b[31m"))(t)


# ----------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    id: str
    build: Callable[[pathlib.Path], pathlib.Path]
    open_error: type[CheckpointError] | None = None  # what ckptfit.open raises (None: it opens)
    match: str = ""
    isolated: bool = False  # crashed, hung or blew up memory before: run in a child process


CASES = [
    # foreign exceptions from the pickle interpreter
    Case("codec-unknown-encoding", lambda t: write(t / "m.pt", torch_zip_bytes(
        fragment=call("builtins", "bytes", u("abc"), u("no-such-codec")))), ckptfit.CorruptCheckpoint,
         "names the codec 'no-such-codec'"),
    Case("codec-encode-unknown-handler", lambda t: write(t / "m.pt", torch_zip_bytes(
        fragment=call("_codecs", "encode", u("\udc80"), u("utf-8"), u("no-such-handler")))),
         ckptfit.CorruptCheckpoint, "error handler 'no-such-handler'"),
    Case("codec-str-unknown-encoding", lambda t: write(t / "m.pt", torch_zip_bytes(
        fragment=call("builtins", "str", b"C\x03abc", u("rot13")))), ckptfit.CorruptCheckpoint, "rot13"),
    Case("deep-tuple-dict-key", lambda t: write(t / "m.pt", torch_zip_bytes(key_fragment=nested_tuple(5000))),
         ckptfit.ResourceLimitExceeded, "nests tuples more than 64 deep"),
    Case("deep-tuple-set-item", lambda t: write(t / "m.pt", torch_zip_bytes(
        fragment=b"\x8f(" + nested_tuple(3000) + b"\x90")), ckptfit.ResourceLimitExceeded, "64 deep"),
    Case("int-4400-digit-key", lambda t: write(t / "m.pt", torch_zip_bytes(key_fragment=long4(10 ** 4400))),
         ckptfit.ResourceLimitExceeded, "LONG4 integer of 1828 bytes"),
    Case("int-4400-digit-value", lambda t: write(t / "m.pt", torch_zip_bytes(fragment=long4(-(10 ** 4400)))),
         ckptfit.ResourceLimitExceeded, "LONG4 integer"),
    Case("module-parameters-list", _module_with("_parameters", [1, 2])),
    Case("module-buffers-list", _module_with("_buffers", ["x"])),
    Case("module-nonpersistent-unhashable", _module_with("_non_persistent_buffers_set", [[1], {"a": 1}])),
    Case("module-modules-list", _module_with("_modules", [nn.Linear(1, 1)])),
    # folders: JSON, index and DCP metadata of the wrong shape
    Case("hf-config-deep-json", lambda t: hf_folder(t / "hf", config='{"model_type": "bert", "a": '
                                                    + "[" * 100_000 + "]" * 100_000 + "}")),
    Case("hf-config-nested-200", lambda t: hf_folder(t / "hf", config='{"model_type": "bert", "a": '
                                                     + "[" * 200 + "]" * 200 + "}")),
    Case("hf-index-deep-json", lambda t: hf_folder(t / "hf", index='{"weight_map": ' + "[" * 100_000 + "]" * 100_000
                                                   + "}"), ckptfit.CorruptCheckpoint, "not a valid shard index"),
    Case("hf-index-list-values", lambda t: hf_folder(t / "hf", index={"weight_map": {"weight": ["a"], "bias": {"b": 1}}}),
         ckptfit.CorruptCheckpoint, "names no shard file"),
    Case("hf-index-metadata-list", lambda t: hf_folder(t / "hf", index={"metadata": [1], "weight_map": {
        "weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}})),
    Case("hf-shard-named-dot", lambda t: hf_folder(t / "hf", index={"weight_map": {"weight": ".", "bias": "."}}),
         ckptfit.CorruptCheckpoint, "outside the folder"),
    Case("hf-architecture-not-a-model", lambda t: hf_folder(t / "hf", config=json.dumps(
        {"model_type": "bert", "architectures": ["pipeline"]}))),
    Case("hf-architecture-not-a-string", lambda t: hf_folder(t / "hf", config=json.dumps(
        {"model_type": "bert", "architectures": [["BertModel"]]}))),
    Case("safetensors-deep-header", _st_header('{"x": ' + "[" * 50_000 + "]" * 50_000 + "}"),
         ckptfit.CorruptCheckpoint, "too deep"),
    Case("safetensors-deep-metadata", _st_header('{"__metadata__": {"a": "' + "[" * 50_000 + "]" * 50_000 + '"}}')),
    Case("dcp-fqn-list", _dcp_edit(_set_first_index("fqn", ["a"])), ckptfit.CorruptCheckpoint, "names no tensor"),
    Case("dcp-offset-nested-list", _dcp_edit(_set_first_index("offset", [[1]])), ckptfit.CorruptCheckpoint,
         "expected a tuple of sizes"),
    Case("dcp-chunks-int", _dcp_edit(_set_chunks(5)), ckptfit.CorruptCheckpoint, "chunks are not a list"),
    Case("dcp-chunks-repeated", _dcp_edit(lambda md: object.__setattr__(
        md.state_dict_metadata["model.weight"], "size", torch.Size([8, 3])) or object.__setattr__(
        md.state_dict_metadata["model.weight"], "chunks",
        [md.state_dict_metadata["model.weight"].chunks[0]] * 2)), ckptfit.CorruptCheckpoint, "same chunk twice"),
    # tensors: dtypes that cannot be materialised, views beyond bounds
    Case("qint8-storage-rebuilt-as-tensor", _tensor_edit(b"ctorch\nFloatStorage\n", b"ctorch\nQInt8Storage\n"),
         ckptfit.UnsupportedFormat, "dtype torch.qint8", isolated=True),
    Case("quint4x2-v3-dtype", _tensor_edit(b"ctorch\nFloatStorage\n", b"ctorch\nQUInt8Storage\n"),
         ckptfit.UnsupportedFormat, "dtype torch.quint8", isolated=True),
    Case("zero-stride-view", _tensor_edit(_W_VIEW, b"QK\x00J\x00\x00\x00\x40J\x00\x00\x00\x40\x86q\x0bK\x00K\x00\x86"),
         ckptfit.ResourceLimitExceeded, "MiB of objects", isolated=True),
    Case("zero-size-view-far-offset", _tensor_edit(_W_VIEW, b"Q" + long4(2 ** 61) + b"K\x00K\x03\x86q\x0bK\x03K\x01\x86"),
         ckptfit.CorruptCheckpoint, "empty tensor view starts at element"),
    Case("huge-numel-zero-stride", _tensor_edit(_W_VIEW, b"QK\x00" + long4(2 ** 61) + long4(2 ** 61)
                                                + b"\x86q\x0b" + b"K\x00K\x00\x86"),
         ckptfit.CorruptCheckpoint, "more elements than any tensor", isolated=True),
    # resources: what is held, not what is declared
    Case("bytearray-2**24-repeated", lambda t: write(t / "m.pt", torch_zip_bytes(fragment=_many_bytearrays(60))),
         ckptfit.ResourceLimitExceeded, "MiB of", isolated=True),
    Case("deflate-records-total", lambda t: write(t / "m.pt", deflate_member_bomb(12, 8 << 20)),
         ckptfit.ResourceLimitExceeded, "would inflate from", isolated=True),
    Case("many-globals", lambda t: write(t / "m.pt", torch_zip_bytes(fragment=_many_globals(5_000))),
         ckptfit.ResourceLimitExceeded, "distinct globals", isolated=True),
    Case("many-dangerous-globals", lambda t: write(t / "m.pt", torch_zip_bytes(fragment=b"(" + b"".join(
        b"cos\nrun%d\n0" % i for i in range(30_000)) + b"1" + u("y"))), CheckpointError, r"os\.run0", isolated=True),
    Case("long-keys-fold", _long_keys, isolated=True),
    # non-regular files
    Case("fifo-file", _fifo_file, ckptfit.NotACheckpoint, "FIFO", isolated=True),
    Case("fifo-shard", _fifo_shard, ckptfit.CorruptCheckpoint, "FIFO", isolated=True),
    Case("fifo-config", _fifo_config, isolated=True),
    Case("symlink-to-fifo", _symlink_to_fifo, ckptfit.NotACheckpoint, "FIFO", isolated=True),
    Case("symlink-loop", _symlink_loop, CheckpointError, "cannot be read|no such file"),
    # found by the generative fuzzer (tests/_fuzz_entrypoints.py): keys convert could not write back
    Case("tensor-as-dict-key", lambda t: write(t / "m.pt", torch_zip_bytes(key_fragment=_tensor_fragment()))),
    Case("placeholder-as-dict-key", lambda t: write(t / "m.pt", torch_zip_bytes(
        key_fragment=call("[/x]", "\x1b[31m")))),
    Case("hf-config-architectures-not-a-list", lambda t: hf_folder(t / "hf", config=json.dumps(
        {"model_type": "", "architectures": 1}))),
    Case("hf-config-model-type-list", lambda t: hf_folder(t / "hf", config=json.dumps(
        {"model_type": ["bert"], "architectures": [1], "num_attention_heads": "x"}))),
    # text from the file is never markup or a terminal escape
    Case("markup-and-escapes-in-keys", _markup),
    Case("markup-in-global-names", _markup_global),
    Case("markup-in-saved-device", _markup_device),
]


def run_all(path: str, work: str, *, cli: bool = True) -> dict[str, object]:
    """Every entry point on ``path``: ``{name: "ok" | error class | (exit code, stdout, stderr)}``."""
    out: dict[str, object] = {ep: run_entry_point(ep, path, work) for ep in ENTRY_POINTS}
    if cli:
        for c in CLI_COMMANDS:
            out[f"cli {c}"] = run_cli(c, path, work)
    return out


def check_results(case: Case, path: str, results: dict[str, object]) -> None:
    if case.open_error is not None:
        assert results["open"] == case.open_error.__name__ or (
            case.open_error is CheckpointError and isinstance(results["open"], str) and results["open"] != "ok"), \
            results["open"]
        with pytest.raises(case.open_error, match=case.match):
            ckptfit.open(path)
    for name, r in results.items():
        if not name.startswith("cli "):
            continue
        code, stdout, stderr = r  # type: ignore[misc]
        verdicts = {"cli scan": (3, 4, 5), "cli identify": (6,), "cli diff": (7,)}.get(name, ())  # _cli_common.EXIT_CODES
        assert code in (0, 1, 2, *verdicts), (name, code, stderr)
        assert "Traceback" not in stdout + stderr, name
        assert "\x1b" not in stdout + stderr and "\x07" not in stdout + stderr, (name, stdout, stderr)
        if code == 1:
            lines = [x for x in stderr.splitlines() if not x.startswith(("  hint:", "hint:", "(run with --debug"))]
            assert lines and lines[0].startswith("error: "), (name, stderr)
            assert not re.search(r"error: (LookupError|RecursionError|TypeError|ValueError|AttributeError|"
                                 r"RuntimeError|MemoryError)", stderr), (name, stderr)


IN_PROCESS = [c for c in CASES if not c.isolated]
ISOLATED = [c for c in CASES if c.isolated]


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_entry_points(case: Case, tmp_path: pathlib.Path) -> None:
    path = str(case.build(tmp_path))
    results = run_all(path, str(tmp_path))  # cases that could hang run isolated, under a watchdog
    check_results(case, path, results)


_CHILD = r"""
import faulthandler, json, os, pathlib, resource, sys, time
sys.path.insert(0, {here!r})
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import test_hostile_entrypoints as T
root = pathlib.Path({work!r})
warm = root / "warm"
warm.mkdir(exist_ok=True)
T.run_all(str(T.write(warm / "m.pt", T.torch_zip_bytes())), str(warm))  # imports, identify's index, rich
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for cid in {ids!r}:
    case = next(c for c in T.CASES if c.id == cid)
    work = root / cid
    work.mkdir()
    print("START " + cid, flush=True)
    faulthandler.dump_traceback_later({timeout}, exit=True)  # a hang ends the child, naming where it hung
    start = time.perf_counter()
    path = str(case.build(work))
    results = T.run_all(path, str(work))
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print("RESULT " + json.dumps({{"id": cid, "results": results, "extra": extra,
                                   "seconds": time.perf_counter() - start}}), flush=True)
"""


@pytest.fixture(scope="module")
def isolated_results(tmp_path_factory, _identify_cache) -> dict[str, dict]:
    """Run the isolated cases in child processes (one after the other; a crash or hang ends a child and
    is recorded for the case in progress, and the next child goes on with the cases after it)."""
    root = tmp_path_factory.mktemp("isolated")
    env = {**os.environ, "CKPTFIT_CACHE": str(_identify_cache), "CKPTFIT_IDENTIFY_FAMILIES": FAMILIES}
    todo = [c.id for c in ISOLATED]
    out: dict[str, dict] = {}
    n = 0
    while todo:
        n += 1
        work = root / f"child{n}"
        work.mkdir()
        code = _CHILD.format(here=HERE, limit=8 << 30, ids=todo, work=str(work), timeout=TIMEOUT_S)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                  timeout=TIMEOUT_S * len(todo) + 60)
            stdout, failure = proc.stdout, (f"exit code {proc.returncode}: {proc.stderr[-3000:]}"
                                            if proc.returncode else "")
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            failure = "hung (timeout)"
        current = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("RESULT "):
                data = json.loads(line[7:])
                out[data["id"]] = data
                current = None
        if failure and current is None and not out.keys() >= set(todo):
            current = next(c for c in todo if c not in out)
        if current is not None:
            out[current] = {"failure": failure or "no result"}
        todo = [c for c in todo if c not in out]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ISOLATED, ids=[c.id for c in ISOLATED])
def test_entry_points_isolated(case: Case, isolated_results: dict[str, dict]) -> None:
    """Cases that crashed (segfault), hung or took gigabytes, run in a child under a timeout and an address-space cap."""
    data = isolated_results[case.id]
    assert "failure" not in data, f"{case.id}: {data.get('failure')}"
    assert data["extra"] < MEMORY_LIMIT, f"{case.id} took {data['extra'] >> 20} MiB extra"
    results = {k: tuple(v) if isinstance(v, list) else v for k, v in data["results"].items()}
    if case.open_error is not None:  # the error class, from the child; the message, from its CLI line
        assert results["open"] == case.open_error.__name__ or case.open_error is CheckpointError, results["open"]
        assert re.search(case.match, results["cli inspect"][2]), results["cli inspect"]
    check_results(Case(case.id, case.build), "", results)


def test_enough_cases() -> None:
    assert len(CASES) >= 27


def test_markup_is_shown_literally_and_escapes_are_not_sent(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from ckptfit.cli import main

    path = str(_markup(tmp_path))
    r = CliRunner().invoke(main, ["inspect", path, "--all"])
    assert r.exit_code == 0, r.output
    assert "[/x]" in r.stdout and "[/state]" in r.stdout
    assert "\x1b" not in r.stdout and "\\x1b[31m" in r.stdout
    (tmp_path / "g").mkdir()
    r = CliRunner().invoke(main, ["scan", str(_markup_global(tmp_path / "g"))])
    assert "[/x]" in r.stdout and "\x1b" not in r.stdout, r.stdout
    m = nn.Linear(3, 4)
    report = ckptfit.load(m, path, use="[/state]", partial=True)
    assert "\x1b" not in str(report) and "\\x1b" in str(report)


def test_load_without_model_builds_only_model_classes(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("transformers")
    from ckptfit.auto import from_checkpoint

    d = hf_folder(tmp_path / "hf", config=json.dumps({"model_type": "bert", "architectures": ["pipeline"]}))
    with pytest.raises(CheckpointError, match="'pipeline', which is not a transformers model class"):
        from_checkpoint(d)


def test_pickled_bytes_are_charged_for_what_they_hold(tmp_path: pathlib.Path, monkeypatch) -> None:
    """120 x bytearray(2**24) is 2 GiB from a 2 KB pickle: refused by the object budget, not after allocating."""
    import ckptfit.safety as safety

    monkeypatch.setattr(safety, "MAX_OBJECT_BYTES", 64 << 20)
    path = write(tmp_path / "m.pt", torch_zip_bytes(fragment=_many_bytearrays(8)))
    assert path.stat().st_size < 4096
    with pytest.raises(ckptfit.ResourceLimitExceeded, match="64 MiB"):
        ckptfit.open(path)
    path = write(tmp_path / "ok.pt", torch_zip_bytes(fragment=_many_bytearrays(2)))
    assert len(ckptfit.open(path).metadata["x"]) == 2


def test_legit_expanded_and_compressed_tensors_still_load(tmp_path: pathlib.Path) -> None:
    """What the bounds charge is real use: an expanded (stride 0) tensor and deflated records load exactly."""
    t = torch.arange(3.0).expand(1000, 3)
    torch.save({"e": t}, tmp_path / "e.pt")
    assert torch.equal(ckptfit.open(tmp_path / "e.pt").tree["e"].load(), t)
    sdict = {"w": torch.randn(64, 64), "b": torch.arange(10)}
    write(tmp_path / "z.pt", torch_zip_bytes(sdict, compress=True))
    with ckptfit.open(tmp_path / "z.pt") as ck:
        for k, v in sdict.items():
            assert torch.equal(ck.tree[k].load(), v)


def test_compressed_records_inflate_when_read_not_at_open(tmp_path: pathlib.Path, monkeypatch) -> None:
    import zlib

    calls = []
    real = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: calls.append(a) or real(*a))
    write(tmp_path / "z.pt", torch_zip_bytes({"w": torch.zeros(1000), "v": torch.ones(1000)}, compress=True))
    with ckptfit.open(tmp_path / "z.pt") as ck:
        assert not calls  # open: headers only
        ck.tree["w"].load()
        assert len(calls) == 1
