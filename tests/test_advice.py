"""Advice that works, on the paths users take: the CLI and the Python API, exit codes and the text read.

- a head of another size built from a SPEC is advised ``--model-arg num_classes=N`` (verified by
  building the model with it on meta), not ``partial=True`` (which would keep a random head);
- a MoCo file with two encoders is advised the prefix that loads one of them, never a
  ``partial=True`` that would load nothing;
- a refusal reads once: one headline, each problem once, the suggestion last, ``LoadError.hint`` set;
- a load through a tie counts the tied tensor as loaded: ``Loaded 4/4 tensors (1 tied)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import LoadError
from _checkpoints import seeded
from test_advice_property import AlphaBeta, Counter, FirstSecond, Net, NetPlus, Tied, _moco, _two_models

MODULE = Path(__file__).stem


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def spec(monkeypatch) -> str:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return f"{MODULE}:Net"


# -- constructor arguments -------------------------------------------------------------------

def test_cli_advises_num_classes_for_a_timm_model_and_the_advice_loads(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("resnet18", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r18_10.pth")
    refused = _cli("load", tmp_path / "r18_10.pth", "--model", "timm:resnet18")
    assert refused.exit_code == 1
    lines = refused.output.splitlines()
    assert lines[0].startswith("error: Refused: would load 120/122 tensors from ")
    assert lines[1:] == [
        "  shape differs (2):",
        "    fc.weight — checkpoint [10, 512], model [1000, 512]",
        "    fc.bias — checkpoint [10], model [1000]",
        "  suggestion: the file's shapes are this model's built with num_classes=10: pass "
        "model_kwargs={'num_classes': 10} (on the command line: --model-arg num_classes=10)",
    ]
    assert "partial" not in refused.output
    out = tmp_path / "fixed.safetensors"
    loaded = _cli("load", tmp_path / "r18_10.pth", "--model", "timm:resnet18", "--model-arg", "num_classes=10",
                  "--save", out)
    assert loaded.exit_code == 0, loaded.output
    assert loaded.output.startswith("Loaded 122/122 tensors")
    with ckptfit.open(out) as saved:
        got = {k: t.load() for k, t in saved.tensors()}
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k


def test_cli_plan_advises_the_argument_too(tmp_path, spec):
    torch.save(seeded(Net(in_chans=1), 0).state_dict(), tmp_path / "gray.pth")
    r = _cli("plan", tmp_path / "gray.pth", "--model", spec)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == ("  suggestion: the file's shapes are this model's built with in_chans=1: "
                                         "pass model_kwargs={'in_chans': 1} (on the command line: --model-arg "
                                         "in_chans=1)")
    assert _cli("plan", tmp_path / "gray.pth", "--model", spec, "--model-arg", "in_chans=1").exit_code == 0


def test_python_build_advises_model_kwargs_for_a_width(tmp_path):
    src = seeded(Net(width=16), 1)
    torch.save(src.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(LoadError) as e:
        ckptfit.build(Net, tmp_path / "wide.pth")
    assert e.value.hint == ("the file's shapes are this model's built with width=16: pass model_kwargs={'width': 16} "
                            "(on the command line: --model-arg width=16)")
    model, report = ckptfit.build(Net, tmp_path / "wide.pth", model_kwargs={"width": 16})
    assert report.complete
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_new_head_on_purpose_keeps_partial_first_and_offers_the_files_own(tmp_path, spec):
    torch.save(seeded(Net(num_classes=5), 2).state_dict(), tmp_path / "head.pth")
    r = _cli("load", tmp_path / "head.pth", "--model", spec, "--model-arg", "num_classes=3")
    assert r.exit_code == 1
    assert r.output.splitlines()[-3:] == [
        "  suggestions:",
        "    pass partial=True (on the command line: --partial) to keep these layers at their init",
        "    or, to load the file's own layers, build the model with num_classes=5: pass model_kwargs="
        "{'num_classes': 5} (on the command line: --model-arg num_classes=5)",
    ]


def test_no_argument_is_advised_unless_building_with_it_fits(tmp_path):
    # the head has 5 rows, but the factory takes no argument that makes it so: partial=True stays
    def fixed() -> nn.Module:
        return Net(num_classes=7)

    torch.save(seeded(Net(num_classes=5), 3).state_dict(), tmp_path / "head.pth")
    with pytest.raises(LoadError) as e:
        ckptfit.build(fixed, tmp_path / "head.pth")
    assert e.value.hint == "pass partial=True (on the command line: --partial) to keep these layers at their init"


# -- MoCo, inserted layers ---------------------------------------------------------------------

def test_moco_advice_leads_to_a_load_never_to_an_empty_partial_one(tmp_path, spec):
    path = _moco(tmp_path)
    r = _cli("load", path, "--model", spec)
    assert r.exit_code == 1
    advice = r.output.split("\n  suggestion", 1)[1]
    assert "partial" not in advice
    assert ("ambiguous names, nothing loaded through them: strip 'module.encoder_q.'; strip "
            "'module.encoder_k.' fit equally well; to choose one, pass e.g. rename=[(r'^module\\.encoder_q\\.', '')] "
            "(on the command line: --rename '^module\\.encoder_q\\.=>')") in advice
    assert "layer1.0.conv1" not in advice  # no rename module by module: choosing the encoder settles them all
    # followed: the projection head is not the classifier, so the next refusal says so, and advises --partial
    r2 = _cli("load", path, "--model", spec, "--rename", "^module\\.encoder_q\\.=>")
    assert r2.exit_code == 1 and "missing (2): fc.{weight,bias} — not in the checkpoint" in r2.output
    assert r2.output.splitlines()[-1].startswith("  suggestion: pass partial=True (on the command line: --partial)")
    out = tmp_path / "linear_eval.safetensors"
    r3 = _cli("load", path, "--model", spec, "--rename", "^module\\.encoder_q\\.=>", "--partial", "--save", out)
    assert r3.exit_code == 0, r3.output
    q = torch.load(path, weights_only=True)["state_dict"]
    with ckptfit.open(out) as saved:
        got = {k: t.load() for k, t in saved.tensors()}
    for k in Net().state_dict():
        if not k.startswith("fc."):
            assert torch.equal(got[k], q[f"module.encoder_q.{k}"]), k


def test_partial_is_not_advised_when_it_would_load_nothing(tmp_path):
    torch.save(seeded(AlphaBeta(), 4).state_dict(), tmp_path / "ab.pth")
    with pytest.raises(LoadError) as e:
        ckptfit.load(Net(), tmp_path / "ab.pth")
    assert not any("partial=True" in s for s in e.value.plan.suggestions)
    assert e.value.hint.startswith("check that this is the right file for this model: `ckptfit identify ")


def test_an_inserted_layer_is_advised_partial_and_no_rename_onto_one_name(tmp_path):
    torch.save(seeded(Net(), 5).state_dict(), tmp_path / "net.pth")
    with pytest.raises(LoadError) as e:
        ckptfit.load(NetPlus(), tmp_path / "net.pth")
    assert e.value.plan.suggestions == (
        "pass partial=True (on the command line: --partial) to keep the missing tensors at their init",)


def test_structural_suggestions_never_send_two_modules_onto_one():
    from ckptfit.matching import match
    from ckptfit.plans import TensorSpec

    # two checkpoint blocks with the roles and shapes of one model block, under names that say nothing
    src = [TensorSpec(f"{m}.{r}", s, torch.float32) for m in ("p", "q") for r, s in (("weight", (4, 4)), ("bias", (4,)))]
    dst = [TensorSpec(f"conv0.{r}", s, torch.float32) for r, s in (("weight", (4, 4)), ("bias", (4,)))]
    advice = " ".join(match(dst, src).suggestions)
    assert advice.count("'conv0.')") <= 1, advice


# -- refusals read once --------------------------------------------------------------------------

def _refusal(model: nn.Module, source, **options) -> LoadError:
    with pytest.raises(LoadError) as e:
        ckptfit.load(model, source, **options)
    return e.value


def test_every_refusal_kind_reads_once_and_carries_a_hint(tmp_path):
    kinds = {
        "shape": _refusal(Net(num_classes=3), seeded(Net(num_classes=5), 0).state_dict()),
        "missing": _refusal(NetPlus(), seeded(Net(), 0).state_dict()),
        "structural": _refusal(AlphaBeta(), seeded(FirstSecond(), 0).state_dict()),
        "dtype": _refusal(Counter(), {**Counter().state_dict(), "steps": torch.arange(3)}),
        "two state dicts": _refusal(Net(), _two_models(tmp_path)),
        "prefix": _refusal(Net(), _moco(tmp_path)),
        "nothing": _refusal(Net(), seeded(AlphaBeta(), 0).state_dict()),
    }
    for kind, e in kinds.items():
        text = str(e)
        assert e.hint, kind
        assert text.startswith("Refused: would load ") and text.count("Refused") == 1, (kind, text)
        assert "; the model was not changed" in text.splitlines()[0], (kind, text)
        last = text.splitlines()[-1]
        assert last.startswith(("  suggestion: ", "    ")), (kind, text)
        assert e.hint.splitlines()[-1] in last, (kind, text)
        # each problem once: a problem a section shows is not listed again under "problems"
        for p in e.problems:
            key = p.split(": ", 1)[0]
            assert text.count(f"{key}: ") <= 1, (kind, key, text)
    # the shapes are printed once
    shape = str(kinds["shape"])
    assert shape.count("[5, 8]") == 1 and shape.count("[3, 8]") == 1, shape


def test_a_load_error_without_a_hint_gets_one():
    e = LoadError("the optimizer state cannot be restored", path="last.ckpt")
    assert e.hint and str(e).endswith(f"  suggestion: {e.hint}")


# -- ties count as loaded ------------------------------------------------------------------------

def test_a_tied_load_reads_all_loaded_with_the_tie_counted(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    src = seeded(Tied(), 6)
    torch.save(src.state_dict(), tmp_path / "tied.pth")
    report = ckptfit.load(Tied(), tmp_path / "tied.pth")
    assert str(report).splitlines()[0].startswith("Loaded 4/4 tensors (1 tied) from ")
    assert report.num_loaded == 4 and report.num_tied == 1 and len(report.loaded) == 3
    r = _cli("load", tmp_path / "tied.pth", "--model", f"{MODULE}:Tied", "--json")
    assert r.exit_code == 0, r.output
    counts = json.loads(r.stdout)["report"]["counts"]
    assert counts["targets"] == 4 and counts["loaded"] == 4 and counts["tied"] == 1
