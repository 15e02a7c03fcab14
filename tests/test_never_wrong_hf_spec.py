"""``build("hf:DIR", path)`` and ``--model hf:DIR``: the model a user-named folder's config.json describes is
built within bounds the checkpoint it is to hold sets (its tensor count and bytes), so a hostile or wrong
config.json is refused with what was too big and what to do, instead of taking minutes and gigabytes.

Measured on the 2-core development machine before the bound: a save_pretrained BertModel folder whose
config.json says ``max_position_embeddings: 30000000`` made build() reach 2.4 GB of memory (position ids,
token type ids and the embedding) before it refused the shapes; 300,000,000 would need ten times that.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import ResourceLimitExceeded
from ckptfit.specs import model_factory

transformers = pytest.importorskip("transformers")


def _bert(path: Path) -> dict[str, torch.Tensor]:
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                                     vocab_size=10, max_position_embeddings=16)
    model = transformers.BertModel(config)
    model.save_pretrained(path)
    return model.state_dict()


def _gpt2(path: Path) -> dict[str, torch.Tensor]:
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)  # lm_head.weight tied to transformer.wte.weight
    model.save_pretrained(path)
    return model.state_dict()


def _edit(path: Path, **changes) -> dict:
    config = json.loads((path / "config.json").read_text())
    original = dict(config)
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return original


def _exact(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("saved", [_bert, _gpt2])
def test_a_tiny_save_pretrained_folder_builds_and_loads_exactly(tmp_path, saved):
    sd = saved(tmp_path / "m")
    model, report = ckptfit.build(f"hf:{tmp_path / 'm'}", tmp_path / "m")
    _exact(model, sd)
    assert not report.left_at_init
    model, _ = ckptfit.build(model_factory(f"hf:{tmp_path / 'm'}"), str(tmp_path / "m" / "model.safetensors"))
    _exact(model, sd)  # a factory from the SPEC (as `ckptfit verify` makes) and a file path: the same
    with ckptfit.open(tmp_path / "m") as ckpt:
        model, _ = ckptfit.build(f"hf:{tmp_path / 'm'}", ckpt)  # an opened checkpoint stays open for its owner
        assert ckpt.num_tensors == len(sd) - ("lm_head.weight" in sd)
    _exact(model, sd)


def test_huge_position_embeddings_are_refused_before_they_are_made(tmp_path):
    d = tmp_path / "bert"
    sd = _bert(d)
    original = _edit(d, max_position_embeddings=300_000_000)
    with pytest.raises(ResourceLimitExceeded) as e:
        ckptfit.build(f"hf:{d}", d)
    assert e.value.detail == (
        f"the model {d}/config.json describes has more than 256 MiB of parameters (reached at Embedding.weight, "
        f"shape [300000000, 8]: 8.9 GiB so far), far larger than the checkpoint it is to hold (23 tensors, "
        f"3104 bytes), so it cannot be a correct load; not built")
    assert e.value.path == str(d)  # the folder, read as one checkpoint
    assert e.value.hint == (
        f"fix the sizes in {d}/config.json (layer counts, max_position_embeddings, vocab_size ...) to those of the "
        f"model that wrote the checkpoint; or, if the model really is this large, build it yourself and fill it "
        f"with ckptfit.load(model, '{d}') (with partial=True for the layers the file lacks)")
    _edit(d, **original)  # the hint followed: config.json as the model that wrote the file had it
    model, _ = ckptfit.build(f"hf:{d}", d)
    _exact(model, sd)


def test_a_huge_layer_count_is_refused_after_a_bounded_number_of_parameters(tmp_path):
    d = tmp_path / "gpt2"
    _gpt2(d)
    _edit(d, n_layer=100_000)
    with pytest.raises(ResourceLimitExceeded, match=r"has more than 4096 parameters \(stopped at parameter 4097: Conv1D.weight\), "
                                                    r"far larger than the checkpoint it is to hold \(28 tensors"):
        ckptfit.build(f"hf:{d}", d)


def test_a_model_really_larger_than_the_file_follows_the_hint(tmp_path):
    """A deeper model than the file's (341 layers: 4096 + parameters) is refused by build(); the hint's
    second way, building it yourself and ckptfit.load(..., partial=True), loads the file's layers exactly."""
    d = tmp_path / "gpt2"
    sd = _gpt2(d)
    config = _edit(d, n_layer=341)
    with pytest.raises(ResourceLimitExceeded, match=r"build it yourself and fill it with ckptfit.load\(model, "):
        ckptfit.build(f"hf:{d}", d, partial=True)
    deep = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, "n_layer": 341}))
    report = ckptfit.load(deep, str(d / "model.safetensors"), partial=True)
    got = deep.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert report.num_loaded == len(sd)


def test_the_cli_refuses_with_the_same_message_and_exit_code_1(tmp_path):
    d = tmp_path / "bert"
    _bert(d)
    _edit(d, max_position_embeddings=300_000_000)
    r = CliRunner().invoke(main, ["load", str(d), "--model", f"hf:{d}"])
    assert r.exit_code == 1, r.output
    assert "far larger than the checkpoint it is to hold (23 tensors, 3104 bytes)" in r.output
    assert f"fix the sizes in {d}/config.json" in r.output
    assert "Traceback" not in r.output
