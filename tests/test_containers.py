"""Choosing the state dict inside a file: one chooser for load, plan and convert; ambiguity refused.

A file with two complete, equally plausible state dicts (DINO's ``{"student", "teacher"}``)
is refused, naming both and the ``use=`` that picks one; the model's own weights beside an
EMA copy keep their rule (the model's own by default, ``use="ema"`` for the copy); ``use=``
takes any container key path, dotted or with slashes, and a key prefix inside a state dict.
"""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ckptfit
from ckptfit.cli import main


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = Small()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return m.state_dict()


def _equal(model: nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in sd.items())


@pytest.fixture
def dino(tmp_path):
    student, teacher = _weights(1), _weights(2)
    path = tmp_path / "dino.pth"
    torch.save({"epoch": 100, "student": student, "teacher": teacher}, path)
    return path, student, teacher


def test_two_complete_state_dicts_are_refused_naming_both_and_use(dino):
    path, _, _ = dino
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path)
    text = str(e.value)
    assert "2 complete, equally plausible state dicts: 'student' (9 tensors), 'teacher' (9 tensors)" in text
    assert "use='teacher' (CLI: --use teacher)" in text and "use='student' (CLI: --use student)" in text
    assert _equal(model, before)
    plan = ckptfit.plan(model, path)
    assert not plan.ok and plan.suggestions[0].startswith("choose one: use='student'")


def test_use_picks_one_of_them_by_key_path(dino, tmp_path):
    path, student, teacher = dino
    model = Small()
    report = ckptfit.load(model, path, use="teacher")
    assert _equal(model, teacher) and report.container == "teacher"
    nested = tmp_path / "nested.pth"
    torch.save({"checkpoint": {"student": student, "teacher": teacher}, "epoch": 3}, nested)
    for use in ("checkpoint.student", "checkpoint/student", "/checkpoint/student/"):
        model = Small()
        ckptfit.load(model, nested, use=use)
        assert _equal(model, student), use


def test_convert_and_state_dict_refuse_the_same_ambiguity(dino, tmp_path):
    from ckptfit.conversion import convert

    path, _, teacher = dino
    with pytest.raises(ckptfit.CheckpointError, match="equally plausible") as e:
        convert(path, tmp_path / "out.safetensors")
    assert "--use teacher" in e.value.hint
    convert(path, tmp_path / "teacher.safetensors", use="teacher")
    model = Small()
    ckptfit.load(model, tmp_path / "teacher.safetensors")
    assert _equal(model, teacher)
    with pytest.raises(ckptfit.CheckpointError, match="equally plausible"):
        ckptfit.open(path).state_dict()


def test_model_and_its_ema_copy_are_not_ambiguous(tmp_path):
    model_sd, ema_sd = _weights(1), _weights(2)
    path = tmp_path / "ema.pth"
    torch.save({"model": model_sd, "model_ema": ema_sd}, path)
    model = Small()
    report = ckptfit.load(model, path)
    assert _equal(model, model_sd) and report.container == "model"
    ckptfit.load(model, path, use="ema")
    assert _equal(model, ema_sd)


def test_one_state_dict_saved_under_two_names_is_not_ambiguous(tmp_path):
    sd = _weights(1)
    path = tmp_path / "twice.pth"
    torch.save({"state_dict": sd, "model": sd}, path)
    model = Small()
    ckptfit.load(model, path)
    assert _equal(model, sd)


def test_a_state_dict_that_does_not_fit_is_no_rival(tmp_path):
    # a GAN: the generator fits the model, the discriminator does not
    path = tmp_path / "gan.pth"
    disc = {"body.weight": torch.randn(2, 2)}
    torch.save({"generator": _weights(1), "discriminator": disc}, path)
    model = Small()
    ckptfit.load(model, path)
    assert _equal(model, _weights(1))


def test_lightning_ema_prefix_is_found_by_load_convert_and_state_dict_alike(tmp_path):
    from ckptfit.conversion import convert

    model_sd, ema_sd = _weights(1), _weights(2)
    sd = {**{"model." + k: v for k, v in model_sd.items()}, **{"model_ema." + k: v for k, v in ema_sd.items()}}
    path = tmp_path / "lit.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    ckpt = ckptfit.open(path)
    for use in ("ema", "model_ema", "state_dict.model_ema", "state_dict/model_ema"):
        cand = ckpt.state_dict(use)
        assert cand.name == "state_dict.model_ema" and cand.kind == "ema", use
        assert set(cand.tensors) == set(ema_sd)
    convert(path, tmp_path / "ema.safetensors", use="ema")
    model = Small()
    ckptfit.load(model, tmp_path / "ema.safetensors")
    assert _equal(model, ema_sd)
    model = Small()
    report = ckptfit.load(model, path, use="ema")
    assert _equal(model, ema_sd)
    assert report.container_reason == "use='ema': the tensors under 'model_ema.' inside 'state_dict'"


def test_use_that_matches_nothing_lists_what_there_is(dino):
    path, _, _ = dino
    with pytest.raises(ckptfit.CheckpointError, match=r"use='ema' matches no state dict in the file; it has: "
                                                      r"'student', 'teacher'"):
        ckptfit.load(Small(), path, use="ema")
    with pytest.raises(TypeError, match="key path such as 'model.ema'"):
        ckptfit.load(Small(), path, use=3)


def test_cli_says_which_use_to_pass(dino):
    path, _, teacher = dino
    runner = CliRunner()
    r = runner.invoke(main, ["load", str(path), "--model", f"{__name__}:Small"])
    assert r.exit_code == 1
    assert "--use teacher" in r.stderr + r.stdout
    r = runner.invoke(main, ["plan", str(path), "--model", f"{__name__}:Small", "--use", "teacher"])
    assert r.exit_code == 0, r.output
    assert "container 'teacher'" in r.stdout
