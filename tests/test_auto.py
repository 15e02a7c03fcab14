"""from_checkpoint(): the architecture recorded by the file or identified, built without init, filled."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from ckptfit.auto import from_checkpoint
from ckptfit.cli import main
from ckptfit.errors import CheckpointError

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path_factory.getbasetemp() / "ckptfit-cache"))
    monkeypatch.setenv("CKPTFIT_IDENTIFY_FAMILIES", "torchvision.models.resnet*,transformers.bert")


def _equal_sd(model, sd) -> None:
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_identified_resnet_is_built_and_filled(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet34(num_classes=7).state_dict()
    path = tmp_path / "resnet_final.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    model, report = from_checkpoint(path)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 7
    assert report.complete
    assert report.model.startswith("torchvision.models.resnet34(num_classes=7)")
    assert "identified" in report.model
    assert report.to_dict()["model"] == report.model
    assert "model: torchvision.models.resnet34" in str(report)
    _equal_sd(model, sd)
    assert not any(p.is_meta for p in model.parameters())


def test_hf_folder_uses_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  vocab_size=99, max_position_embeddings=64)
    src = transformers.BertForMaskedLM(cfg)
    src.save_pretrained(tmp_path / "tiny")
    model, report = from_checkpoint(tmp_path / "tiny")
    assert type(model).__name__ == "BertForMaskedLM"
    assert "config.json" in report.model
    _equal_sd(model, src.state_dict())


def _lightning_file(tmp_path, monkeypatch):
    pkg = tmp_path / "litpkg_auto"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class LitNet(nn.Module):  # stands for a LightningModule: only construction matters here
            def __init__(self, width=4, num_classes=3):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("litpkg_auto")
    lit = mod.LitNet(width=6, num_classes=5)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": lit.state_dict(), "epoch": 3, "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"width": 6, "num_classes": 5, "_class_path": "litpkg_auto.LitNet"}}, path)
    return path, lit


def test_lightning_class_needs_trust(tmp_path, monkeypatch):
    path, _lit = _lightning_file(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=r"LightningModule class 'litpkg_auto.LitNet'.*\n.*trust=True"):
        from_checkpoint(path)


def test_lightning_class_with_trust(tmp_path, monkeypatch):
    path, lit = _lightning_file(tmp_path, monkeypatch)
    model, report = from_checkpoint(path, trust=True)
    assert type(model).__name__ == "LitNet" and model.net[2].out_features == 5
    assert "hyper_parameters" in report.model
    _equal_sd(model, lit.state_dict())


def test_unknown_architecture_is_refused_with_candidates(tmp_path):
    sd = torchvision.models.resnet18(num_classes=4).state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"no known architecture fits it completely; nearest candidates:\n"
                                              r".*torchvision.models.resnet18"):
        from_checkpoint(path)


def test_cli_load_without_model_says_what_it_chose(tmp_path):
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    res = CliRunner().invoke(main, ["load", str(path)])
    assert res.exit_code == 0, res.output
    assert "model: torchvision.models.resnet18(num_classes=3)" in res.stdout
    res = CliRunner().invoke(main, ["load", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["report"]["model"].startswith("torchvision.models.resnet18(num_classes=3)")


def test_whole_pickled_model_error_names_its_class(tmp_path):
    from ckptfit.demo import SmallCNN

    torch.save(SmallCNN(), tmp_path / "whole.pth")
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(tmp_path / "whole.pth")
    assert "whole pickled model of class 'ckptfit.demo.SmallCNN'" in str(e.value)
    assert "does not record its architecture" not in str(e.value)
    assert "--model ckptfit.demo:SmallCNN" in e.value.hint
    torch.jit.save(torch.jit.script(SmallCNN()), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match="TorchScript model of class 'ckptfit.demo.SmallCNN'"):
        from_checkpoint(tmp_path / "scripted.pt")
