"""``diff FILE hf:DIR`` (and ``ckptfit.diff``): the model DIR/config.json describes is built on meta within fixed
bounds (:data:`ckptfit.diffing.MAX_SPEC_PARAMETERS` parameters, 1 GiB of real tensors computed in ``__init__``),
not bounds the other file sets: "what does this file lack" compares a file with a larger model.

Measured on the 2-core development machine before the bound (``timeout 60 python -m ckptfit diff m.safetensors
hf:DIR``): a tiny BertModel folder whose config.json says ``max_position_embeddings: 300000000`` reached 7.8 GB of
memory before it printed a shape difference; ``num_hidden_layers: 100000`` ran past the 60 s timeout.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptfit
from ckptfit import diffing
from ckptfit.cli import main
from ckptfit.errors import ResourceLimitExceeded

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _bert(path: Path, layers: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=8, num_attention_heads=2,
                                     intermediate_size=8, vocab_size=10, max_position_embeddings=16)
    model = transformers.BertModel(config)
    model.save_pretrained(path)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _edit(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A save_pretrained folder and a .safetensors file of the same model."""
    sd = _bert(tmp_path / "m")
    safetensors_torch.save_file(sd, str(tmp_path / "m.safetensors"))
    return tmp_path / "m", tmp_path / "m.safetensors", sd


def _refused(folder: Path, file: Path, what: str) -> None:
    config = str(folder / "config.json")
    with pytest.raises(ResourceLimitExceeded) as e:
        ckptfit.diff(str(file), f"hf:{folder}")
    assert e.value.path == config
    assert what in e.value.detail and "more than any real model; not built" in e.value.detail
    assert e.value.hint == (f"fix the sizes in {config} (layer counts, max_position_embeddings, vocab_size ...) "
                            f"to those of the model meant")
    r = CliRunner().invoke(main, ["diff", str(file), f"hf:{folder}"])
    assert r.exit_code == 1, r.output
    assert what in r.output and f"fix the sizes in {config}" in r.output
    assert "Traceback" not in r.output


def test_a_legitimate_folder_diffs_as_before(saved):
    folder, file, sd = saved
    d = ckptfit.diff(str(file), f"hf:{folder}")
    assert d.identical and d.common == len(sd)
    r = CliRunner().invoke(main, ["diff", str(file), f"hf:{folder}"])
    assert r.exit_code == 0, r.output
    assert f"{len(sd)} tensors in both" in r.output and "identical" in r.output


def test_a_folder_of_a_larger_model_shows_what_the_file_lacks(saved):
    """Not bounded by the file: a model with more layers than the file is compared, not refused."""
    folder, file, sd = saved
    _edit(folder, num_hidden_layers=6)
    d = ckptfit.diff(str(file), f"hf:{folder}")
    added = set(d.added)
    assert added and all(k.startswith(tuple(f"encoder.layer.{i}." for i in range(2, 6))) for k in added)
    assert len(added) == 4 * sum(k.startswith("encoder.layer.0.") for k in sd)
    assert not d.removed and not d.shape_changed
    r = CliRunner().invoke(main, ["diff", str(file), f"hf:{folder}"])
    assert r.exit_code == 7, r.output
    assert f"added ({len(added)}): encoder.layer.{{2..5}}.attention.self.{{query,key,value}}.{{weight,bias}}" in r.output


def test_a_hostile_max_position_embeddings_is_refused_before_the_memory_is_taken(saved):
    folder, file, _ = saved
    _edit(folder, max_position_embeddings=300_000_000)
    _refused(folder, file, "would compute 2289 MiB of real tensors in its __init__ (torch.arange alone: 2289 MiB; "
                           "at most 1024 MiB)")


def test_too_many_layers_are_refused_at_the_parameter_bound(saved, monkeypatch):
    """The mechanism at a small bound (the real one takes 100,000 registrations to reach: see the slow test)."""
    folder, file, _ = saved
    monkeypatch.setattr(diffing, "MAX_SPEC_PARAMETERS", 500)
    _edit(folder, num_hidden_layers=100_000)
    _refused(folder, file, "has more than 500 parameters (stopped at parameter 501: ")


@pytest.mark.slow
def test_num_hidden_layers_100_000_is_refused_at_the_real_bound(saved):
    folder, file, _ = saved
    _edit(folder, num_hidden_layers=100_000)
    _refused(folder, file, f"has more than {diffing.MAX_SPEC_PARAMETERS} parameters (stopped at parameter ")


def test_a_spec_whose_sizes_come_from_no_file_is_not_bounded(tmp_path, monkeypatch):
    """torchvision:/python specs are the user's code, not a file's sizes: built as they were."""
    pytest.importorskip("torchvision")
    monkeypatch.setattr(diffing, "MAX_SPEC_PARAMETERS", 1)
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "r.pth")
    d = ckptfit.diff(str(tmp_path / "r.pth"), "torchvision:resnet18", values=False)
    assert d.identical
