"""adapt='in_chans': an RGB first convolution into other input channels, as timm's adapt_input_conv, only when asked."""
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

import ckptfit


def _rgb_file(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=5, pretrained=False).eval()
    path = tmp_path / "rgb.safetensors"
    save_file(src.state_dict(), path)
    return src, path


@pytest.mark.parametrize("in_chans", [1, 2, 4, 7])
def test_rgb_stem_into_other_in_chans_as_timm_does(tmp_path, in_chans):
    src, path = _rgb_file(tmp_path)
    model = timm.create_model("resnet18", num_classes=5, in_chans=in_chans, pretrained=False).eval()
    report = ckptfit.load(model, path, adapt="in_chans")
    want = adapt_input_conv(in_chans, src.conv1.weight.detach().clone())
    assert torch.equal(model.conv1.weight, want)
    for k, v in src.state_dict().items():  # every other tensor as stored
        if k != "conv1.weight":
            assert torch.equal(model.state_dict()[k], v), k
    line = next(x for x in str(report).splitlines() if x.startswith("  adapt:"))
    assert line.startswith("  adapt: conv1.weight — adapt='in_chans', as timm's adapt_input_conv")
    d = next(d for d in report.loaded if d.target == "conv1.weight")
    assert d.transform.kind == "adapt" and d.transform.detail.startswith(f"input channels 3 -> {in_chans}")


def test_grey_input_gives_what_the_rgb_model_gave_for_grey_rgb(tmp_path):
    src, path = _rgb_file(tmp_path)
    model = timm.create_model("resnet18", num_classes=5, in_chans=1, pretrained=False).eval()
    ckptfit.load(model, path, adapt="in_chans")
    g = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(g), src(g.expand(-1, 3, -1, -1)), atol=1e-4)


def test_not_adapted_unless_asked_and_the_refusal_says_how(tmp_path):
    _, path = _rgb_file(tmp_path)
    model = timm.create_model("resnet18", num_classes=5, in_chans=1, pretrained=False)
    before = model.conv1.weight.detach().clone()
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path)
    assert ("if the model takes 1-channel input where the file's was RGB, pass adapt='in_chans' (CLI: --adapt "
            "in_chans) to load 'conv1.weight' adapted as timm's adapt_input_conv does") in str(e.value)
    assert torch.equal(model.conv1.weight, before)


def test_adapt_refuses_more_than_one_convolution_and_bad_values(tmp_path):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3))
    b = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(1, 4, 3))
    with pytest.raises(ckptfit.LoadError, match=r"adapt='in_chans': 2 convolutions differ from the file in their "
                                                r"input channels \('0.weight', '1.weight'\); only one first "
                                                r"convolution is adapted, nothing is guessed"):
        ckptfit.load(b, a.state_dict(), adapt="in_chans")
    with pytest.raises(ValueError, match=r"adapt='out_chans' is not an adaptation ckptfit makes; use "
                                         r"adapt='in_chans'"):
        ckptfit.load(b, a.state_dict(), adapt="out_chans")


def test_cli_adapt(tmp_path):
    _, path = _rgb_file(tmp_path)
    out = tmp_path / "grey.safetensors"
    args = [sys.executable, "-m", "ckptfit", "load", str(path), "--model", "timm:resnet18", "--model-arg",
            "num_classes=5", "--model-arg", "in_chans=1"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "--adapt in_chans" in r.stdout + r.stderr
    r = subprocess.run(args + ["--adapt", "in_chans", "--save", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "adapt: conv1.weight" in r.stdout
    from safetensors.torch import load_file

    src = load_file(path)
    assert torch.equal(load_file(out)["conv1.weight"], src["conv1.weight"].sum(1, keepdim=True))
    r = subprocess.run(args + ["--adapt", "rgb"], capture_output=True, text=True)
    assert r.returncode == 2 and "--adapt 'rgb' is not an adaptation" in r.stderr
