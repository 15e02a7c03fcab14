"""A Hugging Face folder's config.json sets the sizes of the source model ckptfit builds on a refused
load (ckptfit.provenance): a hostile one is refused by bounds, never run out of memory or time.

Measured on the 2-core development machine (one run each, a busy machine): BertModel with
``max_position_embeddings: 300000000`` took 127 s and 7.6 GB of memory before the bound (its
``position_ids`` and ``token_type_ids`` buffers are real), 13 s and 0.8 GB with it (mostly importing
transformers); GPT2 with ``n_layer: 2000`` took 43 s against 11 s for ``n_layer: 2``, so 100,000 layers
would take about half an hour: the bound stops it after 4096 parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.errors import ResourceLimitExceeded
from ckptfit.loading.meta import bounded_build, parameters_on_meta

pytest.importorskip("transformers")


def _folder(tmp_path: Path, config: dict) -> Path:
    """A save_pretrained-style folder: config.json as given, one tensor the model below does not have."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    return d


def _problem(path: Path) -> str:
    p = ckptfit.plan(nn.Linear(4, 4), path)
    assert not p.ok
    (problem,) = [x for x in p.problems if x.startswith("source model ")]
    return problem


def test_huge_position_buffers_are_refused_before_they_are_made(tmp_path):
    path = _folder(tmp_path, {"architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": 1,
                              "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10,
                              "max_position_embeddings": 300_000_000})
    assert _problem(path) == (
        "source model transformers.BertModel (recorded in config.json): could not be built: ResourceLimitExceeded: "
        "it would compute 2289 MiB of real tensors in its __init__ (torch.arange alone: 2289 MiB; at most 1024 MiB); "
        "not built")
    with pytest.raises(ckptfit.LoadError, match="torch.arange alone: 2289 MiB"):
        ckptfit.load(nn.Linear(4, 4), path)


def test_a_huge_layer_count_is_refused_after_a_bounded_number_of_parameters(tmp_path):
    path = _folder(tmp_path, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 100_000,
                              "n_embd": 8, "n_head": 2, "vocab_size": 10})
    assert _problem(path) == (
        "source model transformers.GPT2LMHeadModel (recorded in config.json): could not be built: "
        "ResourceLimitExceeded: it has more than 4096 parameters (stopped at parameter 4097: Conv1D.weight); not built")


def test_a_small_config_is_still_built(tmp_path):
    path = _folder(tmp_path, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2,
                              "n_embd": 8, "n_head": 2, "vocab_size": 10})
    assert _problem(path).endswith("its tensors are not the file's (names or shapes differ), so it cannot say which "
                                   "is which")  # built, compared, and found to be another model


class _Buffers(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)  # a parameter of n * n elements: on meta, never counted
        self.register_buffer("ids", torch.arange(n))
        self.register_buffer("mask", torch.ones(n, 1).tril().expand(n, n))  # a view: only the ones are real


def test_the_bound_counts_real_tensors_only_and_is_per_build():
    with parameters_on_meta(), bounded_build(max_parameters=10, max_bytes=1 << 20, what="it"):
        m = _Buffers(50_000)  # a 2.5e9-element weight on meta, 0.8 MB of real buffers
    assert m.lin.weight.is_meta and m.ids.numel() == 50_000
    with pytest.raises(ResourceLimitExceeded, match=r"torch.outer alone: 8192 MiB"):
        with parameters_on_meta(), bounded_build(max_parameters=10, max_bytes=1 << 30, what="it"):
            torch.outer(torch.arange(1 << 20, dtype=torch.float32), torch.ones(1 << 11))  # 2**31 floats, refused
    with pytest.raises(ResourceLimitExceeded, match="more than 1 parameters"):
        with parameters_on_meta(), bounded_build(max_parameters=1, max_bytes=1 << 30, what="it"):
            nn.Linear(2, 2)
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # nothing stays bounded after the build


def test_from_checkpoint_builds_the_configs_model_within_the_same_bounds(tmp_path):
    path = _folder(tmp_path, {"architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": 1,
                              "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10,
                              "max_position_embeddings": 300_000_000})
    with pytest.raises(ResourceLimitExceeded, match=r"config.json describes has more than 256 MiB of parameters "
                                                    r"\(reached at Embedding.weight, shape \[300000000, 8\]: 8.9 GiB "
                                                    r"so far\), far larger than the checkpoint it is to hold \(1 "
                                                    r"tensor, 64 bytes\)"):
        ckptfit.from_checkpoint(path)  # bounded as build("hf:DIR", ...) is (tests/test_never_wrong_hf_spec.py)
    small = transformers_bert_folder(tmp_path / "small")
    model, report = ckptfit.from_checkpoint(small)  # a real save_pretrained folder builds as before
    assert report.num_loaded == len(model.state_dict())


def transformers_bert_folder(path: Path) -> Path:
    import transformers

    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                                     vocab_size=10, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_the_parameter_bound_counts_every_parameter_even_when_ids_are_reused() -> None:
    """Each real parameter a layer makes is dropped for its meta twin, and the next one may get its id:
    counting by id alone once left about half of 200 Linear(64, 64) uncounted (the bound undercounted)."""
    from torch import nn

    from ckptfit.errors import ResourceLimitExceeded
    from ckptfit.loading.meta import bounded_build, parameters_on_meta

    total = 200 * (64 * 64 + 64) * 4
    with pytest.raises(ResourceLimitExceeded, match="of parameters"):
        with parameters_on_meta(), bounded_build(max_parameters=10**6, max_bytes=1 << 30, what="it",
                                                 max_parameter_bytes=total - 1):
            nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    with parameters_on_meta(), bounded_build(max_parameters=10**6, max_bytes=1 << 30, what="it",
                                             max_parameter_bytes=total):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)])
    assert all(p.is_meta for p in model.parameters())
