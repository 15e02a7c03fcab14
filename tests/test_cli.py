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
    assert r.exit_code == 7, r.output  # they differ
    assert "fc.bias" in r.output and "1 differ" in r.output
    r = run("diff", files / "dp.pth", files / "plain.pth", "--json")
    d = json.loads(r.output)
    assert r.exit_code == 7 and len(d["renamed"]) == 122 and all(x["a"] == "module." + x["b"] for x in d["renamed"])
    r = run("diff", files / "plain.pth", "torchvision:resnet18", "--model-arg", "num_classes=10")
    assert r.exit_code == 7, r.output
    assert "shape fc.weight: [1000, 512] -> [10, 512]" in r.output


# ---- review regressions: wording, errors and exit codes ----------------------------------------

def test_inspect_modules_listed_below_a_shared_prefix(files):
    r = run("inspect", files / "dp.pth")
    assert r.exit_code == 0, r.output
    rows = [ln.split()[0] for ln in r.output.splitlines() if ln.startswith("module.layer") and "  " in ln]
    assert "module.layer1" in rows  # not one row "module" holding all 122 tensors


def test_inspect_without_tensors_and_a_single_tensor(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "meta.pth")
    r = run("inspect", tmp_path / "meta.pth")
    assert r.exit_code == 0, r.output
    assert "0 tensors (0 B)" in r.output and "tensors: none" in r.output and "shape" not in r.output
    torch.save(torch.zeros(3), tmp_path / "one.pth")
    r = run("inspect", tmp_path / "one.pth")
    assert r.exit_code == 0, r.output
    assert "1 tensor (12 B)" in r.output and "(root)" in r.output


def test_inspect_long_metadata_stays_on_one_line(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "loops": {f"key{i}": list(range(20)) for i in range(20)}},
               tmp_path / "loops.pth")
    r = run("inspect", tmp_path / "loops.pth")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("  loops: "))
    assert line.endswith("…")
    following = r.output.splitlines()[r.output.splitlines().index(line) + 1]
    assert following.startswith(("state dicts:", "  ", "modules", "tensors"))  # no wrapped tail


def test_diff_folds_shape_changes_and_counts_in_singular(tmp_path):
    a = {"conv.weight": torch.zeros(4, 3, 3, 3), **{f"bn.{n}": torch.zeros(4) for n in ("weight", "bias")}}
    b = {"conv.weight": torch.zeros(8, 3, 3, 3), **{f"bn.{n}": torch.zeros(8) for n in ("weight", "bias")},
         "extra": torch.zeros(1)}
    torch.save(a, tmp_path / "a.pth")
    torch.save({**b, "conv.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "b.pth")
    torch.save(b, tmp_path / "c.pth")
    r = run("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--no-values")
    assert r.exit_code == 7, r.output
    assert "1 tensor in both" in r.output
    assert "  shape bn.{weight,bias}: [4] -> [8]" in r.output
    r = run("diff", tmp_path / "a.pth", tmp_path / "c.pth")
    assert "0 tensors in both" in r.output and "values:" not in r.output  # nothing to compare


def test_scan_error_names_the_file(tmp_path):
    torch.save({"w": torch.zeros(100)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    r = CliRunner().invoke(main, ["scan", str(tmp_path / "cut.pth")])
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: {tmp_path / 'cut.pth'}: ") and "truncated" in r.stderr


def test_model_spec_mistakes_are_one_error_line(files):
    r = run("load", files / "plain.pth", "--model", "timm:no_such_model")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error: timm has no model 'no_such_model'" in r.stderr
    r = run("load", files / "plain.pth", "--model", "torchvision:resnet18", "--model-arg", "bogus=3")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("error: cannot build torchvision:resnet18(bogus=3): ")
    assert "unexpected keyword argument 'bogus'" in r.stderr and "TypeError" not in r.stderr


def test_load_device_is_checked_before_building(files):
    r = run("load", files / "plain.pth", "--model", "torchvision:resnet18", "--device", "gpu")
    assert r.exit_code == 2 and "unknown device 'gpu'" in r.output
    if not torch.cuda.is_available():
        r = run("load", files / "plain.pth", "--model", "torchvision:resnet18", "--device", "cuda:0")
        assert r.exit_code == 2 and "CUDA is not available" in r.output and "NVIDIA driver" not in r.output


def test_failed_verify_exits_1_and_does_not_save(tmp_path):
    torch.save({"weight": torch.full((2, 4), float("nan")), "bias": torch.zeros(2)}, tmp_path / "nan.pth")
    out = tmp_path / "nan.safetensors"
    r = run("load", tmp_path / "nan.pth", "--model", "torch.nn:Linear", "--model-arg", "in_features=4",
            "--model-arg", "out_features=2", "--verify", "--save", out)
    assert r.exit_code == 1, r.output
    assert "2 NaN/Inf values in the output" in r.stdout
    assert r.stderr.startswith("error: verify failed: ") and "not saved" in r.stderr and not out.exists()
    torch.save(torch.nn.Bilinear(4, 4, 2).state_dict(), tmp_path / "bil.pth")  # no input can be inferred
    r = run("load", tmp_path / "bil.pth", "--model", "torch.nn:Bilinear", "--model-arg", "in1_features=4",
            "--model-arg", "in2_features=4", "--model-arg", "out_features=2", "--verify")
    assert r.exit_code == 0 and "verify: not run: cannot infer an input for Bilinear" in r.stdout  # the load stands
    assert "warning: verify not run: cannot infer an input for Bilinear" in r.stderr and "Traceback" not in r.output


def test_python_dash_m_ckptfit_is_the_cli() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ckptfit", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "version" in r.stdout, r.stderr
