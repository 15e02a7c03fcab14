"""Modules' own load logic (pre-hooks, ``_load_from_state_dict`` overrides, post-hooks) is honoured.

The differential test: wherever strict ``model.load_state_dict(sd)`` loads a saved state dict,
``ckptfit.load`` gives bit-identical state.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import ckptfit


class Doubling(nn.Linear):
    """Its own ``_load_from_state_dict`` doubles the stored weight (a value-changing override)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key] * 2
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class LegacySaver(nn.Module):
    """An old layout: ``w``/``b`` at the top."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3))


class LegacyNames(nn.Module):
    """Reads the old ``w``/``b`` through a private pre-hook that renames them to ``proj.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self._register_load_state_dict_pre_hook(self._legacy)

    @staticmethod
    def _legacy(sd, prefix, *args):
        for old, new in (("w", "proj.weight"), ("b", "proj.bias")):
            if prefix + old in sd:
                sd[prefix + new] = sd.pop(prefix + old)


class TransposedSaver(nn.Module):
    """A weight stored ``[in, out]`` under ``w_t``."""

    def __init__(self) -> None:
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(4, 3))
        self.bias = nn.Parameter(torch.randn(3))


class TransposedReader(nn.Linear):
    """Reads ``w_t`` through a public pre-hook that transposes it (a value-changing hook)."""

    def __init__(self) -> None:
        super().__init__(4, 3)
        self.register_load_state_dict_pre_hook(self._from_transposed)

    @staticmethod
    def _from_transposed(module, sd, prefix, *args):
        if prefix + "w_t" in sd:
            sd[prefix + "weight"] = sd.pop(prefix + "w_t").t()


class PostHooked(nn.Module):
    """A post-hook keeps a derived buffer in step with the loaded weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("norm", torch.zeros(()), persistent=False)
        self.register_load_state_dict_post_hook(self._refresh)

    @staticmethod
    def _refresh(module, incompatible_keys) -> None:
        module.norm.copy_(module.lin.weight.detach().norm())


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def _custom_param() -> nn.Module:
    m = nn.Linear(5, 5)
    parametrize.register_parametrization(m, "weight", Symmetric())
    return m


def _wn_old() -> nn.Module:
    return nn.Sequential(torch.nn.utils.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU(),
                         torch.nn.utils.weight_norm(nn.Linear(4, 2), dim=None))


def _wn_new() -> nn.Module:
    return nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU(),
                         torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 2), dim=None))


def _tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=50, max_position_embeddings=32)
    return transformers.BertModel(cfg)


def _tv(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        tv = pytest.importorskip("torchvision")
        return getattr(tv.models, name)(num_classes=10)
    return make


MODELS: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(6, 5),
    "conv": lambda: nn.Conv2d(3, 4, 3),
    "batchnorm": lambda: nn.BatchNorm2d(4),
    "layernorm": lambda: nn.LayerNorm(6),
    "embedding": lambda: nn.Embedding(9, 4),
    "mha": lambda: nn.MultiheadAttention(8, 2),
    "mha_kdim": lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=6),
    "lstm": lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True),
    "gru": lambda: nn.GRU(4, 5),
    "weight_norm_old": _wn_old,
    "weight_norm_new": _wn_new,
    "spectral_norm_old": lambda: torch.nn.utils.spectral_norm(nn.Linear(5, 4)),
    "spectral_norm_new": lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4)),
    "parametrize_custom": _custom_param,
    "own_load_from_state_dict": lambda: nn.Sequential(Doubling(4, 3), nn.Tanh()),
    "legacy_saver": LegacySaver,
    "pre_hook_rename": LegacyNames,
    "transposed_saver": TransposedSaver,
    "pre_hook_transpose": TransposedReader,
    "post_hook": PostHooked,
    "resnet18": _tv("resnet18"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "bert": _tiny_bert,
}

# (file saved from, model loaded into): every model into itself, and the pairs that need a hook
PAIRS = [(m, m) for m in MODELS] + [
    ("weight_norm_old", "weight_norm_new"), ("weight_norm_new", "weight_norm_old"),
    ("legacy_saver", "pre_hook_rename"), ("transposed_saver", "pre_hook_transpose"),
    ("linear", "spectral_norm_old"), ("spectral_norm_old", "spectral_norm_new"),
]


def _make(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def _strict_load(name: str, sd: dict) -> nn.Module | None:
    model = _make(name, 1)
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError):
        return None
    return model


@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_ckptfit_loads_what_strict_load_state_dict_loads_bit_identically(tmp_path, src, dst):
    path = tmp_path / "file.pt"
    torch.save(_make(src, 0).state_dict(), path)
    expected = _strict_load(dst, torch.load(path))
    if expected is None:
        pytest.skip("strict load_state_dict refuses this pair")
    model = _make(dst, 1)
    ckptfit.load(model, path)
    want, got = expected.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if dst == "post_hook":
        assert torch.equal(model.norm, expected.norm)


@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_build_gives_what_strict_load_state_dict_gives(tmp_path, src, dst):
    path = tmp_path / "file.pt"
    torch.save(_make(src, 0).state_dict(), path)
    expected = _strict_load(dst, torch.load(path))
    if expected is None:
        pytest.skip("strict load_state_dict refuses this pair")
    model, _report = ckptfit.build(lambda: _make(dst, 1), path)
    want, got = expected.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_differential_covers_the_hook_pairs(tmp_path):
    """The pairs that need a module's own hook are among those strict load_state_dict loads."""
    for src, dst in [("weight_norm_old", "weight_norm_new"), ("legacy_saver", "pre_hook_rename"),
                     ("transposed_saver", "pre_hook_transpose")]:
        assert _strict_load(dst, _make(src, 0).state_dict()) is not None, (src, dst)


def test_old_weight_norm_file_into_parametrizations_says_which_hook_renamed(tmp_path):
    path = tmp_path / "wn.pt"
    torch.save(_make("weight_norm_old", 0).state_dict(), path)
    p = ckptfit.plan(_make("weight_norm_new", 1), path)
    assert p.ok
    assert p.mapping()["0.parametrizations.weight.original0"] == "0.weight_g"
    assert p.mapping()["2.parametrizations.weight.original1"] == "2.weight_v"
    d = next(d for d in p.decisions if d.target == "0.parametrizations.weight.original0")
    assert "module's own load hook" in d.reason and "weight_norm" in d.reason
    assert any("module's own load hook" in t and "'0.weight_g' -> '0.parametrizations.weight.original0'" in t
               for t in p.transforms)
    report = ckptfit.load(_make("weight_norm_new", 1), path)
    assert "module's own load hook" in str(report)


def test_parametrizations_weight_norm_file_into_the_old_weight_norm_api(tmp_path):
    """No hook of torch does this direction; the two tensors are the same g and v."""
    path = tmp_path / "wn_new.pt"
    src = _make("weight_norm_new", 0)
    torch.save(src.state_dict(), path)
    model = _make("weight_norm_old", 1)
    report = ckptfit.load(model, path)
    assert torch.equal(model[0].weight_g, src[0].parametrizations.weight.original0)
    assert torch.equal(model[0].weight_v, src[0].parametrizations.weight.original1)
    assert torch.equal(model[2].weight_v, src[2].parametrizations.weight.original1)
    x = torch.randn(2, 3, 5)
    assert torch.allclose(model[0](x), src[0](x))


def test_build_honours_a_value_changing_override_and_a_rename_hook(tmp_path):
    path = tmp_path / "d.pt"
    src = _make("own_load_from_state_dict", 0)
    torch.save(src.state_dict(), path)
    model, report = ckptfit.build(lambda: _make("own_load_from_state_dict", 1), path)
    assert torch.equal(model[0].weight, src[0].weight * 2)
    assert torch.equal(model[0].bias, src[0].bias)
    assert any("Doubling's own load logic" in t for t in report.transforms)
    path = tmp_path / "wn.pt"
    torch.save(_make("weight_norm_old", 0).state_dict(), path)
    model, _ = ckptfit.build(lambda: _make("weight_norm_new", 1), path)
    assert not any(t.is_meta for t in model.state_dict().values())


def test_a_file_with_a_prefix_still_meets_the_hook(tmp_path):
    path = tmp_path / "dp.pt"
    src = nn.DataParallel(_make("weight_norm_old", 0))
    torch.save({"state_dict": src.state_dict()}, path)
    model = _make("weight_norm_new", 1)
    ckptfit.load(model, path)
    assert torch.equal(model[0].parametrizations.weight.original0, src.module[0].weight_g)
