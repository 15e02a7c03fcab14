"""``ckptfit diff --use / --use-a / --use-b`` and ``ckptfit.diff(use=, use_a=, use_b=)``: the state dict in each
file chosen as load chooses it; a file with two complete state dicts is refused with advice in diff's own spelling."""
from __future__ import annotations

import json
import shlex

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
        self.fc = nn.Linear(4, 5)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Small().state_dict()


@pytest.fixture
def files(tmp_path):
    student, teacher = _weights(1), _weights(2)
    torch.save({"epoch": 100, "student": student, "teacher": teacher}, tmp_path / "dino.pth")
    torch.save({"epoch": 101, "student": student, "teacher": {k: v + 1 for k, v in teacher.items()}},
               tmp_path / "dino2.pth")
    torch.save({"model": student, "model_ema": teacher}, tmp_path / "ema.pth")
    torch.save(teacher, tmp_path / "teacher.pth")
    return tmp_path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_python_diff_refuses_two_state_dicts_and_use_picks(files):
    with pytest.raises(ckptfit.CheckpointError) as e:
        ckptfit.diff(str(files / "dino.pth"), str(files / "teacher.pth"))
    assert "2 complete, equally plausible state dicts: 'student' (4 tensors), 'teacher' (4 tensors)" in str(e.value)
    assert e.value.hint == ("choose one: use_a='student' (CLI: --use-a student) or use_a='teacher' (CLI: --use-a "
                            "teacher); use= (CLI: --use NAME) picks the same name in both files")
    same = ckptfit.diff(str(files / "dino.pth"), str(files / "teacher.pth"), use_a="teacher")
    assert same.identical and same.common == 4
    other = ckptfit.diff(str(files / "dino.pth"), str(files / "teacher.pth"), use_a="student")
    assert not other.identical and set(other.max_abs_diff) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    both = ckptfit.diff(str(files / "dino.pth"), str(files / "dino2.pth"), use="student")
    assert both.identical
    one_file = ckptfit.diff(str(files / "dino.pth"), str(files / "dino.pth"), use_a="student", use_b="teacher")
    assert not one_file.identical and one_file.common == 4


def test_use_for_b_and_ema(files):
    with pytest.raises(ckptfit.CheckpointError) as e:
        ckptfit.diff(str(files / "teacher.pth"), str(files / "dino2.pth"))
    assert "use_b='student' (CLI: --use-b student)" in e.value.hint
    assert ckptfit.diff(str(files / "ema.pth"), str(files / "teacher.pth"), use_a="ema").identical
    with pytest.raises(ckptfit.CheckpointError, match="use=.ema. matches no state dict in the file"):
        ckptfit.diff(str(files / "ema.pth"), str(files / "teacher.pth"), use="ema")  # use= is for both files
    assert not ckptfit.diff(str(files / "ema.pth"), str(files / "teacher.pth")).identical  # the model's own


def test_a_use_that_matches_nothing_and_bad_values(files):
    with pytest.raises(ckptfit.CheckpointError, match="use_a='nope' matches no state dict in the file") as e:
        ckptfit.diff(str(files / "dino.pth"), str(files / "teacher.pth"), use_a="nope")
    assert e.value.hint == "pass one of those names as use_a= (CLI: --use-a NAME)"
    with pytest.raises(TypeError, match="use_b= must be a state dict's name"):
        ckptfit.diff(str(files / "dino.pth"), str(files / "teacher.pth"), use_b=3)
    with pytest.raises(ValueError, match="use_b='ema' picks a state dict inside a checkpoint file, but B"):
        ckptfit.diff(str(files / "ema.pth"), "ckptfit.demo:SmallCNN", use_b="ema")


def test_cli_advice_followed_literally(files):
    r = _cli("diff", files / "dino.pth", files / "teacher.pth")
    assert r.exit_code == 1
    assert "2 complete, equally plausible state dicts" in r.output and "--use-a teacher" in r.output
    advised = next(line for line in r.output.splitlines() if "choose one:" in line)
    # take the CLI spelling of the second choice, exactly as printed: "(CLI: --use-a teacher)"
    option = advised.split("(CLI: ")[2].split(")")[0]
    r = _cli("diff", files / "dino.pth", files / "teacher.pth", *shlex.split(option))
    assert r.exit_code == 0, r.output
    r = _cli("diff", files / "dino.pth", files / "dino.pth", "--use-a", "student", "--use-b", "teacher", "--json")
    assert r.exit_code == 7
    assert json.loads(r.stdout)["common"] == 4
    r = _cli("diff", files / "dino.pth", files / "dino2.pth", "--use", "student")
    assert r.exit_code == 0, r.output
    r = _cli("diff", files / "dino.pth", files / "dino2.pth", "--use", "teacher", "--no-values")
    assert r.exit_code == 0, r.output  # same names, shapes and dtypes; values not compared
    r = _cli("diff", files / "ema.pth", "ckptfit.demo:SmallCNN", "--use-b", "ema")
    assert r.exit_code == 2 and "leave --use-b out" in r.output
