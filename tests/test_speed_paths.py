"""The fast paths are also the correct ones: streamed copies, staged casts, zero-copy guards, progress."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import ckptfit
from _checkpoints import write_checkpoint
from ckptfit.loading import streaming
from ckptfit._progress import progress
from ckptfit.lazy import MappedFile, locate


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
        m.bn.num_batches_tracked.fill_(5)
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_load_keeps_parameter_identity_requires_grad_and_owns_its_memory(tmp_path, fmt):
    sd = _sd()
    path = write_checkpoint(sd, tmp_path, fmt)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p for n, p in model.named_parameters()}
    ckptfit.load(model, path)
    after = dict(model.named_parameters())
    assert all(after[n] is before[n] for n in before)
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    assert model.a.weight.requires_grad and not model.frozen.requires_grad
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    # copied, not aliased: the model's tensors are its own memory, not views of the file
    assert locate(model.a.weight) is None


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_fp16_file_into_fp32_model_streamed_in_pieces(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", 24)  # several pieces per tensor, one odd last piece
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in _sd().items()}
    path = write_checkpoint(sd, tmp_path, fmt)
    model = Net()
    ckptfit.load(model, path)
    assert model.a.weight.dtype == torch.float32
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v.to(model.state_dict()[k].dtype)), k
    built, _ = ckptfit.build(Net, path)
    for k, v in sd.items():
        assert torch.equal(built.state_dict()[k], v.to(built.state_dict()[k].dtype)), k


def test_load_with_device_and_dtype_keeps_identity(tmp_path):
    sd = _sd()
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    model = Net()
    params = list(model.parameters())
    report = ckptfit.load(model, path, device="cpu", dtype=torch.float64)
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert model.a.weight.dtype == torch.float64 and model.bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(model.a.weight, sd["a.weight"].double())
    assert report.device == "cpu"


def test_non_contiguous_and_shared_storage_sources(tmp_path):
    sd = _sd()
    sd["a.weight"] = torch.randn(8, 16).t()  # (16, 8) with strides (1, 16): not contiguous
    big = torch.randn(2, 8, 16)
    sd["b.weight"] = big[1]  # (8, 16) at an offset inside a larger storage
    assert not sd["a.weight"].is_contiguous()
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    model = Net()
    ckptfit.load(model, path)
    assert torch.equal(model.a.weight, sd["a.weight"]) and torch.equal(model.b.weight, sd["b.weight"])
    built, _ = ckptfit.build(Net, path)
    assert torch.equal(built.a.weight, sd["a.weight"]) and torch.equal(built.b.weight, sd["b.weight"])


def test_one_stored_tensor_into_two_untied_parameters_does_not_alias_them(tmp_path):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Linear(4, 4, bias=False)
            self.y = nn.Linear(4, 4, bias=False)

    w = torch.randn(4, 4)
    path = os.fspath(tmp_path / "two.pt")
    torch.save({"x.weight": w, "y.weight": w}, path)  # one storage, referenced twice
    model, _ = ckptfit.build(Two, path)
    assert torch.equal(model.x.weight, w) and torch.equal(model.y.weight, w)
    with torch.no_grad():
        model.x.weight.add_(1)
    assert torch.equal(model.y.weight, w)  # y did not move with x


def test_a_state_dict_in_memory_is_copied_into_an_existing_model():
    sd = _sd()
    model = Net()
    ckptfit.load(model, sd)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.a.weight.data_ptr() != sd["a.weight"].data_ptr()


def test_mapped_file_readinto_and_locate(tmp_path):
    data = torch.arange(64, dtype=torch.float32)
    path = os.fspath(tmp_path / "raw.bin")
    data.numpy().tofile(path)
    mf = MappedFile(path)
    view = mf.tensor(16, torch.float32, 8)  # elements 4..11
    file, offset, span = locate(view)
    assert file is mf and offset == 16 and span == 32
    strided = view[::2]
    assert locate(strided)[1:] == (16, 28)
    out = bytearray(8)
    mf.readinto(4, memoryview(out))
    assert out == data.numpy().tobytes()[4:12]
    assert locate(torch.zeros(4)) is None
    with pytest.raises(ckptfit.CorruptCheckpoint, match="beyond the end"):
        mf.readinto(250, memoryview(bytearray(8)))
    mf.close()
    assert torch.equal(view, data[4:12])  # views stay valid after close


def test_streamer_pieces_on_the_cpu_device(monkeypatch, tmp_path):
    """The staged path the GPU uses (pieces through a reused buffer), run on the CPU."""
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", 40)
    src = torch.randn(7, 9).to(torch.bfloat16)
    path = os.fspath(tmp_path / "b.safetensors")
    safetensors.torch.save_file({"w": src}, path)
    ck = ckptfit.open(path)
    view = ck.state_dict().tensors["w"].load()
    dst = torch.empty(7, 9, dtype=torch.float32)
    s = streaming.Streamer()
    s._pieces(dst.view(-1), *locate(view)[:2], torch.bfloat16)
    s.finish()
    assert torch.equal(dst, src.float())


def test_progress_is_silent_without_a_terminal_and_draws_when_forced():
    with progress(100, "x", delay=0) as bar:  # pytest's stderr is not a terminal
        bar.advance(50)
        assert not bar.shown
    with progress(100, "x", delay=0, enabled=True) as bar:
        bar.advance(50)
        assert bar.shown
    assert not bar.shown


@pytest.mark.gpu
def test_load_into_a_cuda_model(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", 64)  # many pieces: the two pinned buffers alternate
    sd = {k: (v.half() if k == "a.weight" else v) for k, v in _sd().items()}
    path = write_checkpoint(sd, tmp_path, "safetensors")
    model = Net().cuda()
    params = list(model.parameters())
    ckptfit.load(model, path)
    assert all(p is q for p, q in zip(params, model.parameters()))
    for k, v in sd.items():
        got = model.state_dict()[k]
        assert torch.equal(got.cpu(), v.to(got.dtype)), k
