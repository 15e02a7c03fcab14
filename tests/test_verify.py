"""ckptfit.verify: inferred inputs, comparison with a reference, and tensors left at their init."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfit
from ckptfit.untrained import find_untrained, ks_pvalue
from ckptfit.verification import parse_input_shape


class LeNet(nn.Module):
    """28x28 MNIST LeNet: a 224x224 input fails at the Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _trained_like(model: nn.Module) -> nn.Module:
    """Values that no init draws: heavy-tailed, off-centre (what training leaves)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.distributions.StudentT(3.0).sample(p.shape) + 0.01 * torch.rand(p.shape, generator=g))
    return model


def test_lenet_input_is_inferred_by_trying_sizes() -> None:
    r = ckptfit.verify(LeNet(), untrained=False)
    assert r.ok and r.input_shape == (1, 1, 28, 28) and r.output_shapes == ((1, 10),)
    assert str(r) == ("verify: input [1, 1, 28, 28] (inferred from Conv2d(in_channels=1), after [1, 1, 224, 224], "
                      "[1, 1, 32, 32] failed) -> output [1, 10]: ok")


def test_given_input_and_shape_parsing() -> None:
    r = ckptfit.verify(LeNet(), torch.zeros(2, 1, 28, 28), untrained=False)
    assert r.ok and r.input_shape == (2, 1, 28, 28) and r.input_note == "given"
    r = ckptfit.verify(LeNet(), torch.zeros(1, 1, 224, 224), untrained=False)  # a given input that fails: a failure
    assert not r.ok and r.skipped is None and r.error.startswith("RuntimeError: mat1 and mat2 shapes")
    assert parse_input_shape("1,1,28,28") == (1, 1, 28, 28) == parse_input_shape("1x1x28x28")
    with pytest.raises(ValueError, match="not a list of positive integers"):
        parse_input_shape("1,a")


def test_embedding_linear_and_rnn_first_models() -> None:
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 8, 3))
    r = ckptfit.verify(emb, untrained=False)
    assert r.ok and r.input_shape == (1, 8) and "token ids from Embedding(num_embeddings=50)" in r.input_note
    r = ckptfit.verify(nn.Sequential(nn.Linear(7, 3), nn.ReLU()), untrained=False)
    assert r.ok and r.input_shape == (1, 7)
    r = ckptfit.verify(nn.LSTM(4, 5, batch_first=True), untrained=False)
    assert r.ok and r.input_shape == (1, 8, 4)


def test_no_input_is_a_skip_with_advice_not_an_exception() -> None:
    r = ckptfit.verify(nn.Identity(), untrained=False)
    assert not r.ok and r.error is None
    assert r.skipped.startswith("cannot infer an input for Identity") and "--input-shape" in r.skipped
    assert str(r).startswith("verify: not run: cannot infer an input for Identity")

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, y):
            return self.conv(x) + y

    r = ckptfit.verify(TwoInputs(), untrained=False)
    assert not r.ok and r.skipped.startswith("no inferred input worked for TwoInputs: tried [1, 3, 224, 224], ")
    assert "first error: TypeError" in r.skipped


def test_nan_output_fails() -> None:
    m = nn.Linear(4, 2)
    with torch.no_grad():
        m.weight.fill_(float("nan"))
    r = ckptfit.verify(m, untrained=False)
    assert not r.ok and r.nonfinite == 2 and "2 NaN/Inf values in the output" in str(r)


def test_reference_comparison_reports_max_abs_diff() -> None:
    a = LeNet()
    b = LeNet()
    b.load_state_dict(a.state_dict())
    r = ckptfit.verify(a, reference=b, untrained=False)
    assert r.ok and r.reference.ok and r.reference.max_abs_diff == 0.0 and r.reference.compared == 1
    assert "reference: match: max abs diff 0 over 1 output (atol 1e-05, rtol 0.0001)" in str(r)
    with torch.no_grad():
        b.fc.bias.add_(1e-3)
    r = ckptfit.verify(a, reference=b, untrained=False)
    assert not r.ok and not r.reference.ok and r.reference.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert "reference: DIFFER: max abs diff 0.001 over 1 output" in str(r)
    assert ckptfit.verify(a, reference=b, atol=2e-3, untrained=False).ok
    r = ckptfit.verify(a, reference=nn.Sequential(LeNet(), nn.Linear(10, 3)), untrained=False)
    assert not r.ok and r.reference.note == "outputs differ in shape: model [1, 10], reference [1, 3]"
    with pytest.raises(ValueError, match="atol= must be a finite number"):
        ckptfit.verify(a, reference=b, atol=-1)


def test_reference_port_conv1d_to_linear_is_exact() -> None:
    from transformers.pytorch_utils import Conv1D

    src = nn.Sequential(Conv1D(12, 6), nn.GELU(), Conv1D(6, 12))
    dst = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    with torch.no_grad():
        for s, d in ((src[0], dst[0]), (src[2], dst[2])):
            d.weight.copy_(s.weight.T)
            d.bias.copy_(s.bias)
    r = ckptfit.verify(dst, reference=src, untrained=False)
    assert r.ok and r.reference.max_abs_diff < 1e-6


def test_fresh_model_is_flagged_with_grouped_evidence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.LazyLinear(10))
    model.eval()(torch.zeros(1, 3, 8, 8))  # materialises the LazyLinear; eval: running stats stay
    report = find_untrained(model)
    assert set(report.groups()) == {"PyTorch default init", "exactly 1", "exactly 0"}
    assert report.names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                            "3.weight"]
    assert report.undecided == ("3.bias",)  # 10 values: too few to tell
    text = str(report)
    assert text.startswith("at init: 7 of 8 tensors look like a fresh init, not trained; 1 too small to tell:")
    assert "  exactly 1 (2, certain): 1.{weight,running_var}" in text


def test_trained_like_values_are_not_flagged() -> None:
    report = find_untrained(_trained_like(LeNet()))
    assert report.flagged == () and str(report).startswith("at init: none of 6 tensors looks like a fresh init")


def test_library_inits_are_flagged() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64), nn.Embedding(100, 32, padding_idx=0))
    with torch.no_grad():
        nn.init.normal_(m[0].weight, std=0.02)  # transformers
        nn.init.trunc_normal_(m[1].weight, std=0.02)  # timm
    kinds = {f.name: f.kind for f in find_untrained(m).flagged}
    assert kinds["0.weight"] == "random normal N(0, σ)" and kinds["1.weight"] in ("random normal N(0, σ)",
                                                                                   "random truncated normal")
    assert kinds["2.weight"] == "PyTorch default init"  # N(0, 1) with the zeroed padding row left out


def test_norms_only_as_exact_constants_and_weight_norm() -> None:
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.add_(torch.randn(64) * 1e-3)
    assert [f.name for f in find_untrained(nn.Sequential(ln)).flagged] == ["0.bias"]
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))
    found = {f.name: f.kind for f in find_untrained(wn).flagged}
    assert found["parametrizations.weight.original0"] == "weight norm at init"
    with torch.no_grad():
        wn.parametrizations.weight.original0.mul_(1.1)
    assert "parametrizations.weight.original0" not in {f.name for f in find_untrained(wn).flagged}


def test_verify_combines_checks_and_json() -> None:
    torch.manual_seed(1)  # each fresh tensor is missed with probability ~2e-3; seed 0's fc.weight is one (p=5e-4)
    r = ckptfit.verify(LeNet())
    assert r.forward_ok and not r.ok and r.untrained.names == ["conv1.weight", "conv2.weight", "conv2.bias",
                                                               "fc.weight"]
    d = r.to_dict()
    assert d["untrained"]["flagged"][0]["kind"] == "PyTorch default init" and d["input_shape"] == (1, 1, 28, 28)
    r = ckptfit.verify(_trained_like(LeNet()))
    assert r.ok and "at init: none of 6 tensors" in str(r)
    r = ckptfit.verify(LeNet(), forward=False)
    assert r.input_shape is None and str(r).startswith("at init: 4 of 6")


def test_a_spread_that_moved_is_not_an_init() -> None:
    """RNet's conv1 in facenet-pytorch: trained, bell-shaped, 15% narrower than kaiming_normal's
    sqrt(2 / fan_in). KS alone on 756 values accepts that normal; the test of the spread does not."""
    conv = nn.Conv2d(3, 28, 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.85 * (2 / 27) ** 0.5)
        conv.bias.copy_(torch.randn(28, generator=g))
    assert find_untrained(conv).flagged == ()
    with torch.no_grad():  # the same draw at the init's own scale is flagged, with its formula
        conv.weight.mul_(1 / 0.85)
    assert [(f.name, f.evidence.split(":")[0]) for f in find_untrained(conv).flagged] == [
        ("weight", "N(0, √(2/fan_in) = 0.272)")]


def test_values_of_an_init_in_a_trained_arrangement_are_not_flagged() -> None:
    """The same multiset of values, in another order: the distribution tests see no difference,
    the i.i.d. test does (units that differ in norm, smooth filters, inputs used unequally)."""
    torch.manual_seed(1)
    fresh = nn.Conv1d(16, 64, 9)
    assert [f.name for f in find_untrained(fresh).flagged] == ["weight", "bias"]
    w = fresh.weight.detach().reshape(-1)
    by_size = w[w.abs().argsort()].reshape(64, -1)  # row i: the i-th band of magnitudes, signs as drawn
    arranged = {
        "smooth filters": w.reshape(64, -1).sort(dim=1).values,  # each row in order: neighbours correlated
        "units apart": by_size[:, torch.randperm(by_size.shape[1])],  # rows of very different norms
    }
    for what, values in arranged.items():
        with torch.no_grad():
            fresh.weight.copy_(values.reshape(fresh.weight.shape))
        assert [f.name for f in find_untrained(fresh).flagged] == ["bias"], what


def test_ks_pvalue_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n, d in ((20, 0.2), (100, 0.1), (5000, 0.02), (100, 0.5)):
        assert ks_pvalue(d, n) == pytest.approx(stats.kstwo.sf(d, n), rel=0.05, abs=1e-6)
