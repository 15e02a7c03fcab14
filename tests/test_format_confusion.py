"""Files that readers can read in more than one way: ``scan`` reads what the loaders would read.

A file that is both a tar and a pickle (``torch.load`` tries tar first), two zip archives back to
back (torch follows the last end record's offsets from the start of the file, into the first
archive; Python's ``zipfile`` reads the last), DCP records stored in files with any name, folders
whose weights are symbolic links to elsewhere. Each payload is built here and never unpickled for
real; where the test shows which part torch reads, it does so with a harmless payload.
"""
from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import subprocess
import tarfile
import zipfile

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ckptfit
from ckptfit import UnsafeCheckpoint
from ckptfit.cli import main
from ckptfit.scanning import scan

CANARY = "/tmp/ckptfit-canary-never-created"
# os.system("touch CANARY"), as a protocol 2 pickle
SYSTEM = b"\x80\x02cos\nsystem\n(X" + len(f"touch {CANARY}").to_bytes(4, "little") + f"touch {CANARY}".encode() + b"tR."


def _pad(pkl: bytes, n: int) -> bytes:
    """``pkl`` made exactly ``n`` bytes long with no-ops after PROTO (NONE POP, BININT1 POP)."""
    k = n - len(pkl)
    assert k >= 0 and k != 1
    fill = b"N0" * (k // 2) if k % 2 == 0 else b"K\x000" + b"N0" * ((k - 3) // 2)
    return pkl[:2] + fill + pkl[2:]


def _zip_of(data_pkl: bytes) -> bytes:
    """A torch-style archive (``archive/data.pkl``, byteorder, version) holding no tensors."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def _torch_zip_bytes(obj, data_pkl: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    if data_pkl is None:
        return buf.getvalue()
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return out.getvalue()


def _load_all(path: pathlib.Path) -> None:
    with ckptfit.open(path) as ckpt:
        ckpt.metadata  # noqa: B018
        for _, t in ckpt.tensors():
            t.load()


def _agrees(path: pathlib.Path) -> None:
    """Whatever ckptfit's loader refuses as unsafe, scan calls dangerous."""
    report = scan(path)
    try:
        _load_all(path)
    except UnsafeCheckpoint:
        assert report.verdict == "dangerous", report
    except ckptfit.CheckpointError:
        pass


# ----------------------------------------------------------------------------------------- tar + pickle


def _tar_polyglot(path: pathlib.Path, storages: bytes, pkl: bytes) -> pathlib.Path:
    """A tar archive whose first header starts with a complete pickle of ``{}``: a pickle reader sees an empty
    dict, torch.load sees torch's old tar format and unpickles the ``storages``, ``tensors``, ``pickle`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in ((b"\x80\x02}.".decode("utf-8", "surrogateescape"), b""), ("storages", storages),
                           ("tensors", pickle.dumps(0, protocol=2)), ("pickle", pkl)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def test_torch_load_reads_a_tar_polyglot_as_tar(tmp_path: pathlib.Path) -> None:
    path = _tar_polyglot(tmp_path / "poly.pt", pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
                         pickle.dumps({"from": "tar"}, protocol=2))
    assert pickle.loads(path.read_bytes()) == {}  # plain pickle: the first bytes
    assert torch.load(path, weights_only=False) == {"from": "tar"}  # torch: the tar members
    report = scan(path)
    assert "tar" in report.format and report.verdict == "not known to be safe" and report.exit_code == 3
    assert any("tar archive" in c for c in report.concerns)
    assert "tar:pickle" in report.pickles and "tar:storages" in report.pickles


def test_tar_polyglot_with_a_payload_is_dangerous(tmp_path: pathlib.Path) -> None:
    for member in ("storages", "pickle"):
        storages = SYSTEM if member == "storages" else pickle.dumps(0, protocol=2)
        path = _tar_polyglot(tmp_path / f"{member}.pt", storages, SYSTEM if member == "pickle" else b"\x80\x02}.")
        report = scan(path)
        assert report.verdict == "dangerous" and [r.qualname for r in report.dangerous] == ["os.system"], report
        assert any(m == f"tar:{member}" for r in report.dangerous for m in r.members)
        r = CliRunner().invoke(main, ["scan", str(path)])
        assert r.exit_code == 5 and "DANGEROUS" in r.output
        _agrees(path)
    assert not os.path.exists(CANARY)


# ----------------------------------------------------------------------------------------- zips back to back


def _back_to_back(path: pathlib.Path, first: bytes, second: bytes) -> pathlib.Path:
    """Two archives of the same layout, concatenated: the last end record's central directory offset,
    read from the start of the file, lands on the first archive's central directory."""
    n = max(len(first), len(second)) + 4
    a, b = _zip_of(_pad(first, n)), _zip_of(_pad(second, n))
    assert len(a) == len(b)
    path.write_bytes(a + b)
    return path


def test_torch_reads_the_first_archive_zipfile_the_last(tmp_path: pathlib.Path) -> None:
    path = _back_to_back(tmp_path / "ab.pt", pickle.dumps({"from": "first"}, protocol=2),
                         pickle.dumps({"from": "second"}, protocol=2))
    assert torch.load(path, weights_only=False) == {"from": "first"}
    assert pickle.loads(zipfile.ZipFile(path).read("archive/data.pkl")) == {"from": "second"}
    report = scan(path)
    assert report.verdict == "not known to be safe" and any("back to back" in c for c in report.concerns)
    assert {"@0:archive/data.pkl", f"@{path.stat().st_size // 2}:archive/data.pkl"} <= set(report.pickles)


@pytest.mark.parametrize("where", ["first", "second"])
def test_a_payload_in_either_archive_is_dangerous(where: str, tmp_path: pathlib.Path) -> None:
    benign = pickle.dumps({"x": 1}, protocol=2)
    path = _back_to_back(tmp_path / "ab.pt", SYSTEM if where == "first" else benign,
                         SYSTEM if where == "second" else benign)
    report = scan(path)
    assert report.verdict == "dangerous" and report.exit_code == 5, report
    assert [r.qualname for r in report.dangerous] == ["os.system"]
    _agrees(path)
    assert not os.path.exists(CANARY)


# ----------------------------------------------------------------------------------------- DCP records anywhere


def _dcp(path: pathlib.Path) -> pathlib.Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": nn.Linear(3, 4).state_dict()}, checkpoint_id=str(path))
    return path


def _move_records(folder: pathlib.Path, new_name: str, prefix: bytes, payload_for: str | None) -> None:
    """Move every record into ``new_name`` after ``prefix``; point ``payload_for``'s record at a payload archive."""
    (distcp,) = [p for p in folder.iterdir() if p.suffix == ".distcp"]
    data = distcp.read_bytes()
    distcp.unlink()
    payload = _torch_zip_bytes(torch.zeros(4), SYSTEM)
    (folder / new_name).write_bytes(prefix + data + payload)
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: real unpickling is fine here
    for idx, info in md.storage_data.items():
        info.relative_path = new_name
        info.offset += len(prefix)
        if payload_for is not None and idx.fqn == payload_for:
            info.offset, info.length = len(prefix) + len(data), len(payload)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def test_dcp_records_in_a_file_with_any_name_are_scanned(tmp_path: pathlib.Path) -> None:
    folder = _dcp(tmp_path / "ckpt")
    _move_records(folder, "notes.txt", b"training notes: lr 0.1, 90 epochs\n", payload_for="model.bias")
    report = scan(folder)
    assert report.format == "dcp" and report.verdict == "dangerous", report
    assert [r.qualname for r in report.dangerous] == ["os.system"]
    assert any(m.startswith("notes.txt@") for r in report.dangerous for m in r.members)
    with pytest.raises(UnsafeCheckpoint):
        _load_all(folder)
    with pytest.raises(UnsafeCheckpoint, match=r"os\.system"):  # at open, not at the first tensor read
        ckptfit.open(folder)
    r = CliRunner().invoke(main, ["inspect", str(folder)])
    assert r.exit_code == 1 and "safety: safe" not in r.output
    _agrees(folder)


def test_dcp_records_in_a_renamed_file_scan_clean_when_benign(tmp_path: pathlib.Path) -> None:
    folder = _dcp(tmp_path / "ckpt")
    _move_records(folder, "notes.txt", b"notes\n", payload_for=None)
    report = scan(folder)
    assert report.verdict == "clean", report
    assert any(p.startswith("notes.txt@") for p in report.pickles)
    _load_all(folder)


# ----------------------------------------------------------------------------------------- symbolic links


def test_a_weights_link_to_a_folder_outside_is_followed(tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "elsewhere" / "dcp"
    outside.mkdir(parents=True)
    (outside / ".metadata").write_bytes(SYSTEM)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    os.symlink(outside, folder / "pytorch_model.bin")  # a reader that follows it opens a DCP folder
    with pytest.raises((UnsafeCheckpoint, ckptfit.CorruptCheckpoint)):  # followed and refused, or not followed
        _load_all(folder)
    report = scan(folder)
    assert report.verdict == "dangerous" and [r.qualname for r in report.dangerous] == ["os.system"], report
    assert any("outside the folder" in a for a in report.anomalies)
    r = CliRunner().invoke(main, ["scan", str(folder)])
    assert r.exit_code == 5


def test_a_shard_link_to_a_file_outside_is_followed(tmp_path: pathlib.Path) -> None:
    import json

    (tmp_path / "elsewhere").mkdir()
    evil = tmp_path / "elsewhere" / "evil.bin"
    evil.write_bytes(_torch_zip_bytes({"w": torch.zeros(2)}, SYSTEM))
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"v": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    os.symlink(evil, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "v": "pytorch_model-00001-of-00002.bin", "w": "pytorch_model-00002-of-00002.bin"}}))
    report = scan(folder)
    assert report.format == "hf-folder" and report.verdict == "dangerous", report
    assert any("pytorch_model-00002-of-00002.bin is a symbolic link" in a for a in report.anomalies)
    _agrees(folder)


def test_a_dcp_data_file_link_outside_is_followed(tmp_path: pathlib.Path) -> None:
    folder = _dcp(tmp_path / "ckpt")
    (tmp_path / "elsewhere").mkdir()
    _move_records(folder, "data.distcp", b"", payload_for="model.weight")
    target = tmp_path / "elsewhere" / "data.distcp"
    os.replace(folder / "data.distcp", target)
    os.symlink(target, folder / "data.distcp")
    report = scan(folder)
    assert report.verdict == "dangerous", report
    _agrees(folder)
    assert not os.path.exists(CANARY)


# ----------------------------------------------------------------------------------------- loaders refuse both

def _two_saves(path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """Two real torch.save archives, concatenated (a log-style append, a botched copy)."""
    a, b = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.ones(3)}, a)
    torch.save({"w": torch.zeros(3), "v": torch.arange(2)}, b)
    path.write_bytes(a.getvalue() + b.getvalue())
    return path, len(a.getvalue())


def test_zips_back_to_back_are_refused_naming_both_and_the_split_loads(tmp_path: pathlib.Path) -> None:
    path, n = _two_saves(tmp_path / "two.pt")
    size = path.stat().st_size
    with pytest.raises(ckptfit.CorruptCheckpoint) as e:
        ckptfit.open(path)
    assert e.value.detail.startswith(f"the file holds two zip archives back to back: bytes 0..{n} (a zip archive) "
                                     f"and bytes {n}..{size} (a zip archive, whose end record closes the file)")
    assert "torch.load takes" in e.value.detail and "Python's zipfile reads the second part" in e.value.detail
    with pytest.raises(ckptfit.CorruptCheckpoint, match="two zip archives back to back"):
        ckptfit.load(nn.Linear(3, 1), path)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 1 and "two zip archives back to back" in r.stderr
    # the hint, followed literally, gives two files that each load as written
    commands = re.findall(r"`([^`]+)`", e.value.hint)
    assert commands[:2] == [f"head -c {n} two.pt > first.pt", f"tail -c +{n + 1} two.pt > second.pt"]
    for command in commands[:2]:
        subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    for part, want in (("first.pt", {"w": torch.ones(3)}), ("second.pt", {"w": torch.zeros(3), "v": torch.arange(2)})):
        with ckptfit.open(tmp_path / part) as ckpt:
            got = {k: t.load() for k, t in ckpt.tensors()}
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_npz_archives_back_to_back_are_refused(tmp_path: pathlib.Path) -> None:
    import numpy as np

    a, b = io.BytesIO(), io.BytesIO()
    np.savez(a, w=np.ones(3))
    np.savez(b, w=np.zeros(3))
    path = tmp_path / "two.npz"
    path.write_bytes(a.getvalue() + b.getvalue())
    with pytest.raises(ckptfit.CorruptCheckpoint, match="two zip archives back to back"):
        ckptfit.open(path)


def test_the_crafted_back_to_back_pair_is_refused(tmp_path: pathlib.Path) -> None:
    path = _back_to_back(tmp_path / "ab.pt", pickle.dumps({"from": "first"}, protocol=2),
                         pickle.dumps({"from": "second"}, protocol=2))
    with pytest.raises(ckptfit.CorruptCheckpoint, match=r"looks for the central directory at byte \d+: inside the first part"):
        ckptfit.open(path)


def test_a_tar_that_is_also_a_pickle_is_refused(tmp_path: pathlib.Path) -> None:
    path = _tar_polyglot(tmp_path / "poly.pt", pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
                         pickle.dumps({"from": "tar"}, protocol=2))
    for trust in (False, True):  # the pickle reader never calls torch.load, trusted or not
        with pytest.raises(ckptfit.CorruptCheckpoint, match="the file is both a pickle and a tar archive: torch.load "
                                                            "reads every file that is not a zip as a tar first"):
            ckptfit.open(path, trust=trust)
    r = CliRunner().invoke(main, ["load", str(path), "--model", "torch.nn:Identity"])
    assert r.exit_code == 1 and "both a pickle and a tar archive" in r.stderr and "tar tvf poly.pt" in r.stderr


def test_a_tar_that_is_also_a_legacy_torch_file_is_refused(tmp_path: pathlib.Path) -> None:
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo(legacy.getvalue()[:14].decode("utf-8", "surrogateescape"))  # the legacy magic first
        t.addfile(info, io.BytesIO(b""))
    path = tmp_path / "legacy_tar.pt"
    path.write_bytes(buf.getvalue())
    assert ckptfit.formats.detect(path).name == "torch-legacy"
    with pytest.raises(ckptfit.CorruptCheckpoint, match="the file is both a legacy torch file and a tar archive"):
        ckptfit.open(path)


def test_a_plain_tar_says_it_is_one(tmp_path: pathlib.Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    path = tmp_path / "old.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ckptfit.NotACheckpoint, match=r"this is a tar archive: torch's oldest checkpoint format"):
        ckptfit.open(path)
