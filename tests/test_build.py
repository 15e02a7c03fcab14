"""ckptfit.build: a model constructed on the meta device and filled straight from every format."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

import ckptfit
from _checkpoints import FORMATS, write_checkpoint
from ckptfit.lazy import locate


class RMSNorm(nn.Module):
    """A custom module with no reset_parameters: its init lives in __init__."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Tiny(nn.Module):
    """Tied embedding/head, a BatchNorm (persistent buffers), a buffer computed in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.norm = RMSNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(7) * 3, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.bn(self.body(self.embed(ids)))))


def _source(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) + 0.5)  # nothing equals its init
        m.bn.num_batches_tracked.fill_(3)
    return m


def _untied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k != "head.weight"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_gives_exactly_the_checkpoint_values(tmp_path, fmt):
    src = _source()
    sd = _untied(src.state_dict())
    path = write_checkpoint(sd, tmp_path, fmt)
    model, report = ckptfit.build(Tiny, path)
    got = model.state_dict()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.positions, torch.arange(7) * 3)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(model.eval()(ids), src.eval()(ids), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors", "torch-legacy"])
def test_build_mmap_is_zero_copy_when_dtype_and_device_match(tmp_path, fmt):
    sd = _untied(_source().state_dict())
    path = write_checkpoint(sd, tmp_path, fmt)
    model, _ = ckptfit.build(Tiny, path, mmap=True)
    # the parameter's bytes lie inside the file's memory map: nothing was copied
    assert locate(model.body.weight) is not None
    assert locate(model.embed.weight) is not None
    # copy-on-write: training the model never writes the file
    before = open(path, "rb").read()
    with torch.no_grad():
        model.body.weight.add_(1.0)
    assert open(path, "rb").read() == before
    assert torch.equal(model.body.weight, sd["body.weight"] + 1.0)


def test_build_torchscript_archive(tmp_path):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x))

    torch.manual_seed(1)
    src = Plain()
    path = os.fspath(tmp_path / "s.pt")
    torch.jit.save(torch.jit.script(src), path)
    model, report = ckptfit.build(Plain, path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.format == "torchscript"


def test_fp16_checkpoint_into_fp32_model(tmp_path):
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in _untied(_source().state_dict()).items()}
    for fmt in ("torch-zip", "safetensors"):
        path = write_checkpoint(sd, tmp_path, fmt)
        model, _ = ckptfit.build(Tiny, path)
        assert model.body.weight.dtype == torch.float32
        assert torch.equal(model.body.weight, sd["body.weight"].float())
        assert model.bn.num_batches_tracked.dtype == torch.int64
        assert model.head.weight is model.embed.weight


def test_dtype_and_device_options(tmp_path):
    sd = _untied(_source().state_dict())
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    model, report = ckptfit.build(Tiny, path, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.bn.running_mean.dtype == torch.float64  # a float buffer is cast too
    assert model.bn.num_batches_tracked.dtype == torch.int64  # an integer one is not
    assert model.positions.dtype == torch.int64
    assert torch.equal(model.body.weight, sd["body.weight"].double())
    assert model.head.weight is model.embed.weight
    assert report.device == "cpu"


def test_partial_initialises_missing_with_reset_parameters(tmp_path):
    sd = {k: v for k, v in _untied(_source().state_dict()).items() if not k.startswith(("body.", "norm."))}
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    model, report = ckptfit.build(Tiny, path, partial=True)
    w, b = model.body.weight, model.body.bias
    assert not w.is_meta and not b.is_meta
    bound = 1 / math.sqrt(6)  # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), ..)
    assert torch.isfinite(w).all() and w.abs().max() <= bound and w.std() > 0
    assert torch.isfinite(b).all() and b.abs().max() <= bound and b.std() > 0
    # a module without reset_parameters keeps what __init__ gave it
    assert torch.equal(model.norm.scale, torch.ones(6))
    # the rest is exactly the checkpoint, and ties survive
    assert torch.equal(model.embed.weight, sd["embed.weight"])
    assert model.head.weight is model.embed.weight
    assert w.requires_grad
    assert {d.target for d in report.left_at_init} >= {"body.weight", "body.bias", "norm.scale"}


def test_partial_with_a_tied_tensor_missing_keeps_the_tie(tmp_path):
    sd = {k: v for k, v in _untied(_source().state_dict()).items() if k != "embed.weight"}
    path = write_checkpoint(sd, tmp_path, "safetensors")
    model, _ = ckptfit.build(Tiny, path, partial=True)
    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.is_meta
    assert torch.isfinite(model.embed.weight).all() and model.embed.weight.std() > 0  # Embedding: N(0, 1)


def test_missing_tensors_without_partial_fail_and_name_them(tmp_path):
    sd = {k: v for k, v in _untied(_source().state_dict()).items() if not k.startswith("body.")}
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    with pytest.raises(ckptfit.LoadError, match=r"body\.\{?.*weight"):
        ckptfit.build(Tiny, path)


def test_build_from_a_spec_string(tmp_path):
    sd = _untied(_source().state_dict())
    path = write_checkpoint(sd, tmp_path, "torch-zip")
    model, _ = ckptfit.build("test_build:Tiny", path)  # package.module:factory, as the CLI takes it
    assert torch.equal(model.body.weight, sd["body.weight"])


def test_build_from_a_state_dict_in_memory():
    sd = _untied(_source().state_dict())
    model, _ = ckptfit.build(Tiny, sd)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_factory_must_return_a_module(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        ckptfit.build(lambda: 3, {})


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_build_straight_to_cuda(tmp_path, fmt):
    sd = {k: (v.half() if k == "body.weight" else v) for k, v in _untied(_source().state_dict()).items()}
    path = write_checkpoint(sd, tmp_path, fmt)
    model, _ = ckptfit.build(Tiny, path, device="cuda")
    assert all(t.is_cuda for t in (*model.parameters(), *model.buffers()))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k].cpu(), v.to(model.state_dict()[k].dtype)), k
