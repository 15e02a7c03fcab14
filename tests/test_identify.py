"""identify(): which architecture and constructor arguments produced a state dict, from names and shapes.

The signature index is built in a temporary cache, restricted to a few families
(``CKPTFIT_IDENTIFY_FAMILIES``) so the file runs in seconds, never the whole timm registry.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from ckptfit.cli import main
from ckptfit.identification import identify

torchvision = pytest.importorskip("torchvision")

FAMILIES = ("torchvision.models.resnet*,torchvision.models.vgg11,timm.resnet26d,timm.resnet18,"
            "transformers.bert,transformers.gpt2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("ckptfit-cache")
    mp.setenv("CKPTFIT_CACHE", str(path))
    mp.setenv("CKPTFIT_IDENTIFY_FAMILIES", FAMILIES)
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def resnet34_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet34(num_classes=7).state_dict()


def test_dataparallel_resnet34_is_identified_with_num_classes(cache, resnet34_sd, tmp_path):
    path = tmp_path / "resnet_final.pth"
    torch.save({f"module.{k}": v for k, v in resnet34_sd.items()}, path)
    result = identify(path)
    assert result.known
    best = result.best
    assert best.architecture == "torchvision.models.resnet34"
    assert dict(best.kwargs) == {"num_classes": 7}
    assert best.score == pytest.approx(1.0)
    assert "strip 'module.'" in best.explained
    d = result.to_dict()
    assert d["candidates"][0]["architecture"] == "torchvision.models.resnet34"
    assert d["candidates"][0]["kwargs"] == {"num_classes": 7}
    assert [c["score"] for c in d["candidates"]] == sorted((c["score"] for c in d["candidates"]), reverse=True)
    json.dumps(d)
    assert "torchvision.models.resnet34(num_classes=7)" in str(result)


def test_lightning_style_checkpoint_is_identified(cache, resnet34_sd, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in resnet34_sd.items()}, "epoch": 3,
                "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    result = identify(path)
    assert result.container == "state_dict"
    assert result.best.architecture == "torchvision.models.resnet34"
    assert dict(result.best.kwargs) == {"num_classes": 7}


def test_cached_answer_builds_nothing(cache, resnet34_sd, tmp_path, monkeypatch):
    path = tmp_path / "r.pth"
    torch.save(resnet34_sd, path)
    identify(path)

    def no_building(*args, **kwargs):
        raise AssertionError("the second identify built signatures instead of reading the index")

    from ckptfit.identification import search, signatures

    monkeypatch.setattr(signatures, "build_many", no_building)
    monkeypatch.setattr(search, "build_many", no_building)
    result = identify(path)
    assert result.best.architecture == "torchvision.models.resnet34"
    assert not result.notes  # nothing was indexed the second time


def test_a_cached_answer_imports_no_torch(cache, resnet34_sd, tmp_path):
    """``ckptfit identify`` with the index on disk reads it and the file's header only: torch is never imported."""
    from test_no_torch import run_without_torch

    path = tmp_path / "r.pth"
    torch.save(resnet34_sd, path)
    identify(path)  # the index, built once (this process imports torch; the next one must not)
    res = run_without_torch("identify", str(path))
    assert res.returncode == 0, res.stderr
    assert "torchvision.models.resnet34(num_classes=7)" in res.stdout


def test_timm_num_classes_and_in_chans(cache, tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "timm.pth"
    torch.save(timm.create_model("resnet26d", num_classes=5, in_chans=1).state_dict(), path)
    best = identify(path).best
    assert best.architecture == "timm.resnet26d"
    assert dict(best.kwargs) == {"num_classes": 5, "in_chans": 1}
    assert best.spec == "timm:resnet26d"


def test_tiny_bert_folder_family_and_sizes(cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                                  vocab_size=99, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "tiny-bert")
    result = identify(tmp_path / "tiny-bert")
    assert result.known
    best = result.best
    assert best.architecture == "transformers.BertForMaskedLM"
    kw = dict(best.kwargs)
    assert kw["model_type"] == "bert"
    assert (kw["hidden_size"], kw["num_hidden_layers"], kw["num_attention_heads"], kw["vocab_size"]) == (32, 3, 4, 99)
    assert kw["intermediate_size"] == 37


def test_bare_bert_state_dict_sizes_from_shapes(cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                                  vocab_size=101, max_position_embeddings=32)
    path = tmp_path / "bert.pth"
    torch.save({f"module.{k}": v for k, v in transformers.BertModel(cfg).state_dict().items()}, path)
    best = identify(path).best
    assert best.architecture == "transformers.BertModel"
    kw = dict(best.kwargs)
    assert (kw["hidden_size"], kw["num_hidden_layers"], kw["vocab_size"]) == (128, 2, 101)
    assert kw["num_attention_heads"] == 2  # assumed head_dim 64, and said so
    assert "heads assumed" in best.explained


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3)
        self.body = nn.Conv2d(12, 24, 3)
        self.classifier = nn.Linear(24, 5)


def test_unknown_cnn_says_unknown_with_nearest_candidates(cache, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(_Odd().state_dict(), path)
    result = identify(path, top=3)
    assert not result.known
    assert result.best is None
    assert result.candidates and len(result.candidates) <= 3
    assert all(c.score < 0.9 and c.differences for c in result.candidates)
    assert "unknown architecture" in str(result)
    assert result.to_dict()["architecture"] == "unknown"


def test_resnet_with_a_changed_block_is_not_guessed(cache, resnet34_sd, tmp_path):
    sd = dict(resnet34_sd)
    sd["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)  # another shape than any resnet
    path = tmp_path / "changed.pth"
    torch.save(sd, path)
    result = identify(path)
    assert not result.known
    top = result.candidates[0]
    assert top.architecture == "torchvision.models.resnet34"
    assert any("layer3.0.conv1.weight" in d for d in top.differences)


def test_cli_identify_json_and_exit_codes(cache, resnet34_sd, tmp_path):
    path = tmp_path / "r.pth"
    torch.save(resnet34_sd, path)
    runner = CliRunner()
    res = runner.invoke(main, ["identify", str(path), "--json", "--top", "2"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["candidates"][0]["architecture"] == "torchvision.models.resnet34"
    assert len(data["candidates"]) <= 2
    odd = tmp_path / "odd.pth"
    torch.save(_Odd().state_dict(), odd)
    res = runner.invoke(main, ["identify", str(odd)])
    assert res.exit_code == 6
    assert "unknown architecture" in res.stdout


def test_text_without_any_comparable_candidate_lists_none():
    from ckptfit.identification import Candidate, Identification

    zero = tuple(Candidate(f"torchvision.models.m{i}", {}, 0.0, "0/16 model tensors match") for i in range(3))
    text = str(Identification("gone.pth", None, 2, zero, False))
    assert "no known architecture shares a tensor name and shape with it" in text
    assert "torchvision.models.m0" not in text  # 0-score candidates are noise, not "nearest"
