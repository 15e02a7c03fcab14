"""Ports between implementations that name their weights differently: torchvision <-> transformers ResNet,
ViT between timm, torchvision and transformers. Exact (outputs within 1e-4) or refused, never wrong."""
import pytest
import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file

import ckptfit


def _tv_resnet():
    return torchvision.models.resnet18(num_classes=10)


def _hf_resnet(**kw):
    cfg = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                    layer_type="basic", num_labels=10, **kw)
    return transformers.ResNetForImageClassification(cfg)


def _trained(model):
    """Random weights and batch-norm statistics (so that running means and variances matter)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


def _same_function(a, b, x):
    ya, yb = _out(a, x), _out(b, x)
    assert ya.abs().max() > 0.01  # a real output, not zeros
    assert torch.allclose(ya, yb, atol=1e-4), (ya - yb).abs().max()


def test_torchvision_resnet18_into_transformers_resnet(tmp_path):
    src = _trained(_tv_resnet())
    save_file(src.state_dict(), tmp_path / "r18.safetensors")
    model = _hf_resnet().eval()
    with pytest.raises(ckptfit.LoadError, match="names do not settle") as e:  # names alone cannot tell
        ckptfit.load(model, tmp_path / "r18.safetensors")
    assert ("the implementation that wrote the file can tell them apart by its forward pass: pass "
            "source_model='identify' (CLI: --source-model identify) to have ckptfit find it from the file, or "
            "source_model= with its model SPEC or a zero-argument factory if you know it") in e.value.plan.suggestions
    followed = _hf_resnet().eval()  # the suggestion, followed literally
    ckptfit.load(followed, tmp_path / "r18.safetensors", source_model="identify")
    _same_function(followed, src, torch.randn(2, 3, 64, 64))
    report = ckptfit.load(model, tmp_path / "r18.safetensors", source_model=_tv_resnet)
    _same_function(model, src, torch.randn(2, 3, 64, 64))
    text = str(report)
    assert "Loaded 122/122 tensors" in text
    assert ("names: aligned through the source model _tv_resnet (source_model=): both forward passes run on the "
            "meta device (an input of shape [1, 3, 32, 32] for the source), tensors paired in the order they are "
            "first used, same layer type and shape") in text
    assert ("layer2.0.downsample.0.weight -> resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"
            in report.to_text(max_lines=100))


def test_identify_names_the_source_model(tmp_path):
    src = _trained(_tv_resnet())
    save_file(src.state_dict(), tmp_path / "r18.safetensors")
    model = _hf_resnet().eval()
    report = ckptfit.load(model, tmp_path / "r18.safetensors", source_model="identify")
    _same_function(model, src, torch.randn(2, 3, 32, 32))
    assert "source model torchvision.models.resnet18(num_classes=10) (identified from names and shapes" in str(report)


def test_transformers_resnet_folder_into_torchvision_needs_no_option(tmp_path):
    src = _trained(_hf_resnet())
    src.save_pretrained(tmp_path / "hf")
    model = _tv_resnet().eval()
    report = ckptfit.load(model, tmp_path / "hf")  # config.json says what wrote it
    _same_function(model, src, torch.randn(2, 3, 64, 64))
    assert "source model transformers.ResNetForImageClassification (recorded in config.json)" in str(report)
    built, _ = ckptfit.build(_tv_resnet, tmp_path / "hf")  # on the meta device, filled from the file
    _same_function(built.eval(), src, torch.randn(1, 3, 32, 32))


def test_a_different_network_is_refused(tmp_path):
    """transformers' ResNet with downsample_in_first_stage has one more shortcut: the forward passes part there."""
    src = _trained(_tv_resnet())
    model = _hf_resnet(downsample_in_first_stage=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError, match=r"source model _tv_resnet \(source_model=\): not aligned by forward "
                                                r"order: the forward passes part at 'layer1\.1\.conv1\.weight' "
                                                r"\(conv2d weight \[64, 64, 3, 3\]\) and 'resnet\.encoder\.stages\.0"
                                                r"\.layers\.0\.shortcut\.convolution\.weight' \(conv2d weight "
                                                r"\[64, 64, 1, 1\]\)"):
        ckptfit.load(model, src.state_dict(), source_model=_tv_resnet)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- ViT

def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10, pretrained=False)


def _tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=128, num_classes=10)


def _hf_vit(eps=1e-6):  # timm and torchvision use LayerNorm eps 1e-6; transformers' default is 1e-12
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        num_labels=10, layer_norm_eps=eps))


VITS = {"timm": _timm_vit, "torchvision": _tv_vit, "transformers": _hf_vit}


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("src_name,dst_name", [(a, b) for a in VITS for b in VITS if a != b])
def test_vit_between_implementations(src_name, dst_name):
    src = _random(VITS[src_name]())
    model = VITS[dst_name]().eval()
    with pytest.raises(ckptfit.LoadError):  # by names alone: refused
        ckptfit.load(model, src.state_dict())
    report = ckptfit.load(model, src.state_dict(), source_model=VITS[src_name])
    _same_function(model, src, torch.randn(3, 3, 32, 32))
    assert "aligned through the source model" in str(report)
    fused = [d.transform.kind for d in report.loaded if d.transform is not None]
    if {src_name, dst_name} == {"timm", "torchvision"}:
        assert fused == []  # qkv and in_proj_weight are both [q; k; v]: loaded as stored
    elif src_name == "transformers":
        assert fused == ["concat"] * 4  # q, k, v joined into one weight and one bias per block
    else:
        assert fused == ["split"] * 12


def test_vit_from_a_transformers_folder_and_the_split_names_the_files_keys(tmp_path):
    src = _random(_hf_vit())
    src.save_pretrained(tmp_path / "vit")
    model = _timm_vit().eval()
    report = ckptfit.load(model, tmp_path / "vit")
    _same_function(model, src, torch.randn(2, 3, 32, 32))
    d = next(d for d in report.loaded if d.target == "blocks.0.attn.qkv.weight")
    # the file keeps transformers' older names (save_pretrained writes them); the report names the file's keys
    assert d.transform.sources == tuple(f"vit.encoder.layer.0.attention.attention.{p}.weight"
                                        for p in ("query", "key", "value"))
    assert "'vit.encoder.layer.0.attention.attention.query.weight'" in d.transform.reason


def test_vit_layer_norm_eps_differs_refused():
    src = _random(_timm_vit())
    model = _hf_vit(eps=1e-12)
    with pytest.raises(ckptfit.LoadError, match=r"'vit\.layers\.0\.layernorm_before' has eps=1e-12 where the source "
                                                r"model's 'blocks\.0\.norm1' has eps=1e-06: the same weights would "
                                                r"compute another function"):
        ckptfit.load(model, src.state_dict(), source_model=_timm_vit)


def test_source_model_checked_early():
    with pytest.raises(ValueError, match=r"source_model=3: pass the implementation that wrote the file"):
        ckptfit.load(_tv_resnet(), {}, source_model=3)


# ---------------------------------------------------------------------------------- layer types

class _Square(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.a, self.b = layer(16, 16), layer(16, 16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _conv1d_square():
    from transformers.pytorch_utils import Conv1D

    return _Square(Conv1D)


def _linear_square():
    return _Square(torch.nn.Linear)


@pytest.mark.parametrize("source,transposed", [(_conv1d_square, False), (_linear_square, True)])
def test_the_source_models_layer_types_settle_square_conv1d_weights(tmp_path, source, transposed):
    """All weights square: the shapes cannot tell [in, out] from [out, in]; the source model's layer types can."""
    torch.manual_seed(0)
    src = _random(source())
    save_file(src.state_dict(), tmp_path / "square.safetensors")
    model = _conv1d_square().eval()
    with pytest.raises(ckptfit.LoadError, match="all 2 of them are square"):
        ckptfit.load(model, tmp_path / "square.safetensors")
    report = ckptfit.load(model, tmp_path / "square.safetensors", source_model=source)
    _same_function(model, src, torch.randn(4, 16))
    assert [d.transform.kind for d in report.loaded if d.transform is not None] == (["transpose"] * 2 if transposed
                                                                                    else [])
    label = "Conv1D" if not transposed else "nn.Linear"
    assert f"layer types from the source model {source.__name__} (source_model=): 2 {label} weights" in str(report)


def test_cli_source_model(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from ckptfit.cli import main

    src = _trained(_tv_resnet())
    save_file(src.state_dict(), tmp_path / "r18.safetensors")
    _hf_resnet().save_pretrained(tmp_path / "cfg")  # the --model hf: SPEC reads its config.json
    base = ["load", str(tmp_path / "r18.safetensors"), "--model", f"hf:{tmp_path / 'cfg'}"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 1
    out = tmp_path / "hf.safetensors"
    r = CliRunner().invoke(main, base + ["--source-model", "torchvision:resnet18", "--source-model-arg",
                                         "num_classes=10", "--save", str(out)])
    assert r.exit_code == 0, r.output
    assert "aligned through the source model torchvision:resnet18(num_classes=10)" in r.output
    saved = load_file(out)
    assert torch.equal(saved["resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"],
                       src.layer2[0].downsample[0].weight)
    r = CliRunner().invoke(main, base + ["--source-model", "resnet18"])
    assert r.exit_code == 2 and "a model SPEC" in r.output


# ---------------------------------------------------------------------------------- ConvNeXt

def _timm_convnext(conv_mlp=False):
    return timm.create_model("convnext_atto", dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_classes=10,
                             pretrained=False, conv_mlp=conv_mlp)


def _hf_convnext(eps=1e-6):  # timm's head norm has eps 1e-6; ConvNextConfig's layer_norm_eps defaults to 1e-12
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=10, layer_norm_eps=eps))


@pytest.mark.parametrize("src_fn,dst_fn", [(_timm_convnext, _hf_convnext), (_hf_convnext, _timm_convnext)])
def test_convnext_timm_and_transformers(src_fn, dst_fn):
    src = _random(src_fn())
    model = dst_fn().eval()
    ckptfit.load(model, src.state_dict(), source_model=src_fn)
    _same_function(model, src, torch.randn(2, 3, 64, 64))


def test_convnext_refusals():
    src = _random(_timm_convnext())
    with pytest.raises(ckptfit.LoadError, match=r"'convnext\.layernorm' has eps=1e-12 where the source model's "
                                                r"'head\.norm' has eps=1e-06"):
        ckptfit.load(_hf_convnext(eps=1e-12), src.state_dict(), source_model=_timm_convnext)
    src = _random(_timm_convnext(conv_mlp=True))  # 1x1 convolutions where transformers has Linear layers
    with pytest.raises(ckptfit.LoadError, match=r"not aligned by forward order: the forward passes part at "
                                                r"'stages\.0\.blocks\.0\.mlp\.fc1\.weight' \(conv2d weight "
                                                r"\[32, 8, 1, 1\]\)"):
        ckptfit.load(_hf_convnext(), src.state_dict(), source_model=lambda: _timm_convnext(conv_mlp=True))
