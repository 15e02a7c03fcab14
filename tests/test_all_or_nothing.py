"""All or nothing, also when the disk fails mid-copy: a read that fails at the k-th tensor changes nothing."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.errors import CorruptCheckpoint
from ckptfit.lazy import MappedFile
from _checkpoints import fail_read_at


pytestmark = pytest.mark.usefixtures("readers")  # each test on one thread and on several (conftest.py)


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


_fail_at = fail_read_at


def _reads(path: Path, **kw) -> int:
    """How many reads a load of ``path`` makes (to inject the failure at each of them)."""
    counter = itertools.count(1)
    real = MappedFile.readinto

    def readinto(self, offset, buf):
        next(counter)
        return real(self, offset, buf)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MappedFile, "readinto", readinto)
        ckptfit.load(Net(), path, **kw)
    return next(counter) - 1


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


class Flat(nn.Module):
    """Parameters that are views of one flat buffer (as fused optimizers and FSDP keep them)."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = torch.zeros(4 * 64 + 64 + 64 * 8)
        self.w = nn.Parameter(self.flat[:256].view(4, 64))
        self.b = nn.Parameter(self.flat[256:320])
        self.v = nn.Parameter(self.flat[320:].view(64, 8))


def test_tensors_sharing_memory_are_written_in_plan_order_and_undone_exactly(tmp_path, monkeypatch) -> None:
    torch.manual_seed(3)
    sd = {"w": torch.randn(4, 64), "b": torch.randn(64), "v": torch.randn(64, 8)}
    path = tmp_path / "flat.safetensors"
    save_file(sd, str(path))
    model = Flat()
    ckptfit.load(model, path)
    for k, v in sd.items():
        assert torch.equal(getattr(model, k).detach(), v), k
    assert torch.equal(model.flat[:256], sd["w"].flatten())  # still views of the one buffer
    with torch.no_grad():
        model.flat.fill_(0.5)
    snap = _snapshot(model)
    flat_before = model.flat.clone()
    _fail_at(monkeypatch, 3, OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        ckptfit.load(model, path)
    _assert_unchanged(model, snap)
    assert torch.equal(model.flat, flat_before)


def test_the_threaded_variant_reads_on_worker_threads(tmp_path, monkeypatch, readers) -> None:
    """The fixture's "threads" variant does run the copies on the pool (else the tests above prove less)."""
    import threading

    path = _file(tmp_path, "safetensors")
    names: set[str] = set()
    real = MappedFile.readinto

    def readinto(self, offset, buf):
        names.add(threading.current_thread().name)
        return real(self, offset, buf)

    monkeypatch.setattr(MappedFile, "readinto", readinto)
    ckptfit.load(Net(), path)
    on_pool = {n for n in names if n.startswith("ckptfit-read")}
    assert bool(on_pool) == (readers == "threads"), names
