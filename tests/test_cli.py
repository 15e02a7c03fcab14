"""The CLI driven through click's runner: exit codes, stdout vs stderr, text and JSON."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

from ckptfit.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    sd = m.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 5}, d / "dp.pth")
    torch.save(sd, d / "plain.pth")
    sd2 = {k: (v + 1 if k == "fc.bias" else v) for k, v in sd.items()}
    torch.save(sd2, d / "changed.pth")
    (d / "page.pth").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_text_and_json(files):
    r = run("inspect", files / "dp.pth")
    assert r.exit_code == 0, r.output
    assert "torch-zip" in r.output and "state_dict" in r.output
    assert "layer{1..4}" in r.output  # repeated layers folded
    r = run("inspect", files / "dp.pth", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["format"] == "torch-zip" and d["num_tensors"] == 122
    assert d["state_dicts"][0]["name"] == "state_dict" and d["safety"]["verdict"] == "safe"
    assert d["metadata"]["epoch"] == 5


def test_inspect_error_is_one_line_on_stderr_exit_1(files):
    r = CliRunner().invoke(main, ["inspect", str(files / "page.pth")])
    assert r.exit_code == 1
    assert "HTML" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["inspect", str(files / "page.pth"), "--debug"])
    assert r.exit_code != 0 and r.exception is not None


def test_load_with_model_spec_and_verify(files, tmp_path):
    out = tmp_path / "fixed.safetensors"
    r = run("load", files / "dp.pth", "--model", "torchvision:resnet18", "--verify", "--save", out)
    assert r.exit_code == 0, r.output
    assert "Loaded 122/122" in r.output and "strip 'module.'" in r.output
    assert "verify:" in r.output and "ok" in r.output
    from safetensors.torch import load_file

    assert "conv1.weight" in load_file(str(out))


def test_load_json(files):
    r = run("load", files / "plain.pth", "--model", "torchvision:resnet18", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["report"]["counts"]["loaded"] == 122


def test_plan_exit_code_reflects_problems(files):
    r = run("plan", files / "plain.pth", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10")
    assert r.exit_code == 1
    assert "fc.weight" in r.output and "partial=True" in r.output
    r = run("plan", files / "plain.pth", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10",
            "--partial")
    assert r.exit_code == 0, r.output


def test_diff_checkpoints_and_spec(files):
    r = run("diff", files / "plain.pth", files / "changed.pth")
    assert r.exit_code == 0, r.output
    assert "fc.bias" in r.output and "1 differ" in r.output
    r = run("diff", files / "dp.pth", files / "plain.pth", "--json")
    d = json.loads(r.output)
    assert len(d["renamed"]) == 0 or all(x["a"].startswith("module.") for x in d["renamed"])
    r = run("diff", files / "plain.pth", "torchvision:resnet18", "--model-arg", "num_classes=10")
    assert r.exit_code == 0, r.output
    assert "shape fc.weight: [1000, 512] -> [10, 512]" in r.output
