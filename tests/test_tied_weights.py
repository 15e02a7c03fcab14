"""Tied weights whose file holds a tensor of its own: never loaded wrong, never lost in silence.

A model that ties ``head.weight`` to ``emb.weight`` holds one tensor for both. A file saved from
the same model *without* the tie holds two different tensors: loading either loses the other,
so ckptfit refuses (model unchanged) and says how to settle it. A file saved from a tied model
by a writer that duplicated the tensor (``safetensors`` ``save_file`` of cloned tensors) holds
two equal tensors: it loads, and the report says the file's own tensor was checked equal.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.cli import main

MODULE = Path(__file__).stem


class Tied(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight


class Untied(Tied):
    def __init__(self) -> None:
        super().__init__(tie=False)


def _untied_file(tmp_path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    sd = Untied().state_dict()
    path = tmp_path / "untied.pth"
    torch.save(sd, path)
    return path, sd


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_file_saved_without_the_tie_is_refused_and_the_model_is_unchanged(tmp_path):
    path, _ = _untied_file(tmp_path)
    model = Tied()
    before = _snapshot(model)
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path)
    assert _same(model, before) and model.head.weight is model.emb.weight
    text = str(e.value)
    assert text.startswith("Refused: would load 3/4 tensors from ")
    assert re.search(r"  missing \(1\): head\.weight — tied to 'emb\.weight' \(one tensor\), but the checkpoint "
                     r"holds different values for them: 'head\.weight' and 'emb\.weight' differ \(40 of 40 values, "
                     r"largest difference [0-9.e+-]+\); loading either would lose the other", text), text
    assert e.value.problems[-1].startswith("head.weight: tied to 'emb.weight' (one tensor), but the checkpoint holds")
    assert e.value.plan.suggestions == (
        "untie 'head.weight' from 'emb.weight' in the model, so each loads its own checkpoint tensor: before "
        "loading, `model.head.weight = nn.Parameter(model.emb.weight.detach().clone())` (or build the model "
        "without the tie)",
        "pass exclude=['head.weight'] (on the command line: --exclude head.weight) to load the checkpoint's "
        "'emb.weight' into both tied weights; 'head.weight' is not used",
        "pass exclude=['emb.weight'] (on the command line: --exclude emb.weight) to load the checkpoint's "
        "'head.weight' into both tied weights; 'emb.weight' is not used")


def test_build_refuses_too(tmp_path):
    path, _ = _untied_file(tmp_path)
    with pytest.raises(ckptfit.LoadError, match=r"'head\.weight' and 'emb\.weight' differ"):
        ckptfit.build(Tied, path)


def test_plan_shows_the_check_and_reads_no_bytes(tmp_path):
    path, _ = _untied_file(tmp_path)
    p = ckptfit.plan(Tied(), path)
    assert p.ok  # names and shapes only; the values are compared by load
    d = next(d for d in p.decisions if d.target == "head.weight")
    assert (d.action, d.source, d.tied_to) == ("tied", "head.weight", "emb.weight")
    assert ("  tied (1): head.weight — shares emb.weight; the checkpoint's own 'head.weight' checked equal at load"
            in str(p).splitlines())


@pytest.mark.parametrize("exclude,kept", [("head.weight", "emb.weight"), ("emb.weight", "head.weight")])
def test_each_exclude_suggestion_loads_one_file_tensor_into_both(tmp_path, exclude, kept):
    path, sd = _untied_file(tmp_path)
    for model, report in ((m := Tied(), ckptfit.load(m, path, exclude=[exclude])),
                          ckptfit.build(Tied, path, exclude=[exclude])):
        assert model.head.weight is model.emb.weight
        assert torch.equal(model.emb.weight, sd[kept]) and torch.equal(model.body.weight, sd["body.weight"])
        assert [(d.target, d.tied_to) for d in report.tied] == [("head.weight", "emb.weight")]
        assert report.left_at_init == () and report.num_loaded == 4
        assert [(u.source, u.reason) for u in report.unused] == [(exclude, "excluded by rule")]


def test_the_untie_suggestion_followed_literally_loads_both(tmp_path):
    path, sd = _untied_file(tmp_path)
    model = Tied()
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())  # the printed line
    report = ckptfit.load(model, path)
    assert report.num_loaded == 4 and not report.tied
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_a_duplicated_tie_loads_and_says_it_was_checked(tmp_path):
    torch.manual_seed(1)
    src = Tied()
    path = tmp_path / "dup.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}, str(path))
    model, report = ckptfit.build(Tied, path)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, src.emb.weight)
    assert report.num_loaded == 4 and [d.source for d in report.tied] == ["head.weight"]
    assert ("  tied (1): head.weight — shares emb.weight; the checkpoint's own 'head.weight' checked equal at load"
            in str(report).splitlines())


def test_values_are_compared_after_the_cast_the_load_applies(tmp_path):
    torch.manual_seed(2)
    emb = torch.randn(10, 4).to(torch.bfloat16)
    sd = {"emb.weight": emb, "body.weight": torch.randn(4, 4), "body.bias": torch.randn(4),
          "head.weight": emb.float()}  # the same values, one as bfloat16: equal once both are float32
    torch.save(sd, tmp_path / "mixed.pth")
    model = Tied()
    ckptfit.load(model, tmp_path / "mixed.pth")
    assert torch.equal(model.head.weight, emb.float())
    sd["head.weight"] = emb.float() + 1e-3  # differs only below bfloat16's precision: still different in float32
    torch.save(sd, tmp_path / "mixed.pth")
    with pytest.raises(ckptfit.LoadError, match=r"'head\.weight' and 'emb\.weight' differ \(40 of 40 values"):
        ckptfit.load(Tied(), tmp_path / "mixed.pth")


def test_signed_zeros_are_a_difference(tmp_path):
    sd = Untied().state_dict()
    sd["emb.weight"] = torch.zeros(10, 4)
    sd["head.weight"] = -torch.zeros(10, 4)
    torch.save(sd, tmp_path / "zeros.pth")
    with pytest.raises(ckptfit.LoadError, match=r"differ \(in their bit patterns only"):
        ckptfit.load(Tied(), tmp_path / "zeros.pth")


def test_damaged_bytes_of_the_tied_copy_are_a_damaged_file_not_a_disagreement(tmp_path):
    torch.manual_seed(3)
    src = Tied()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    path = tmp_path / "dup.pth"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:  # the record of head.weight's storage (the last one written)
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.header_offset)
    raw = bytearray(path.read_bytes())
    h = info.header_offset  # the local header's own name and extra lengths (torch pads the extra field)
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    model = Tied()
    before = _snapshot(model)
    with pytest.raises(ckptfit.CorruptCheckpoint, match="fails its CRC check"):
        ckptfit.load(model, path)
    assert _same(model, before)


def test_a_tie_excluded_without_its_own_tensor_is_reported_tied_not_at_init(tmp_path):
    # before: "left at init: head.weight", while head.weight held the loaded emb.weight
    torch.manual_seed(4)
    src = Tied()
    torch.save({k: v for k, v in src.state_dict().items() if k != "head.weight"}, tmp_path / "tied.pth")
    model = Tied()
    report = ckptfit.load(model, tmp_path / "tied.pth", exclude=["head.weight"])
    assert torch.equal(model.head.weight, src.emb.weight)
    assert [d.target for d in report.tied] == ["head.weight"] and report.left_at_init == ()


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_load_exits_1_with_the_reason_and_each_exclude_loads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path, sd = _untied_file(tmp_path)
    r = _cli("load", path, "--model", f"{MODULE}:Tied")
    assert r.exit_code == 1
    assert "'head.weight' and 'emb.weight' differ" in r.stderr and "--exclude head.weight" in r.stderr
    r = _cli("plan", path, "--model", f"{MODULE}:Tied")
    assert r.exit_code == 0, r.output
    assert "head.weight — shares emb.weight; the checkpoint's own 'head.weight' checked equal at load" in r.stdout
    for exclude, kept in (("head.weight", "emb.weight"), ("emb.weight", "head.weight")):
        out = tmp_path / f"out-{exclude}.safetensors"
        r = _cli("load", path, "--model", f"{MODULE}:Tied", "--exclude", exclude, "--save", out, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["report"]["counts"]["loaded"] == 4
        with ckptfit.open(out) as saved:
            got = {k: t.load() for k, t in saved.tensors()}
        assert torch.equal(got["emb.weight"], sd[kept])  # the tie is written once


def test_keys_that_are_not_attribute_paths_get_advice_that_runs(tmp_path):
    class Seq(nn.Module):
        def __init__(self, tie: bool = True) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 6, bias=False))
            if tie:
                self.layers[1].weight = self.layers[0].weight

    torch.manual_seed(5)
    sd = Seq(tie=False).state_dict()
    torch.save(sd, tmp_path / "seq.pth")
    model = Seq()
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, tmp_path / "seq.pth")
    code = re.search(r"`([^`]+)`", e.value.plan.suggestions[0]).group(1)
    assert code == ("setattr(model.get_submodule('layers.1'), 'weight', "
                    "nn.Parameter(model.get_parameter('layers.0.weight').detach().clone()))")
    exec(code, {"model": model, "nn": nn})
    ckptfit.load(model, tmp_path / "seq.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_torch_save_of_a_tied_model_stores_one_tensor_under_both_keys_and_loads(tmp_path):
    torch.manual_seed(6)
    src = Tied()
    torch.save(src.state_dict(), tmp_path / "tied_both.pth")  # one storage behind emb.weight and head.weight
    model = Tied()
    report = ckptfit.load(model, tmp_path / "tied_both.pth")
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, src.emb.weight)
    assert [(d.target, d.source) for d in report.tied] == [("head.weight", "head.weight")]
