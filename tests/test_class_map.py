"""class_map=: a classifier head for other classes keeps the file's rows of the classes both have, only when asked."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import ckptfit
from ckptfit.cli import main

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A tiny classifier: a convolutional trunk and a linear head (two heads when distilled)."""

    def __init__(self, num_classes=6, distilled=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)
        self.fc_dist = nn.Linear(8, num_classes) if distilled else None

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(x) if self.fc_dist is None else (self.fc(x) + self.fc_dist(x)) / 2
'''


@pytest.fixture()
def net(tmp_path, monkeypatch):
    """``Net`` from a real file (the CLI imports the same one as ``net.py:Net``)."""
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import net as module

    return importlib.reload(module).Net


def _trained(tmp_path, net, n=6, distilled=False):
    """A 6-class model saved as a DataParallel training checkpoint, the way training code writes one."""
    torch.manual_seed(0)
    src = net(num_classes=n, distilled=distilled)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "trained.pth"
    torch.save({"epoch": 12, "state_dict": sd}, path)
    return src, path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_listed_rows_come_from_the_file_and_new_classes_keep_their_init(tmp_path, net):
    src, path = _trained(tmp_path, net)
    torch.manual_seed(1)
    model = net(num_classes=4)
    init_w, init_b = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    report = ckptfit.load(model, path, class_map=[5, None, 0, 2])
    for new, old in ((0, 5), (2, 0), (3, 2)):
        assert torch.equal(model.fc.weight[new], src.fc.weight[old])
        assert torch.equal(model.fc.bias[new], src.fc.bias[old])
    assert torch.equal(model.fc.weight[1], init_w[1]) and torch.equal(model.fc.bias[1], init_b[1])
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    assert report.complete and report.num_loaded == 9
    lines = str(report).splitlines()
    assert ("  class_map: fc.{weight,bias} — rows selected by class_map: 3 of 6 rows, 1 new row at init "
            "(model class 1)") in lines
    d = report.to_dict()
    assert d["tensor_transforms"] == [{"kind": "class_map", "targets": ["fc.weight", "fc.bias"],
                                       "reason": "rows selected by class_map: 3 of 6 rows, 1 new row at init "
                                                 "(model class 1)"}]
    fc = next(x for x in d["loaded"] if x["target"] == "fc.weight")
    assert fc["transform"]["rows"] == [5, None, 0, 2] and fc["source_shape"] == [6, 8]
    assert fc["transform"]["detail"] == "model row <- file row: 0<-5, 2<-0, 3<-2"


def test_a_dict_map_in_plan_and_build_and_the_head_stays_trainable_under_freeze(tmp_path, net):
    src, path = _trained(tmp_path, net)
    p = ckptfit.plan(net(num_classes=3), path, class_map={0: 4, 2: 1})
    assert p.ok and "rows selected by class_map: 2 of 6 rows, 1 new row at init (model class 1)" in str(p)
    model, report = ckptfit.build(lambda: net(num_classes=3), path, class_map={0: 4, 2: 1}, freeze=True)
    assert torch.equal(model.fc.weight[0], src.fc.weight[4]) and torch.equal(model.fc.bias[2], src.fc.bias[1])
    assert not model.fc.weight.is_meta and torch.isfinite(model.fc.weight[1]).all()
    assert not any(torch.equal(model.fc.weight[1], row) for row in src.fc.weight)  # a fresh init, not a file row
    assert "fc.weight" not in report.frozen and model.fc.weight.requires_grad
    assert "conv.weight" in report.frozen and not model.conv.weight.requires_grad


def test_without_class_map_the_head_stays_at_init_and_partial_is_needed(tmp_path, net):
    _, path = _trained(tmp_path, net)
    model = net(num_classes=4)
    before = model.fc.weight.detach().clone()
    with pytest.raises(ckptfit.LoadError, match="fc.weight — checkpoint \\[6, 8\\], model \\[4, 8\\]"):
        ckptfit.load(model, path)
    report = ckptfit.load(model, path, partial=True)
    assert torch.equal(model.fc.weight, before) and report.num_loaded == 7


@pytest.mark.parametrize("class_map, error, message", [
    ([5, 5, None, None], ValueError, "class_map: file class 5 is given to model classes 0 and 1; each of the "
                                     "file's rows goes to one model class"),
    ({0: 2, 3: 2}, ValueError, "class_map: file class 2 is given to model classes 0 and 3"),
    ([0, -1, None, None], ValueError, "class_map: entry 1 -1 is negative; class indices count from 0"),
    ([0, "1", None, None], TypeError, "class_map: entry 1 '1' is not a class index; use an int >= 0"),
    ([0, True], TypeError, "class_map: entry 1 True is not a class index"),
    ([None, None], ValueError, "class_map takes no row from the file \\(every model class is new\\); leave it out "
                               "and pass partial=True"),
    ("0=1", TypeError, "class_map= must be a list .* or a dict \\{model class: file class\\}, not str"),
])
def test_malformed_maps_are_refused_before_any_work(tmp_path, net, class_map, error, message):
    _, path = _trained(tmp_path, net)
    with pytest.raises(error, match=message):
        ckptfit.load(net(num_classes=4), path, class_map=class_map)


@pytest.mark.parametrize("class_map, message", [
    ([0, 1, 2], "class_map=\\[0, 1, 2\\] has 3 entries, but the model's head 'fc' has 4 classes; give one entry per "
                "model class \\(None for a new class\\)"),
    ({0: 1, 4: 2}, "class_map=\\{0: 1, 4: 2\\}: model class 4 is out of range: the model's head 'fc' has 4 classes "
                   "\\(0-3\\)"),
    ([0, 1, 6, None], "class_map=\\[0, 1, 6, None\\]: file class 6 \\(for model class 2\\) is out of range: the "
                      "file's head has 6 classes \\(0-5\\)"),
])
def test_maps_that_do_not_fit_the_head_are_refused_and_nothing_changes(tmp_path, net, class_map, message):
    _, path = _trained(tmp_path, net)
    model = net(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError, match=message) as e:
        ckptfit.load(model, path, class_map=class_map, partial=True)
    assert "partial=True" not in str(e.value).split("problem:")[-1]  # partial would not settle it: not advised
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_two_possible_heads_are_refused_and_the_advised_class_map_head_loads(tmp_path, net):
    src, path = _trained(tmp_path, net, distilled=True)
    model = net(num_classes=2, distilled=True)
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path, class_map=[3, 1], partial=True)
    assert ("class_map=[3, 1]: 2 modules differ from the file in their number of rows and could be the classifier "
            "head ('fc', 'fc_dist'); nothing is guessed: name it with class_map_head='fc' (CLI: --class-map-head "
            "fc)") in str(e.value)
    report = ckptfit.load(model, path, class_map=[3, 1], class_map_head="fc", partial=True)
    assert torch.equal(model.fc.weight, src.fc.weight[[3, 1]]) and torch.equal(model.fc.bias, src.fc.bias[[3, 1]])
    assert [d.target for d in report.skipped_shape] == ["fc_dist.weight", "fc_dist.bias"]
    with pytest.raises(ckptfit.LoadError, match="class_map_head='head': the model has no module of that name with "
                                                "tensors; modules whose rows differ from the file's: 'fc', 'fc_dist'"):
        ckptfit.load(model, path, class_map=[3, 1], class_map_head="head", partial=True)
    with pytest.raises(ValueError, match="class_map_head= names the head for class_map=; pass class_map= too"):
        ckptfit.load(model, path, class_map_head="fc")


def test_same_number_of_classes_reordered_needs_the_head_named(tmp_path, net):
    src, path = _trained(tmp_path, net, n=4)
    model = net(num_classes=4)
    with pytest.raises(ckptfit.LoadError, match="no head was found; if the classes are only reordered, name the head "
                                                "module with class_map_head="):
        ckptfit.load(model, path, class_map=[3, 2, 1, 0])
    report = ckptfit.load(model, path, class_map=[3, 2, 1, 0], class_map_head="fc")
    assert torch.equal(model.fc.weight, src.fc.weight.flip(0)) and torch.equal(model.fc.bias, src.fc.bias.flip(0))
    assert "rows selected by class_map: 4 of 4 rows" in str(report)


def test_cli_class_map_inline_and_json_file(tmp_path, net):
    src, path = _trained(tmp_path, net)
    spec = f"{tmp_path / 'net.py'}:Net"
    r = _cli("load", path, "--model", spec, "--model-arg", "num_classes=4")
    assert r.exit_code == 1 and "fc.weight — checkpoint [6, 8], model [4, 8]" in r.output
    out = tmp_path / "four.safetensors"
    r = _cli("load", path, "--model", spec, "--model-arg", "num_classes=4", "--class-map", "0=5,2=0,3=2",
             "--save", out)
    assert r.exit_code == 0, r.output
    assert ("class_map: fc.{weight,bias} — rows selected by class_map: 3 of 6 rows, 1 new row at init (model "
            "class 1)") in r.output
    saved = load_file(out)
    assert torch.equal(saved["fc.weight"][[0, 2, 3]], src.fc.weight[[5, 0, 2]])
    assert not any(torch.equal(saved["fc.weight"][1], row) for row in src.fc.weight)
    (tmp_path / "map.json").write_text(json.dumps([5, None, 0, 2]))
    r = _cli("plan", path, "--model", spec, "--model-arg", "num_classes=4", "--class-map", tmp_path / "map.json",
             "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["tensor_transforms"][0]["kind"] == "class_map"
    assert next(x for x in d["loaded"] if x["target"] == "fc.bias")["transform"]["rows"] == [5, None, 0, 2]


@pytest.mark.parametrize("value, message", [
    ("0=5,0=3", "model class 0 is given twice (0=5, 0=3)"),
    ("0:5", "'0:5': write the class map as NEW=OLD pairs (model class = file class), e.g. 0=3,1=7"),
    ("0=5,1=5", "--class-map: file class 5 is given to model classes 0 and 1"),
    ("missing.json", "'missing.json': cannot read it"),
])
def test_cli_bad_class_map_is_a_usage_error(tmp_path, net, value, message):
    _, path = _trained(tmp_path, net)
    r = _cli("load", path, "--model", f"{tmp_path / 'net.py'}:Net", "--class-map", value)
    assert r.exit_code == 2 and message in r.output, r.output


def test_cli_two_heads_advice_followed_literally(tmp_path, net):
    src, path = _trained(tmp_path, net, distilled=True)
    args = ["plan", path, "--model", f"{tmp_path / 'net.py'}:Net", "--model-arg", "num_classes=2", "--model-arg",
            "distilled=True", "--class-map", "0=3,1=1", "--partial"]
    r = _cli(*args)
    assert r.exit_code == 1 and "(CLI: --class-map-head fc)" in r.output
    r = _cli(*args, "--class-map-head", "fc")
    assert r.exit_code == 0, r.output
    assert "rows selected by class_map: 2 of 6 rows" in r.output


def test_a_state_dict_in_memory_and_a_bias_free_head():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5, bias=False))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False))
    ckptfit.load(b, a.state_dict(), class_map={1: 4, 0: 0})
    assert torch.equal(b[2].weight, a[2].weight[[0, 4]])


def test_a_class_map_head_tied_to_another_weight_with_its_own_file_copy_is_refused(tmp_path):
    """A tie filled through class_map rows whose file copy differs in the rows the map selects: a refusal, not a
    crash (tests/test_class_map_ties.py: equal copies load)."""
    class Tied(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.emb = nn.Embedding(n, 4)
            self.head = nn.Linear(4, n, bias=False)
            self.head.weight = self.emb.weight

    src = {"emb.weight": torch.randn(5, 4), "head.weight": torch.randn(5, 4)}
    path = tmp_path / "untied.pt"
    torch.save(src, path)
    model = Tied(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path, class_map=[4, 0, None, 1, 2], class_map_head="emb")
    assert ("whose rows are chosen by class_map, but the checkpoint's own 'head.weight' and 'emb.weight' differ in "
            "the rows the map selects (16 of 16 values") in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "exclude=['head.weight']" in e.value.hint
    # the advice, followed: the head is filled through the tie from the mapped rows
    report = ckptfit.load(model, path, class_map=[4, 0, None, 1, 2], class_map_head="emb", exclude=["head.weight"])
    assert model.head.weight is model.emb.weight
    for new, old in enumerate([4, 0, None, 1, 2]):
        want = before["emb.weight"][new] if old is None else src["emb.weight"][old]
        assert torch.equal(model.emb.weight[new], want)
    assert report.complete
