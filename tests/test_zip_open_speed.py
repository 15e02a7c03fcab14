"""The fast paths of opening a pickle-based checkpoint keep every result and record of the general ones.

Opening a torch zip (or legacy) file of many small tensors runs the restricted interpreter's inline
REDUCE for torch's rebuild functions, one small reader object per storage and per tensor, records
declared in file order, a zip directory reader without a ``ZipInfo`` per member, and skips the numpy
walk when the pickle named no numpy global. Each is checked here against what it stands in for: the
scan's positions and call counts (against ``pickletools``), tensors and byte spans (against
``torch.load``), zip members and directory errors (against ``zipfile``), records added in any order.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools

import numpy as np
import pytest
import torch

import ckptfit
from ckptfit import safety
from ckptfit.errors import CheckpointError, CorruptCheckpoint, ResourceLimitExceeded
from ckptfit.lazy import LazyTensor, MappedFile, Record


def _positions(data: bytes) -> dict[str, list[int]]:
    """Where each opcode of ``data`` starts, by opcode name (pickletools' own reading)."""
    out: dict[str, list[int]] = collections.defaultdict(list)
    for op, _arg, pos in pickletools.genops(data):
        out[op.name].append(pos)
    return out


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    tied = torch.randn(3)
    return {
        "w": torch.nn.Parameter(torch.randn(5, 3)),  # _rebuild_parameter around _rebuild_tensor_v2
        "t": base.t(),  # non-contiguous: stride (1, 4)
        "row": base[2],  # a view at a storage offset
        "tail": base[3:],  # another view of the same storage
        "tied_a": tied, "tied_b": tied,  # one storage, two names
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "i64": torch.arange(7),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_and_spans_match_torch_load(tmp_path, legacy):
    sd = _state_dict()
    path = tmp_path / "m.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, weights_only=True)
    with ckptfit.open(str(path)) as ck:
        tensors = dict(ck.tensors())
        assert set(tensors) == set(sd) - {"tied_b"}  # each stored tensor once
        tree = ck.tree
        assert tree["tied_a"] is tree["tied_b"]
        for k, t in ref.items():
            lt = tree[k]
            assert isinstance(lt, LazyTensor)
            assert lt.shape == tuple(t.shape) and lt.dtype == t.dtype, k
            assert lt.requires_grad == t.requires_grad and lt.is_parameter == isinstance(sd[k], torch.nn.Parameter)
            assert torch.equal(lt.load(), t), k
            span = lt.byte_span()
            assert span is not None, k
            data = b"".join(span.chunks())
            if t.is_contiguous():
                assert span.stride is None and data == t.reshape(-1).view(torch.uint8).numpy().tobytes(), k
            else:
                assert span.stride == tuple(t.stride()), k
        if not legacy:
            assert tree["row"].storage_offset == 8 and tree["t"].stride == (1, 4)


def test_scan_counts_every_call_of_a_memoised_global(tmp_path):
    n = 7
    sd = collections.OrderedDict((f"l{i}.weight", torch.randn(2, 2)) for i in range(n))
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    with ckptfit.open(str(path)) as ck:
        (scan,) = ck.scans
    by_name = {g.qualname: i for i, g in enumerate(scan.globals)}
    assert scan.calls_of(by_name["torch._utils._rebuild_tensor_v2"]) == n
    # the state dict itself, and the empty backward-hooks OrderedDict of each tensor
    assert scan.calls_of(by_name["collections.OrderedDict"]) == n + 1
    assert all(scan.globals[i].called for i in by_name.values() if "Storage" not in scan.globals[i].name)
    assert not scan.globals[by_name["torch.FloatStorage"]].called


def test_recorded_positions_are_those_of_the_opcodes():
    """Globals, calls of built objects and the object budget name the byte their opcode starts at."""
    data = (b"\x80\x02" + b"c" + b"argparse\nNamespace\n"  # GLOBAL: a placeholder class
            + b")R"  # REDUCE: an instance of it
            + b")R"  # REDUCE on that instance: "calls an object it built"
            + b"(carchive\nThing\n" + b"o"  # MARK, GLOBAL, OBJ
            + b"(iother\nKlass\n"  # MARK, INST
            + b"\x82\x05"  # EXT1: a copyreg extension
            + b"\x87" + b".")  # TUPLE3, STOP
    pos = _positions(data)
    _value, scan = safety.interpret(data)
    assert [(g.opcode, g.position) for g in scan.globals] == [
        ("GLOBAL", pos["GLOBAL"][0]), ("GLOBAL", pos["GLOBAL"][1]), ("INST", pos["INST"][0]),
        ("EXT1", pos["EXT1"][0])]
    assert scan.unsafe_uses == [f"the pickle calls a argparse.Namespace object it built, at byte {pos['REDUCE'][1]} "
                                f"(real unpickling would run its __call__)"]
    assert [scan.calls_of(i) for i in range(4)] == [1, 1, 1, 0]


def test_object_budget_names_the_opcode_that_crossed_it(monkeypatch):
    limit = 1 << 20
    monkeypatch.setattr(safety, "MAX_OBJECT_BYTES", limit)
    data = pickle.dumps([{} for _ in range(20_000)], protocol=2)
    # the interpreter's accounting: 8 bytes per opcode, checked as it starts, plus what each one builds
    builds = {"EMPTY_LIST": 64, "MARK": 64, "EMPTY_DICT": 256, "BINPUT": 100, "LONG_BINPUT": 100}
    alloc, expected = 0, None
    for op, _arg, pos in pickletools.genops(data):
        alloc += 8
        if alloc > limit:
            expected = pos
            break
        alloc += builds.get(op.name, 0)
    assert expected is not None
    with pytest.raises(ResourceLimitExceeded, match=rf"MiB of Python objects by byte {expected} \(a memory bomb\?\)"):
        safety.interpret(data)


def test_inline_reduce_reports_bad_arguments_like_any_call():
    # collections.OrderedDict(1, 2): the handler's TypeError becomes the interpreter's damaged-data error,
    # which names the byte after the REDUCE (where the interpreter stands)
    data = b"\x80\x02ccollections\nOrderedDict\nK\x01K\x02\x86R."
    (reduce_at,) = _positions(data)["REDUCE"]
    with pytest.raises(CorruptCheckpoint, match=rf"damaged pickle data at byte {reduce_at + 1}: collections.OrderedDict "
                                                r"got unexpected arguments \(.*\)"):
        safety.interpret(data)


def test_numpy_arrays_are_tensors_and_other_trees_are_left_alone(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": torch.ones(2)}, path)
    with ckptfit.open(str(path)) as ck:
        assert ck.scans[0].names_numpy
        w = ck.tree["w"]
        assert isinstance(w, LazyTensor) and torch.equal(w.load(), torch.arange(6.0).reshape(2, 3))
    path = tmp_path / "plain.pt"
    torch.save({"b": torch.ones(2), "epoch": 3}, path)
    with ckptfit.open(str(path)) as ck:
        assert not ck.scans[0].names_numpy
        assert ck.tree["epoch"] == 3 and torch.equal(ck.tree["b"].load(), torch.ones(2))


def test_records_declared_out_of_order_stay_sorted(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(100))
    mapped = MappedFile(str(path))
    for off in (40, 10, 70, 10, 90, 0):
        mapped.add_record(Record(f"r{off}", off, 10, 0))
    assert [mapped.record_at(o).name if mapped.record_at(o) else None for o in (0, 5, 10, 25, 45, 75, 95, 99)] == \
        ["r0", "r0", "r10", None, "r40", "r70", "r90", "r90"]
    assert mapped.has_checksums


def _archives(tmp_path) -> dict[str, bytes]:
    """Zip archives of every kind the member reader meets: torch's, numpy's, and Python's with the options
    its directory reading treats specially (comments, UTF-8 and cp437 names, a NUL in a name, extra fields,
    zip64 records, bytes before the archive)."""
    import zipfile

    out = {}
    torch.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, tmp_path / "t.pt")
    out["torch"] = (tmp_path / "t.pt").read_bytes()
    np.savez_compressed(tmp_path / "n.npz", a=np.ones(3), b=np.arange(4))
    out["npz"] = (tmp_path / "n.npz").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("é/ü.bin", b"1")
        z.writestr(zipfile.ZipInfo("cp437 \x80name"), b"2")
        z.writestr(zipfile.ZipInfo("a\0hidden"), b"3")
        info = zipfile.ZipInfo("extra")
        info.extra = b"\x99\x99\x02\x00ab"
        z.writestr(info, b"4", compress_type=zipfile.ZIP_DEFLATED)
        with z.open("big", "w", force_zip64=True) as f:
            f.write(b"abc")
        z.comment = b"a comment"
    out["options"] = buf.getvalue()
    out["prefixed"] = b"JUNK" * 10 + out["options"]
    return out


def test_zip_members_are_those_zipfile_reads(tmp_path):
    import zipfile

    from ckptfit.formats._zip import ZipArchive

    for label, data in _archives(tmp_path).items():
        path = tmp_path / f"{label}.zip"
        path.write_bytes(data)
        with zipfile.ZipFile(path) as zf:
            want = [(i.filename, i.compress_size, i.file_size, i.CRC, i.compress_type) for i in zf.infolist()]
            comment = zf.comment
        archive = ZipArchive(str(path))
        try:
            got = [(m.name, m.compressed_size, m.size, m.crc, m.compress_type) for m in archive.members.values()]
            assert got == want, label
            assert any("comment" in a for a in archive.anomalies) == bool(comment), label
            for name in archive.members:
                with zipfile.ZipFile(path) as zf:
                    assert archive.read(name) == zf.read(name), (label, name)
        finally:
            archive.close()


@pytest.mark.parametrize("damage, message", [
    (lambda d, cd: d[:cd + 3] + b"\x09" + d[cd + 4:], r"Bad magic number for central directory"),
    (lambda d, cd: d[:cd + 6] + b"\x63" + d[cd + 7:], r"zip file version 9.9"),
    (lambda d, cd: d[:cd + 49] + b"\x09" + d[cd + 50:], r"Corrupt extra field 9999 \(size=9\)"),  # its length
])
def test_damaged_directories_are_reported_in_zipfiles_words(tmp_path, damage, message):
    import zipfile

    from ckptfit.formats._zip import ZipArchive

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("e")
        info.extra = b"\x99\x99\x02\x00ab"
        z.writestr(info, b"1")
    data = buf.getvalue()
    path = tmp_path / "bad.zip"
    path.write_bytes(damage(data, data.rfind(b"PK\x01\x02")))
    with pytest.raises(CheckpointError, match=message):
        ZipArchive(str(path))
