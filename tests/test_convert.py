"""convert(): every readable format to safetensors / torch / DCP, verified, atomic, source untouched."""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ckptfit
from ckptfit import writing
from ckptfit.cli import main
from ckptfit.conversion import convert, parse_size
from ckptfit.errors import CheckpointError

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight


def _sha(path) -> str:
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _read_st(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same(expected: dict, got: dict, dtype=None) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        want = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert torch.equal(got[k], want), k


@pytest.fixture()
def trained(tmp_path):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "train.pth"
    torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
                "hyper_parameters": {"lr": 0.1, "arch": "net"}}, path)
    return net, sd, path


def _sources(tmp_path, net: Net) -> dict[str, str]:
    """The same weights in every format ckptfit reads."""
    sd = net.state_dict()
    out = {}
    out["zip"] = str(tmp_path / "zip.pth")
    torch.save(sd, out["zip"])
    out["legacy"] = str(tmp_path / "legacy.pth")
    torch.save(sd, out["legacy"], _use_new_zipfile_serialization=False)
    out["whole"] = str(tmp_path / "whole.pth")
    torch.save(net, out["whole"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["script"] = str(tmp_path / "script.pt")
        torch.jit.save(torch.jit.script(net), out["script"])
        import torch.distributed.checkpoint as dcp

        out["dcp"] = str(tmp_path / "dcp")
        dcp.save({k: v.clone() for k, v in sd.items()}, checkpoint_id=out["dcp"])
    hf = tmp_path / "hf"
    hf.mkdir()
    from safetensors.torch import save_file

    keys = list(sd)
    save_file({k: sd[k].contiguous() for k in keys[:3]}, hf / "model-00001-of-00002.safetensors")
    save_file({k: sd[k].contiguous() for k in keys[3:]}, hf / "model-00002-of-00002.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in keys[:3]},
        **{k: "model-00002-of-00002.safetensors" for k in keys[3:]}}}))
    out["hf-folder"] = str(hf)
    return out


@pytest.mark.parametrize("fmt", ["zip", "legacy", "whole", "script", "dcp", "hf-folder"])
def test_every_source_format_round_trips_to_safetensors(tmp_path, fmt):
    torch.manual_seed(0)
    net = Net()
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    src = _sources(tmp_path, net)[fmt]
    before = _sha(src)
    dst = tmp_path / "out.safetensors"
    result = convert(src, dst)
    assert result.verified and result.format == "safetensors"
    got = _read_st(dst)
    if fmt == "script":  # TorchScript keeps no num_batches_tracked difference; same keys otherwise
        expected = {k: v for k, v in expected.items() if k in got}
    _assert_same(expected, got)
    assert _sha(src) == before


def test_training_checkpoint_to_safetensors_keeps_metadata_says_what_was_dropped(trained, tmp_path):
    _net, sd, src = trained
    before = _sha(src)
    dst = tmp_path / "model.safetensors"
    result = convert(src, dst)
    _assert_same(sd, _read_st(dst))
    with safe_open(str(dst), "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt"
    assert json.loads(md["epoch"]) == 7
    assert json.loads(md["hyper_parameters"]) == {"lr": 0.1, "arch": "net"}
    assert "optimizer" not in md
    assert any("optimizer" in d for d in result.dropped)
    assert "optimizer" in str(result)
    assert _sha(src) == before


def test_bf16_cast_is_verified_against_the_cast(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "bf16.safetensors"
    result = convert(src, dst, dtype="bf16")
    assert result.dtype == "bfloat16"
    got = _read_st(dst)
    _assert_same(sd, got, dtype=torch.bfloat16)
    assert got["bn.num_batches_tracked"].dtype == torch.int64  # integers are never cast


def test_sharding_writes_an_index(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "sharded"
    result = convert(src, dst, shard_size=200)
    files = set(os.listdir(dst))
    assert "model.safetensors.index.json" in files
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"].values()) <= files
    got = {}
    for shard in set(index["weight_map"].values()):
        got.update(_read_st(dst / shard))
    _assert_same(sd, got)
    assert len(result.files) == len(files)
    with ckptfit.open(dst) as ck:  # ckptfit reads its own output
        assert ck.format == "hf-folder" and ck.num_tensors == len(sd)


def test_only_weights_drops_optimizer_torch_output(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "slim.pt"
    convert(src, dst, only_weights=True)
    back = torch.load(dst, weights_only=True)
    assert set(back) == set(sd)
    _assert_same(sd, back)


def test_torch_output_without_only_weights_keeps_everything(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "full.pth"
    result = convert(src, dst)
    back = torch.load(dst, weights_only=True)
    assert back["epoch"] == 7 and back["hyper_parameters"]["lr"] == 0.1
    assert "optimizer" in back and back["optimizer"]["state"]
    _assert_same(sd, back["state_dict"])
    assert set(result.metadata) >= {"epoch", "hyper_parameters"}


def test_dcp_output(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "dcp-out"
    result = convert(src, dst, format="dcp")
    assert result.format == "dcp" and os.path.exists(dst / ".metadata")
    with ckptfit.open(dst) as ck:
        _assert_same(sd, {k: t.load() for k, t in ck.state_dict().tensors.items()})


def test_tied_tensors_are_written_once_and_load_back(tmp_path):
    model = Tied()
    src = tmp_path / "tied.pth"
    torch.save(model.state_dict(), src)
    dst = tmp_path / "tied.safetensors"
    result = convert(src, dst)
    assert dict(result.aliases) == {"head.weight": "emb.weight"}
    with safe_open(str(dst), "pt") as f:
        assert list(f.keys()) == ["emb.weight"]
        assert json.loads(f.metadata()["ckptfit.aliases"]) == {"head.weight": "emb.weight"}
    fresh = Tied()
    report = ckptfit.load(fresh, dst)
    assert torch.equal(fresh.head.weight, model.emb.weight)


def test_failure_mid_write_leaves_no_destination(trained, tmp_path, monkeypatch):
    _net, _sd, src = trained
    before = _sha(src)
    calls = {"n": 0}
    real = writing._write_safetensors_file

    def flaky(tensors, path, metadata):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full (simulated)")
        return real(tensors, path, metadata)

    monkeypatch.setattr(writing, "_write_safetensors_file", flaky)
    out = tmp_path / "out"
    out.mkdir()
    calls["n"] = 1
    with pytest.raises(OSError, match="disk full"):
        convert(src, out / "model.safetensors")
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        convert(src, out / "shards", shard_size=100)  # the second shard fails
    assert os.listdir(out) == []  # no destination, no temporary left behind
    assert _sha(src) == before


def test_verification_failure_leaves_no_destination(trained, tmp_path, monkeypatch):
    _net, _sd, src = trained
    real = writing._read_back

    def corrupting(path):
        ckpt, md = real(path)
        for k, t in list(ckpt.tree.items()):
            if t.dtype.is_floating_point:
                ckpt.tree[k] = ckptfit.lazy.LazyTensor.of(t.load() + 1)
        return ckpt, md

    monkeypatch.setattr(writing, "_read_back", corrupting)
    with pytest.raises(CheckpointError, match="verification of the output failed"):
        convert(src, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".partial")] == []


def test_refuses_to_write_over_the_source(trained):
    _net, _sd, src = trained
    before = _sha(src)
    with pytest.raises(CheckpointError, match="destination is the source"):
        convert(src, src)
    assert _sha(src) == before


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(CheckpointError, match="cannot read the size"):
        parse_size("lots")


def test_cli_convert(trained, tmp_path):
    _net, sd, src = trained
    dst = tmp_path / "cli.safetensors"
    res = CliRunner().invoke(main, ["convert", str(src), str(dst), "--dtype", "fp16", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["verified"] and data["dtype"] == "float16"
    _assert_same(sd, _read_st(dst), dtype=torch.float16)
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "x.weird")])
    assert res.exit_code == 1 and "cannot tell the output format" in res.output


def test_folder_output_is_not_private_and_sizes_read_well(trained, tmp_path):
    _net, _sd, src = trained
    dst = tmp_path / "sharded"
    result = convert(src, dst, shard_size=200)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(dst).st_mode & 0o777 == 0o777 & ~mask  # as os.mkdir would make it, not mkdtemp's 0o700
    head = str(result).splitlines()[0]
    assert " 0.0 MB" not in head and (" KB" in head or " B" in head)


# ------------------------------------------------------------------------------------ dtype names: one table


def test_unknown_dtype_is_a_ckptfit_error_listing_the_names(trained, tmp_path):
    _net, _sd, src = trained
    with pytest.raises(CheckpointError, match=r"unknown dtype 'bf17'; use one of fp32 \(float32, float\), "
                                              r"fp16 \(float16, half\), bf16 \(bfloat16\), fp64"):
        convert(src, tmp_path / "x.safetensors", dtype="bf17")
    with pytest.raises(CheckpointError, match="not a floating dtype"):
        convert(src, tmp_path / "x.safetensors", dtype=torch.int8)  # floats were cast to int8 before
    assert os.listdir(tmp_path) == ["train.pth"]
    result = convert(src, tmp_path / "x.safetensors", dtype=torch.float16)
    assert result.dtype == "float16"


def test_the_library_does_not_need_the_cli(trained, tmp_path):
    import subprocess
    import sys

    _net, _sd, src = trained
    code = ("import sys; from ckptfit.conversion import convert; "
            f"convert({str(src)!r}, {str(tmp_path / 'y.safetensors')!r}, dtype='bf16'); "
            "print(sorted(m for m in ('click', 'ckptfit.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_dtype_names_come_from_the_same_table(trained, tmp_path):
    from ckptfit.dtypes import CAST_DTYPES, dtype_name, parse_dtype, short_name

    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("torch.half") is torch.float16
    assert parse_dtype(None) is None and dtype_name(torch.bfloat16) == "bfloat16"
    assert short_name(torch.float32) == "fp32" and short_name(torch.int64) == "int64"
    assert set(CAST_DTYPES.values()) == {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    _net, _sd, src = trained
    res = CliRunner().invoke(main, ["load", str(src), "--model", "tests.test_convert:Net", "--dtype", "bf17"])
    assert res.exit_code == 2
    assert "unknown dtype 'bf17'; use one of fp32 (float32, float), fp16 (float16, half)" in res.output
