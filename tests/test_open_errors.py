"""Broken inputs get a specific ckptfit error that says what the file is and what to do next.

Never a raw ``EOFError``, ``IndexError``, ``zipfile`` or pickle traceback: empty files, web pages,
Git LFS pointers, random bytes, archives cut off anywhere, folders that are not checkpoints and
checkpoints with a file missing.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile

import pytest
import torch
import torch.nn as nn

import ckptfit
from ckptfit import CheckpointError, CorruptCheckpoint, NotACheckpoint


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()


def _open_and_load(path) -> None:
    ckpt = ckptfit.open(path)
    for _, t in ckpt.tensors():
        t.load()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one small checkpoint per single-file format."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("good")
    sd = _state_dict()
    torch.save({"state_dict": sd, "epoch": 1}, d / "zip.pt")
    torch.save({"state_dict": sd, "epoch": 1}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, str(d / "st.safetensors"), metadata={"format": "pt"})
    return {name: (d / file).read_bytes() for name, file in
            (("zip", "zip.pt"), ("legacy", "legacy.pt"), ("safetensors", "st.safetensors"))}


# --------------------------------------------------------------------------- not a checkpoint

@pytest.mark.parametrize("content, match", [
    (b"", r"the file is empty \(0 bytes\)"),
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>quota exceeded</body></html>",
     r"this is an HTML/XML page, not a checkpoint"),
    (b"  <html>\n<body>404 Not Found</body></html>", r"HTML/XML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146a1f4b4d1c3d4a8e1f0e4f6b3a0c2b1d9e8f7a6b5"
     b"c4d3e2f1a0b9c8d7\nsize 46827520\n", r"Git LFS pointer, not the checkpoint: the LFS object was never fetched"),
    (bytes(range(256)) * 4, r"unrecognised content \(first bytes 00 01 02"),
    (b"\x1f\x8b\x08\x00" + bytes(60), r"gzip-compressed"),
    (b"\x89PNG\r\n\x1a\n" + bytes(60), r"this is an image"),
    (b"epoch: 3\nlr: 0.1\n", r"this is a text file, not a checkpoint"),
], ids=["empty", "html", "html-indented", "git-lfs", "random", "gzip", "png", "text"])
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(NotACheckpoint, match=match) as info:
        ckptfit.open(path)
    assert info.value.path == str(path)
    assert info.value.hint


def test_random_bytes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4096)))
    with pytest.raises(NotACheckpoint, match=r"unrecognised content .*not a torch, safetensors"):
        ckptfit.open(path)


def test_plain_zip_without_data_pkl(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights/readme.txt", "hello")
    with pytest.raises(NotACheckpoint, match=r"zip archive, but not one written by torch.save.*no data.pkl"):
        ckptfit.open(path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file or directory"):
        ckptfit.open(tmp_path / "nope.pt")


@pytest.mark.parametrize("names", [[], ["readme.txt", "train.py"]], ids=["empty", "files"])
def test_directory_that_is_not_a_checkpoint(tmp_path, names):
    for n in names:
        (tmp_path / n).write_text("x")
    listing = ", ".join(names) or "nothing"
    with pytest.raises(NotACheckpoint, match=rf"this directory is not a checkpoint .*\(it holds: {listing}\)"):
        ckptfit.open(tmp_path)


# --------------------------------------------------------------------------- truncated files

@pytest.mark.parametrize("fmt, cut, match", [
    ("zip", 0.5, r"torch zip archive is truncated or damaged: its central directory cannot be read"),
    ("zip", -1, r"torch zip archive is truncated or damaged"),
    ("zip", 2, r"the file holds only 2 byte\(s\), the start of a torch zip archive: truncated"),
    ("legacy", -1, r"storage '\d+' needs \d+ bytes but the file ends 1 bytes early \(truncated\)"),
    ("legacy", 0.3, r"damaged pickle data at byte \d+ \(in pickle #4 \(object\)\)"),
    ("legacy", 5, r"the file holds only 5 bytes, the start of a legacy torch file: truncated"),
    ("safetensors", -1, r"safetensors data section holds \d+ bytes but the header accounts for \d+ \(truncated\)"),
    ("safetensors", 100, r"safetensors header of \d+ bytes runs past the end of the file \(100 bytes\): truncated"),
    ("safetensors", 8, r"only a safetensors header size \(8 bytes\) and nothing after it: truncated"),
])
def test_truncated_file(tmp_path, files, fmt, cut, match):
    data = files[fmt]
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:n])
    with pytest.raises(CorruptCheckpoint, match=match) as info:
        _open_and_load(path)
    assert info.value.hint


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_cut_anywhere_is_a_ckptfit_error(tmp_path, files, fmt):
    """Every prefix of a checkpoint: a CorruptCheckpoint (or NotACheckpoint for a few bytes), never a raw error."""
    data = files[fmt]
    path = tmp_path / "cut"
    cuts = sorted(set(range(0, 40)) | set(range(40, len(data), 13)) | {len(data) - 1})
    for n in cuts:
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as info:
            _open_and_load(path)
        err = info.value
        if n == 0:
            assert isinstance(err, NotACheckpoint)
        elif fmt != "safetensors" or n >= 8:  # fewer than 8 bytes of safetensors say nothing about the format
            assert isinstance(err, CorruptCheckpoint), (n, err)
    path.write_bytes(data)
    _open_and_load(path)  # and the whole file reads


# --------------------------------------------------------------------------- damaged archives and folders

def test_zip_missing_a_storage_member(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(_state_dict(), good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/1"):
                zout.writestr(info, zin.read(info.filename))
    with pytest.raises(CorruptCheckpoint, match=r"data.pkl refers to storage '1' but the archive has no"):
        ckptfit.open(bad)


def _sharded_folder(path) -> None:
    from safetensors.torch import save_file

    sd = _state_dict()
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(path / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_folder_missing_a_shard(tmp_path):
    _sharded_folder(tmp_path)
    ckptfit.open(tmp_path)  # complete: fine
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CorruptCheckpoint, match=r"shard model-00002-of-00002.safetensors listed in "
                                                 r"model.safetensors.index.json is missing") as info:
        ckptfit.open(tmp_path)
    assert info.value.hint == "download every shard of the checkpoint"


def test_hf_folder_with_a_truncated_shard(tmp_path):
    _sharded_folder(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpoint, match=r"model-00001-of-00002.safetensors: safetensors data section"):
        ckptfit.open(tmp_path)


def test_hf_folder_with_a_broken_index(tmp_path):
    _sharded_folder(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match=r"model.safetensors.index.json is not a valid shard index"):
        ckptfit.open(tmp_path)


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory):
    import warnings

    import torch.distributed.checkpoint as dcp

    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"model": _state_dict()}, checkpoint_id=str(path))
    return path


def test_dcp_missing_data_file(tmp_path, dcp_dir):
    path = shutil.copytree(dcp_dir, tmp_path / "ckpt")
    os.remove(path / "__0_0.distcp")
    with pytest.raises(CorruptCheckpoint, match=r"DCP data file __0_0.distcp is missing"):
        ckptfit.open(path)


def test_dcp_truncated_data_file(tmp_path, dcp_dir):
    path = shutil.copytree(dcp_dir, tmp_path / "ckpt")
    data = (path / "__0_0.distcp").read_bytes()
    (path / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match=r"DCP data file __0_0.distcp is shorter than its records say "
                                                 r"\(truncated\)"):
        ckptfit.open(path)


@pytest.mark.parametrize("keep, match", [
    (0, r"the DCP .metadata file is empty \(0 bytes\)"),
    (0.5, r"damaged pickle data at byte \d+ \(in .metadata\)"),
])
def test_dcp_damaged_metadata(tmp_path, dcp_dir, keep, match):
    path = shutil.copytree(dcp_dir, tmp_path / "ckpt")
    data = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpoint, match=match):
        ckptfit.open(path)
