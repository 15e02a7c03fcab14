"""All or nothing, also when the disk fails mid-copy: a read that fails at the k-th tensor changes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.errors import CorruptCheckpoint
from ckptfit.lazy import MappedFile


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.bn = nn.BatchNorm1d(64)
        self.b = nn.Linear(64, 32)
        self.c = nn.Linear(32, 8)
        self.register_buffer("steps", torch.tensor(7))


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    """Every tensor's values, dtype, device, address and identity."""
    return {k: (v, v.detach().clone(), v.dtype, v.device, v.data_ptr())
            for k, v in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model: nn.Module, snap: dict[str, tuple]) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == snap.keys()
    for k, (obj, values, dtype, device, ptr) in snap.items():
        t = now[k]
        assert t is obj, f"{k}: another tensor object"
        assert (t.dtype, t.device, t.data_ptr()) == (dtype, device, ptr), k
        assert torch.equal(t.detach(), values), f"{k}: values changed"


def _file(tmp_path: Path, fmt: str) -> Path:
    torch.manual_seed(1)
    sd = Net().state_dict()
    sd["bn.running_mean"] += 3.0
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    return path


def _fail_at(monkeypatch: pytest.MonkeyPatch, k: int, exc: BaseException) -> list[int]:
    """Make the k-th read of tensor bytes from a file raise ``exc`` (the disk failing mid-copy)."""
    calls = [0]
    real = MappedFile.readinto

    def readinto(self, offset, buf):
        calls[0] += 1
        if calls[0] == k:
            raise exc
        return real(self, offset, buf)

    monkeypatch.setattr(MappedFile, "readinto", readinto)
    return calls


def _reads(path: Path, **kw) -> int:
    """How many reads a load of ``path`` makes (to inject the failure at each of them)."""
    calls = [0]
    real = MappedFile.readinto

    def readinto(self, offset, buf):
        calls[0] += 1
        return real(self, offset, buf)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MappedFile, "readinto", readinto)
        ckptfit.load(Net(), path, **kw)
    return calls[0]


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
@pytest.mark.parametrize("kw", [{}, {"dtype": torch.float16}, {"dtype": torch.bfloat16, "verify": False}],
                         ids=["same-dtype", "cast-fp16", "cast-bf16-noverify"])
def test_io_error_at_any_tensor_leaves_the_model_bit_identical(tmp_path, monkeypatch, fmt, kw) -> None:
    path = _file(tmp_path, fmt)
    n = _reads(path, **kw)
    assert n >= 8
    for k in sorted({1, 2, n // 2, n - 1, n}):
        model = Net()
        with torch.no_grad():
            model.bn.running_var.fill_(0.25)
        snap = _snapshot(model)
        with pytest.MonkeyPatch.context() as m:
            _fail_at(m, k, OSError(5, "Input/output error"))
            with pytest.raises(OSError, match="Input/output error"):
                ckptfit.load(model, path, **kw)
        _assert_unchanged(model, snap)
        ckptfit.load(model, path, **kw)  # and the model still loads normally afterwards
        assert model.bn.running_mean.float().mean() > 2.0


def test_interrupt_mid_copy_also_rolls_back(tmp_path, monkeypatch) -> None:
    path = _file(tmp_path, "torch-zip")
    model = Net()
    snap = _snapshot(model)
    _fail_at(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        ckptfit.load(model, path)
    _assert_unchanged(model, snap)


def test_crc_failure_of_the_last_tensor_undoes_the_others(tmp_path) -> None:
    """The damaged record is met after every other tensor was copied in: all of them are undone."""
    import struct
    import zipfile

    path = _file(tmp_path, "torch-zip")
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if "/data/" in i.filename]
    last = max(members, key=lambda i: i.header_offset)  # read last: the copy pass goes in file order
    raw = bytearray(path.read_bytes())
    nlen, elen = struct.unpack("<HH", raw[last.header_offset + 26:last.header_offset + 30])
    at = last.header_offset + 30 + nlen + elen
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    model = Net()
    snap = _snapshot(model)
    with pytest.raises(CorruptCheckpoint, match=f"'{last.filename}' fails its CRC check"):
        ckptfit.load(model, path)
    _assert_unchanged(model, snap)


def test_failure_into_a_meta_model_restores_the_meta_tensors(tmp_path, monkeypatch) -> None:
    path = _file(tmp_path, "torch-zip")
    with torch.device("meta"):
        model = Net()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    _fail_at(monkeypatch, 3, OSError(5, "Input/output error"))
    with pytest.raises(OSError):
        ckptfit.load(model, path)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is v and v.is_meta for k, v in before.items())


def test_build_after_a_failed_read_returns_nothing_half_built(tmp_path, monkeypatch) -> None:
    path = _file(tmp_path, "torch-zip")
    _fail_at(monkeypatch, 3, OSError(5, "Input/output error"))
    with pytest.raises(OSError):
        ckptfit.build(Net, path)
