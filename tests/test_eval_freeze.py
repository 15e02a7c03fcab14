"""build()/from_checkpoint() return the model in eval mode (train=True keeps training mode);
freeze=True / --freeze freezes exactly the parameters that were loaded; report.loaded_keys."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import LoadError


class Backbone(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.LayerNorm(6)


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    src = Backbone(num_classes=5)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    return src, path


def _modes(model: nn.Module) -> set[bool]:
    return {m.training for m in model.modules()}


def test_build_returns_the_model_in_eval_mode_and_says_so(ckpt):
    src, path = ckpt
    model, report = ckptfit.build(Backbone, path)
    assert _modes(model) == {False} and report.mode == "eval"
    assert "mode: eval (as from_pretrained returns it; pass train=True to keep training mode)" in str(report)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), model(x))  # dropout off, batch norm uses its running statistics
    model, report = ckptfit.build(Backbone, path, train=True)
    assert _modes(model) == {True} and report.mode == "train" and "mode: train (train=True)" in str(report)
    assert report.to_dict()["mode"] == "train"


def test_load_into_an_existing_model_keeps_its_mode(ckpt):
    _src, path = ckpt
    model = Backbone()
    report = ckptfit.load(model, path)
    assert _modes(model) == {True} and report.mode is None and "mode:" not in str(report)
    model.eval()
    ckptfit.load(model, path)
    assert _modes(model) == {False}


def test_from_checkpoint_returns_eval_mode(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path / "tiny-bert")
    model, report = ckptfit.from_checkpoint(tmp_path / "tiny-bert")
    assert _modes(model) == {False} and report.mode == "eval"
    model, report = ckptfit.from_checkpoint(tmp_path / "tiny-bert", train=True)
    assert _modes(model) == {True} and report.mode == "train"


def test_freeze_freezes_exactly_the_loaded_parameters(ckpt):
    src, path = ckpt
    model = Backbone(num_classes=3)  # a new head: transfer learning
    report = ckptfit.load(model, path, partial=True, freeze=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"} == set(report.frozen)
    assert model.fc.weight.requires_grad and model.fc.bias.requires_grad
    assert set(report.loaded_keys) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                       "bn.running_var", "bn.num_batches_tracked"}
    assert "frozen: 4 loaded parameters (requires_grad=False)" in str(report)
    assert report.to_dict()["frozen"] == list(report.frozen)
    # by hand, with report.loaded_keys: the same set
    other = Backbone(num_classes=3)
    rep = ckptfit.load(other, path, partial=True)
    params = dict(other.named_parameters())
    for k in rep.loaded_keys:
        if k in params:
            params[k].requires_grad_(False)
    assert {n for n, p in other.named_parameters() if not p.requires_grad} == frozen
    # only the head trains
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.conv.weight.clone()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert torch.equal(model.conv.weight, before) and model.conv.weight.grad is None


def test_freeze_with_build_and_tied_parameters(tmp_path):
    torch.manual_seed(0)
    src = TiedLM()
    torch.save(src.state_dict(), tmp_path / "lm.pth")
    model, report = ckptfit.build(TiedLM, tmp_path / "lm.pth", freeze=True)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.head.weight is model.emb.weight
    assert set(report.frozen) == {"emb.weight", "head.weight", "norm.weight", "norm.bias"}


def test_a_refused_load_freezes_nothing(ckpt):
    _src, path = ckpt
    model = Backbone(num_classes=3)
    with pytest.raises(LoadError):
        ckptfit.load(model, path, freeze=True)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_must_be_a_bool(ckpt):
    _src, path = ckpt
    with pytest.raises(TypeError, match="freeze= must be True or False"):
        ckptfit.load(Backbone(), path, freeze="yes")
    with pytest.raises(TypeError, match="train= must be True or False"):
        ckptfit.build(Backbone, path, train="no")


def test_cli_freeze(ckpt, tmp_path):
    _src, path = ckpt
    r = CliRunner().invoke(main, ["load", str(path), "--model", f"{__name__}:Backbone", "--model-arg",
                                  "num_classes=3", "--partial", "--freeze"])
    assert r.exit_code == 0, r.output
    assert "frozen: 4 loaded parameters (requires_grad=False)" in r.output and "mode: eval" in r.output
    r = CliRunner().invoke(main, ["load", str(path), "--model", f"{__name__}:Backbone", "--freeze", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["report"]
    assert sorted(report["frozen"]) == ["bn.bias", "bn.weight", "conv.bias", "conv.weight", "fc.bias", "fc.weight"]
