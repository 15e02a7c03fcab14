"""LitEma copies (latent-diffusion, Stable Diffusion v1 .ckpt): dotless names mapped back with use='ema'."""
import pytest
import torch
from torch import nn

import ckptfit
from ckptfit.conversion import convert


class LitEma(nn.Module):
    """As in latent-diffusion's ldm/modules/ema.py: one buffer per parameter, named without its dots."""

    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int) if use_num_upates
                             else torch.tensor(-1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name.update({name: s_name})
                self.register_buffer(s_name, p.clone().detach().data)

    def forward(self, model):  # one EMA step, as LitEma does
        with torch.no_grad():
            for key, p in model.named_parameters():
                self._buffers[self.m_name2s_name[key]].sub_(0.5 * (self._buffers[self.m_name2s_name[key]] - p))


class UNet(nn.Module):
    def __init__(self, blocks=2):
        super().__init__()
        self.input_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU())
                                          for _ in range(blocks))
        self.out = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        for b in self.input_blocks:
            x = b(x)
        return self.out(x)


class DiffusionWrapper(nn.Module):
    def __init__(self, blocks=2):
        super().__init__()
        self.diffusion_model = UNet(blocks)

    def forward(self, x):
        return self.diffusion_model(x)


class LatentDiffusion(nn.Module):
    def __init__(self, blocks=2):
        super().__init__()
        self.model = DiffusionWrapper(blocks)
        self.model_ema = LitEma(self.model)

    def forward(self, x):
        return self.model(x)


def _train_and_save(path, blocks=2):
    torch.manual_seed(0)
    ld = LatentDiffusion(blocks)
    for p in ld.model.parameters():  # the live weights move on; the EMA copy differs from them
        p.data.add_(torch.randn_like(p))
    ld.model_ema(ld.model)
    torch.save({"state_dict": ld.state_dict(), "global_step": 7}, path)
    return ld


def test_litema_names_are_mapped_back_with_use_ema(tmp_path):
    path = tmp_path / "last.ckpt"
    ld = _train_and_save(path)
    assert "model_ema.diffusion_modelinput_blocks00weight" in ld.state_dict()
    unet = UNet()
    report = ckptfit.load(unet, path, use="ema")
    assert report.complete
    for name, p in unet.named_parameters():
        want = ld.model_ema._buffers["diffusion_model" + name.replace(".", "")]
        assert torch.equal(p, want), name
        assert not torch.equal(p, ld.model.diffusion_model.get_parameter(name))
    assert report.container_reason == ("use='ema': the tensors under 'model_ema.' inside 'state_dict'; LitEma's "
                                       "dotless names mapped back onto the 8 dotted names under 'model.' (its decay, "
                                       "num_updates left out)")
    # the full wrapper too, and the model's own weights without use=
    wrapper = DiffusionWrapper()
    ckptfit.load(wrapper, path, use="ema")
    assert torch.equal(wrapper.diffusion_model.out[1].weight, ld.model_ema._buffers["diffusion_modelout1weight"])
    ckptfit.load(wrapper, path)
    assert torch.equal(wrapper.diffusion_model.out[1].weight, ld.model.diffusion_model.out[1].weight)


class Clash(nn.Module):
    """'a.10.weight' and 'a1.0.weight' both lose their dots to 'a10weight'."""

    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(2, 2) for _ in range(11))
        self.a1 = nn.ModuleList([nn.Linear(2, 2)])


class ClashDiffusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Clash()
        self.model_ema = LitEma(self.model)  # LitEma itself keeps one buffer for the two


def test_litema_names_that_collide_are_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.manual_seed(0)
    torch.save({"state_dict": ClashDiffusion().state_dict()}, path)
    model = Clash()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.CheckpointError, match=r"use='ema': the EMA copy under 'model_ema\.' stores names "
                       r"with the dots removed \(LitEma\), and 2 of them cannot be mapped back: "
                       r"'model_ema\.a10weight' could be 'model\.a\.10\.weight' and 'model\.a1\.0\.weight'; "
                       r"nothing is guessed") as e:
        ckptfit.load(model, path, use="ema")
    assert "leave use= out" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ckptfit.load(model, path).complete  # the model's own weights still load


def test_convert_use_ema_writes_dotted_names(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "last.ckpt"
    ld = _train_and_save(path)
    out = tmp_path / "ema.safetensors"
    convert(path, out, use="ema")
    sd = load_file(out)
    assert set(sd) == {"diffusion_model." + k for k in UNet().state_dict()}
    assert torch.equal(sd["diffusion_model.input_blocks.1.0.bias"], ld.model_ema._buffers["diffusion_modelinput_blocks10bias"])
