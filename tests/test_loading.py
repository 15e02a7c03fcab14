"""ckptfit.load / plan on real models and real files: containers, prefixes, shapes, all-or-nothing."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import ckptfit


def _model(seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, **kw)


def _distinct(model: nn.Module) -> nn.Module:
    """Perturb every float tensor so 'loaded' and 'left at init' always differ (BN weights are ones)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01 + 0.5)
    return model


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return _distinct(_model(0))


def _assert_equal_sd(model: nn.Module, expected: dict, skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    for k, v in expected.items():
        if any(k.startswith(s) for s in skip):
            continue
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_plain_state_dict_file(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save(source.state_dict(), path)
    target = _model(1)
    report = ckptfit.load(target, path)
    _assert_equal_sd(target, source.state_dict())
    assert report.num_loaded == len(source.state_dict())
    assert "Loaded 122/122" in str(report)


def test_training_checkpoint_with_namespace_and_dataparallel_prefix(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    sd = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "model_state_dict": sd,
                "optimizer_state_dict": torch.optim.SGD(source.parameters(), lr=0.1).state_dict()}, path)
    target = _model(1)
    report = ckptfit.load(target, path)
    _assert_equal_sd(target, source.state_dict())
    assert report.container == "model_state_dict"
    assert any("module." in t for t in report.transforms)


def test_nested_compile_and_lightning_prefixes(tmp_path, source):
    path = tmp_path / "lit.ckpt"
    torch.save({"state_dict": {"model._orig_mod." + k: v for k, v in source.state_dict().items()},
                "global_step": 7}, path)
    target = _model(1)
    ckptfit.load(target, path)
    _assert_equal_sd(target, source.state_dict())


def test_shape_mismatch_refused_without_partial_and_model_untouched(tmp_path, source):
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    target = _model(1, num_classes=10)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ckptfit.LoadError, match=r"fc\.weight — checkpoint \[1000, 512\], model \[10, 512\]") as e:
        ckptfit.load(target, path)
    assert "fc.weight: checkpoint has [1000, 512], model has [10, 512]" in e.value.problems
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the load was refused"


def test_partial_keeps_new_head_at_init(tmp_path, source):
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    target = _model(1, num_classes=10)
    head = target.fc.weight.detach().clone()
    report = ckptfit.load(target, path, partial=True)
    assert torch.equal(target.fc.weight, head)
    _assert_equal_sd(target, source.state_dict(), skip=("fc.",))
    assert {d.target for d in report.skipped_shape} == {"fc.weight", "fc.bias"}


def test_ema_is_not_the_default_but_can_be_chosen(tmp_path, source):
    ema = _distinct(copy.deepcopy(source))
    path = tmp_path / "with_ema.pth"
    torch.save({"state_dict": source.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    target = _model(1)
    ckptfit.load(target, path)
    _assert_equal_sd(target, source.state_dict())
    report = ckptfit.load(target, path, use="ema")
    _assert_equal_sd(target, ema.state_dict())
    assert report.container == "state_dict_ema"
    with pytest.raises(ckptfit.CheckpointError, match="matches no state dict"):
        ckptfit.load(target, path, use="teacher")


def test_keeps_parameter_identity_and_requires_grad(tmp_path, source):
    path = tmp_path / "r.safetensors"
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(path))
    target = _model(1)
    target.conv1.weight.requires_grad_(False)
    params = list(target.parameters())
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    ckptfit.load(target, path)
    assert all(a is b for a, b in zip(params, target.parameters()))
    assert opt.param_groups[0]["params"][0] is target.conv1.weight
    assert target.conv1.weight.requires_grad is False and target.fc.weight.requires_grad is True
    _assert_equal_sd(target, source.state_dict())


def test_fp16_checkpoint_into_fp32_model_and_dtype_option(tmp_path, source):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}, path)
    target = _model(1)
    ckptfit.load(target, path)
    assert target.conv1.weight.dtype == torch.float32
    assert torch.equal(target.conv1.weight, source.conv1.weight.half().float())
    ckptfit.load(target, path, dtype=torch.bfloat16)
    assert target.conv1.weight.dtype == torch.bfloat16


def test_plan_is_a_dry_run(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    target = _model(1)
    before = target.conv1.weight.detach().clone()
    p = ckptfit.plan(target, path)
    assert p.ok and len(p.loads) == 122
    assert p.mapping()["conv1.weight"] == "module.conv1.weight"
    assert torch.equal(target.conv1.weight, before)


def test_plain_dict_and_checkpoint_sources(source):
    target = _model(1)
    ckptfit.load(target, {"state_dict": source.state_dict()})
    _assert_equal_sd(target, source.state_dict())


def test_rename_rule_and_exclude(tmp_path, source):
    path = tmp_path / "renamed.pth"
    torch.save({k.replace("layer", "stage"): v for k, v in source.state_dict().items()}, path)
    target = _model(1)
    ckptfit.load(target, path, rename=[(r"^stage", "layer")])
    _assert_equal_sd(target, source.state_dict())
    target2 = _model(1)
    fc_init = target2.fc.weight.detach().clone()
    ckptfit.load(target2, path, rename=[(r"^stage", "layer")], exclude=["fc.*"])
    assert torch.equal(target2.fc.weight, fc_init)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 50, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_weights_filled_through_the_tie(tmp_path):
    torch.manual_seed(0)
    src = Tied()
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "tied.pth"
    torch.save(sd, path)
    torch.manual_seed(1)
    target = Tied()
    report = ckptfit.load(target, path)
    assert torch.equal(target.lm_head.weight, src.embed.weight)
    assert target.lm_head.weight is target.embed.weight
    assert [d.target for d in report.tied] == ["lm_head.weight"]


def test_whole_pickled_module_is_read_without_its_class(tmp_path):
    # A class defined in a module that does not exist at load time: only placeholders can read it.
    import sys
    import types

    mod = types.ModuleType("ckptfit_test_vanishing")
    exec("import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        self.a = nn.Linear(3, 4)\n        self.b = nn.BatchNorm1d(4)\n", mod.__dict__)
    sys.modules["ckptfit_test_vanishing"] = mod
    torch.manual_seed(0)
    net = mod.Net()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    del sys.modules["ckptfit_test_vanishing"]
    target = nn.Module()
    target.a = nn.Linear(3, 4)
    target.b = nn.BatchNorm1d(4)
    ckptfit.load(target, path)
    assert torch.equal(target.a.weight, net.a.weight)


def test_wrong_model_is_refused_with_every_problem(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save(source.state_dict(), path)
    target = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(target, path)
    assert e.value.problems
    assert "model was not changed" in str(e.value)


def test_model_and_ema_under_prefixes_of_one_state_dict(tmp_path, source):
    # Lightning/timm style: one state_dict holding 'model.*' and 'model_ema.module.*'
    ema = _distinct(copy.deepcopy(source))
    sd = {"model." + k: v for k, v in source.state_dict().items()}
    sd.update({"model_ema.module." + k: v for k, v in ema.state_dict().items()})
    path = tmp_path / "lit_ema.ckpt"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    target = _model(1)
    report = ckptfit.load(target, path)
    _assert_equal_sd(target, source.state_dict())
    assert "strip 'model.'" in report.transforms
    assert all("EMA" in u.reason for u in report.unused)
    target = _model(1)
    report = ckptfit.load(target, path, use="ema")
    _assert_equal_sd(target, ema.state_dict())
    assert report.container == "state_dict.model_ema"


def test_student_teacher_is_ambiguous_and_refused(tmp_path, source):
    other = _distinct(copy.deepcopy(source))
    sd = {"student." + k: v for k, v in source.state_dict().items()}
    sd.update({"teacher." + k: v for k, v in other.state_dict().items()})
    path = tmp_path / "kd.pth"
    torch.save(sd, path)
    with pytest.raises(ckptfit.LoadError, match="ambiguous"):
        ckptfit.load(_model(1), path)
    target = _model(1)
    ckptfit.load(target, path, use="teacher")
    _assert_equal_sd(target, other.state_dict())


def test_wrong_usage_fails_early_and_clearly(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(TypeError, match=r"not the class ResNet; did you mean ResNet\(\)"):
        ckptfit.load(torchvision.models.ResNet, path)
    with pytest.raises(TypeError, match="other way round"):
        ckptfit.load(str(path), _model(1))
    with pytest.raises(TypeError, match="takes a factory"):
        ckptfit.build(_model(1), path)
    with pytest.raises(TypeError, match="partial= must be True or False"):
        ckptfit.load(_model(1), path, partial="yes")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ckptfit.load(_model(1), path, rename=[("(", "")])
    with pytest.raises(ValueError, match="only floating dtypes"):
        ckptfit.load(_model(1), path, dtype=torch.int8)
    with pytest.raises(ValueError, match="is not a device"):
        ckptfit.load(_model(1), path, device="gpu")


def test_string_patterns_are_one_pattern_and_loading_nothing_is_refused(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save(source.state_dict(), path)
    target = _model(1)
    fc = target.fc.weight.detach().clone()
    ckptfit.load(target, path, exclude="fc.*")  # a string, not a list of characters
    assert torch.equal(target.fc.weight, fc)
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    with pytest.raises(ckptfit.LoadError, match="nothing would be loaded"):
        ckptfit.load(_model(1), path, include="nothing*", partial=True)


def test_dtype_names_and_plan_prints_like_the_cli(tmp_path, source):
    path = tmp_path / "r.pth"
    torch.save(source.state_dict(), path)
    target = _model(1)
    ckptfit.load(target, path, dtype="bf16")
    assert target.conv1.weight.dtype == torch.bfloat16
    text = str(ckptfit.plan(_model(1), path))
    assert text.startswith("Would load 122/122 tensors")


class _Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)


def test_model_saved_as_nested_dicts_is_one_candidate(tmp_path):
    torch.manual_seed(0)
    src = _distinct(_Parts())
    path = tmp_path / "nested.pth"
    torch.save({"model": {"backbone": src.backbone.state_dict(), "head": src.head.state_dict()}, "epoch": 2}, path)
    cands = {c.name: c for c in ckptfit.open(path).state_dicts()}
    assert cands["model"].default and cands["model"].num_tensors == 9
    torch.manual_seed(1)
    target = _Parts()
    report = ckptfit.load(target, path)
    assert report.container == "model"
    _assert_equal_sd(target, src.state_dict())
