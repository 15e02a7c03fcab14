"""Structural alignment: names are evidence, order is evidence, roles and shapes are constraints.

Each test builds a real module pair whose names differ entirely (a re-implementation), so that
only the structural stage can align them, and checks that ckptfit loads what the names say,
takes declaration order only where the names agree with it, and otherwise refuses with a
``rename=`` that, followed literally, loads the model correctly.
"""
from __future__ import annotations

import ast
import re

import pytest
import torch
from torch import nn

import ckptfit
from ckptfit.matching import match
from ckptfit.matching.names import _token_similarity
from ckptfit.plans import TensorSpec
from _checkpoints import seeded


def _linears(*names: str, dim: int = 8) -> nn.Module:
    m = nn.Module()
    for n in names:
        setattr(m, n, nn.Linear(dim, dim))
    return m


def _renames_from(suggestions: tuple[str, ...]) -> list[list[tuple[str, str]]]:
    """Every rename= list the suggestions print, read back as Python, in the order offered."""
    return [ast.literal_eval(m) for s in suggestions for m in re.findall(r"rename=(\[.*?\])(?:;|$)", s)]


def _rename_from(suggestions: tuple[str, ...]) -> list[tuple[str, str]]:
    found = _renames_from(suggestions)
    assert len(found) == 1, suggestions
    return found[0]


def _specs(sd: dict) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


# -- names settle it -------------------------------------------------------------------


def test_reimplemented_attention_declared_in_another_order_loads_by_name():
    src = seeded(_linears("q", "k", "v", "o"), 0)
    model = _linears("value", "key", "query", "out")
    report = ckptfit.load(model, src.state_dict())
    for mine, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
        assert torch.equal(getattr(model, mine).weight, getattr(src, theirs).weight), mine
        assert torch.equal(getattr(model, mine).bias, getattr(src, theirs).bias), mine
    assert report.transforms == ("structural alignment of 4 modules by name",)
    d = next(d for d in report.loaded if d.target == "value.weight")
    assert d.source == "v.weight" and d.evidence == "name"
    assert "by name, not declaration order" in d.reason
    assert "by structure (8) — aligned by name:" in str(report)
    assert "    q.{weight,bias} -> query.{weight,bias}" in str(report).splitlines()


class UpDown(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.up = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))


class UpDownReimpl(nn.Module):
    def __init__(self):
        super().__init__()
        self.upsample = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.downsample = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))


def test_blocks_renamed_and_declared_in_the_other_order_load_by_name():
    src = seeded(UpDown(), 1)
    model = UpDownReimpl()
    report = ckptfit.load(model, src.state_dict())
    for i in (0, 2):
        assert torch.equal(model.downsample[i].weight, src.down[i].weight)
        assert torch.equal(model.upsample[i].weight, src.up[i].weight)
    assert {d.evidence for d in report.loaded} == {"name"}


def test_names_and_order_agreeing_say_both():
    plan = match(_specs(_linears("query", "key").state_dict()), _specs(_linears("q", "k").state_dict()))
    assert plan.ok and plan.mapping()["key.weight"] == "k.weight"
    assert {d.evidence for d in plan.loads} == {"name and order"}


@pytest.mark.parametrize("a, b", [("q", "query"), ("q", "q_proj"), ("to_q", "q_proj"), ("enc", "encoder"),
                                  ("down", "downsample"), ("fc", "head"), ("fc", "classifier"),
                                  ("attn", "attention"), ("ln", "norm")])
def test_plausible_names_are_similar(a, b):
    from ckptfit.matching.names import _alpha_path, _path_similarity

    assert _path_similarity(_alpha_path(a), _alpha_path(b)) > 0


def test_token_similarity_ranks_exact_over_synonym_over_prefix_over_nothing():
    assert _token_similarity("query", "query") > _token_similarity("fc", "head") > \
        _token_similarity("sub", "subnet") > _token_similarity("b", "branch") > \
        _token_similarity("blk", "block") > _token_similarity("up", "down") == 0


# -- order only where the names agree ----------------------------------------------------


def test_numbered_look_alikes_follow_matching_numbers_not_the_declaration_order():
    # the model declares layer2 before layer1; the file says stage1, stage2: the numbers decide
    src = [TensorSpec(f"stage{i}.{r}", (4, 4) if r == "weight" else (4,), torch.float32)
           for i in (1, 2) for r in ("weight", "bias")]
    model = [TensorSpec(f"layer{i}.{r}", (4, 4) if r == "weight" else (4,), torch.float32)
             for i in (2, 1) for r in ("weight", "bias")]
    plan = match(model, src)
    assert plan.ok and plan.mapping()["layer2.weight"] == "stage2.weight"
    assert {d.evidence for d in plan.loads} == {"name"}


def test_look_alikes_told_apart_by_order_alone_are_refused_with_a_rename_that_loads_them():
    src = seeded(_linears("block_a", "block_b"), 2)
    model = _linears("layer_x", "layer_y")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError, match="only their declaration order tells them apart"):
        ckptfit.load(model, src.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plan = ckptfit.plan(model, src.state_dict())
    rename = _rename_from(plan.suggestions)
    assert rename == [(r"^block_a\.", "layer_x."), (r"^block_b\.", "layer_y.")]
    ckptfit.load(model, src.state_dict(), rename=rename)
    assert torch.equal(model.layer_x.weight, src.block_a.weight)
    assert torch.equal(model.layer_y.bias, src.block_b.bias)


def test_names_contradicting_order_without_settling_it_are_refused_with_a_rename_that_loads_them():
    # the names place 'q' at 'query' (declared second), against the declaration order; the two
    # 'mid' blocks the names cannot tell apart, so nothing of the three is guessed
    src = seeded(_linears("q", "mid_a", "mid_b"), 3)
    model = _linears("mid_x", "query", "mid_y")
    plan = ckptfit.plan(model, src.state_dict())
    assert not plan.ok and plan.loads == ()
    assert any("names and their declaration order disagree" in p for p in plan.suggestions)
    assert "query.weight: ambiguous: checkpoint modules 'q', 'mid_a', 'mid_b' could fill it, but nothing " \
           "tells which (see the suggestion)" in plan.problems
    rename, by_order = _renames_from(plan.suggestions)  # the names' reading first, then the order's
    report = ckptfit.load(model, src.state_dict(), rename=rename)
    assert report.complete
    assert torch.equal(model.query.weight, src.q.weight)
    assert torch.equal(model.mid_x.weight, src.mid_a.weight)
    assert torch.equal(model.mid_y.weight, src.mid_b.weight)


def test_suggested_rules_touch_only_the_module_own_tensors_and_never_chain():
    # 'a' also has a child module 'a.inner' that matches by name: the rule must leave it alone
    src = nn.Module()
    src.a = _linears("inner")
    src.a.p = nn.Parameter(torch.randn(8))
    src.b = nn.Module()
    src.b.p = nn.Parameter(torch.randn(8))
    seeded(src, 4)
    model = nn.Module()
    model.a = _linears("inner")
    model.x = nn.Module()
    model.x.p = nn.Parameter(torch.zeros(8))
    model.y = nn.Module()
    model.y.p = nn.Parameter(torch.zeros(8))
    plan = ckptfit.plan(model, src.state_dict())
    assert not plan.ok
    rename = _rename_from(plan.suggestions)
    assert rename[0] == (r"^a\.(?=[^.]+$)", "x.")
    ckptfit.load(model, src.state_dict(), rename=rename)
    assert torch.equal(model.a.inner.weight, src.a.inner.weight)
    assert torch.equal(model.x.p, src.a.p) and torch.equal(model.y.p, src.b.p)


def test_suggestion_orders_rules_so_that_none_rewrites_another_output():
    from ckptfit.matching.matcher import Matcher

    m = Matcher([], [TensorSpec("a.w", (1,), torch.float32), TensorSpec("b.w", (1,), torch.float32)],
                 partial=False, include=None, exclude=None, tied=None, optional=())
    mods = {"a": {"w": 0}, "b": {"w": 1}}
    rules = m._rename_rules({"a": "b", "b": "c"}, mods)
    assert rules == [(r"^b\.", "c."), (r"^a\.", "b.")]
    assert m._rename_rules({"a": "b", "b": "a"}, mods) is None  # a swap cannot be written as rules


def test_partial_keeps_ambiguous_look_alikes_at_init_and_says_why():
    plan = match(_specs(_linears("layer_x", "layer_y").state_dict()),
                 _specs(_linears("block_a", "block_b").state_dict()), partial=True)
    assert plan.ok and plan.loads == ()
    assert all("ambiguous" in d.reason for d in plan.decisions)
    assert all("ambiguous" in u.reason for u in plan.unused)


def _llama_like(names: tuple[str, ...], prefix: str, layers: int = 3) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}layers.{i}.{n}.weight", (16,), torch.float32) for i in range(layers) for n in names]


def test_misleading_names_against_order_are_refused_and_both_readings_offered():
    # Meta's llama names the norm before attention 'attention_norm' and HF's 'input_layernorm';
    # the word 'attention' pulls it towards 'post_attention_layernorm'. Names against order,
    # without settling it: refused, both readings offered as one rule per kind of module.
    src = _llama_like(("attention_norm", "ffn_norm"), "")
    model = _llama_like(("input_layernorm", "post_attention_layernorm"), "model.")
    plan = match(model, src)
    assert not plan.ok and plan.loads == ()
    by_names, by_order = _renames_from(plan.suggestions)
    assert by_order == [(r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\g<1>.input_layernorm."),
                        (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\g<1>.post_attention_layernorm.")]
    plan = match(model, src, rename=by_order)
    assert plan.ok and plan.mapping() == {
        f"model.layers.{i}.{a}.weight": f"layers.{i}.{b}.weight"
        for i in range(3) for a, b in (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"))}


class FirstSecond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)


class AlphaBeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Linear(8, 8), nn.Linear(8, 8)


def test_the_cli_suggestion_followed_literally_loads(tmp_path, monkeypatch) -> None:
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from ckptfit.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = f"{Path(__file__).stem}:AlphaBeta"
    src = seeded(FirstSecond(), 3)
    torch.save(src.state_dict(), tmp_path / "c.pth")
    refused = CliRunner().invoke(main, ["load", str(tmp_path / "c.pth"), "--model", spec])
    assert refused.exit_code == 1
    line = next(ln for ln in refused.output.splitlines() if "on the command line:" in ln)
    args = shlex.split(line.split("on the command line:", 1)[1].split("; or ")[0])
    assert args[0] == "--rename"
    loaded = CliRunner().invoke(main, ["load", str(tmp_path / "c.pth"), "--model", spec, "--save",
                                       str(tmp_path / "out.safetensors"), *args])
    assert loaded.exit_code == 0, loaded.output
    out = ckptfit.open(tmp_path / "out.safetensors")
    got = {k: t.load() for k, t in out.tensors()}
    for name in ("weight", "bias"):
        assert torch.equal(got[f"alpha.{name}"], src.first.state_dict()[name])
        assert torch.equal(got[f"beta.{name}"], src.second.state_dict()[name])
