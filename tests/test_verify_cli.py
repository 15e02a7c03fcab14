"""``ckptfit verify`` and ``ckptfit load --verify --input-shape / --reference`` through click's runner."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn

from ckptfit.cli import main

SPEC = f"{Path(__file__).stem}:LeNet"


class LeNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def trained() -> LeNet:
    """A LeNet whose values no init draws (heavy-tailed, as training leaves them)."""
    torch.manual_seed(3)
    m = LeNet()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.05 * torch.distributions.StudentT(3.0).sample(p.shape) + 0.002)
    return m


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_load_verify_infers_28x28_and_takes_input_shape(tmp_path) -> None:
    torch.save(trained().state_dict(), tmp_path / "lenet.pt")
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify")
    assert r.exit_code == 0, r.output
    assert "verify: input [1, 1, 28, 28] (inferred from Conv2d(in_channels=1), after [1, 1, 224, 224], " \
           "[1, 1, 32, 32] failed) -> output [1, 10]: ok" in r.stdout
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify", "--input-shape", "4,1,28,28")
    assert r.exit_code == 0 and "verify: input [4, 1, 28, 28] -> output [4, 10]: ok" in r.stdout
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify", "--input-shape", "1,1,32,32")
    assert r.exit_code == 1 and r.stderr.startswith("error: verify failed: RuntimeError: mat1 and mat2 shapes")
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify", "--input-shape", "1,a")
    assert r.exit_code == 2 and "not a list of positive integers" in r.output


def test_load_verify_against_a_reference(tmp_path) -> None:
    torch.save(trained().state_dict(), tmp_path / "lenet.pt")
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify", "--reference", SPEC)
    assert r.exit_code == 0, r.output
    assert "reference: match: max abs diff 0 over 1 output (atol 1e-05, rtol 0.0001)" in r.stdout
    other = trained()
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    r = run("load", tmp_path / "lenet.pt", "--model", SPEC, "--verify", "--reference", SPEC,
            "--reference-ckpt", tmp_path / "other.pt", "--save", tmp_path / "out.safetensors")
    assert r.exit_code == 1 and "reference: DIFFER: max abs diff 0.5 over 1 output" in r.stdout
    assert r.stderr.startswith("error: verify failed: the outputs differ from the reference; not saved")
    assert not (tmp_path / "out.safetensors").exists()


def test_verify_command_flags_untrained_tensors(tmp_path) -> None:
    torch.save(trained().state_dict(), tmp_path / "lenet.pt")
    r = run("verify", SPEC, tmp_path / "lenet.pt")
    assert r.exit_code == 0, r.output
    assert "Loaded 6/6 tensors" in r.stdout and "at init: none of 6 tensors looks like a fresh init" in r.stdout
    partial = {k: v for k, v in trained().state_dict().items() if not k.startswith("fc.")}
    torch.save(partial, tmp_path / "nohead.pt")  # the head stays at its init
    r = run("verify", SPEC, tmp_path / "nohead.pt", "--partial")
    assert r.exit_code == 1, r.output
    assert "at init: 1 of 6 tensors look like a fresh init, not trained; 3 too small to tell:" in r.stdout
    assert "  PyTorch default init (1, high, p >= " in r.stdout and "fc.weight: Linear default U(±1/√fan_in)" \
        in r.stdout
    assert r.stderr.startswith("error: verify failed: 1 tensors look like a fresh init (not trained)")


def test_verify_command_without_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)  # seed 0 draws an fc.weight with unusually unequal columns (p=5e-4): not flagged
    r = run("verify", SPEC, "--no-forward", "--json")
    assert r.exit_code == 1
    import json

    d = json.loads(r.stdout)
    assert [f["name"] for f in d["verify"]["untrained"]["flagged"]] == ["conv1.weight", "conv2.weight",
                                                                       "conv2.bias", "fc.weight"]
    assert d["verify"]["input_shape"] is None
    r = run("verify", f"{Path(__file__).stem}:trained")
    assert r.exit_code == 0 and "-> output [1, 10]: ok" in r.stdout
