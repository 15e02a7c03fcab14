"""Porting between implementations: transposed (GPT-2 ``Conv1D``) and fused/separate (qkv, gate/up) weights.

Every port is checked end to end: the ported model's outputs equal the source model's on the
same input (within 1e-4), or the load is refused, and where a refusal gives advice, following
it literally loads correctly.
"""
from __future__ import annotations

import ast
import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import LoadError
from ckptfit.porting import parse_rules

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

ATOL = 1e-4


def _seeded(factory, seed):
    torch.manual_seed(seed)
    return factory().eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=0)


def _advised(text: str, kind: str) -> dict:
    """The ``transforms={...: kind}`` dict a suggestion gives, parsed literally."""
    for m in re.finditer(r"transforms=(\{.*?\})", text):
        rules = ast.literal_eval(m.group(1))
        if set(rules.values()) == {kind}:
            return rules
    raise AssertionError(f"no transforms={{...: {kind!r}}} advice in:\n{text}")


# ----------------------------------------------------------------------------- small MLPs

class Conv1DMLP(nn.Module):
    def __init__(self, d_in=16, hidden=64, d_out=16):
        super().__init__()
        self.fc_in = Conv1D(hidden, d_in)
        self.fc_mid = Conv1D(hidden, hidden)
        self.fc_out = Conv1D(d_out, hidden)
        for p in self.parameters():  # Conv1D starts its bias at zero: make every value count
            nn.init.normal_(p, std=0.3)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_mid(torch.tanh(self.fc_in(x)))))


class LinearMLP(nn.Module):
    def __init__(self, d_in=16, hidden=64, d_out=16):
        super().__init__()
        self.fc_in = nn.Linear(d_in, hidden)
        self.fc_mid = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_mid(torch.tanh(self.fc_in(x)))))


def test_conv1d_mlp_into_linear_mlp_is_transposed_square_one_too(tmp_path):
    from safetensors.torch import save_file

    src = _seeded(Conv1DMLP, 0)
    path = tmp_path / "conv1d.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _seeded(LinearMLP, 1)

    p = ckptfit.plan(dst, path)  # shown before anything is loaded
    assert p.ok, str(p)
    kinds = {d.target: d.transform.kind for d in p.decisions if d.transform is not None}
    assert kinds == {"fc_in.weight": "transpose", "fc_mid.weight": "transpose", "fc_out.weight": "transpose"}
    text = str(p)
    assert "transpose: {fc_in,fc_mid,fc_out}.weight" in text
    assert "2 non-square fit only transposed" in text and "the 1 square too" in text

    report = ckptfit.load(dst, path)
    x = torch.randn(5, 16)
    assert _close(dst(x), src(x))
    assert "transpose:" in str(report)
    loaded = {d["target"]: d for d in report.to_dict()["loaded"]}
    assert loaded["fc_mid.weight"]["transform"]["kind"] == "transpose"
    assert "square" in loaded["fc_mid.weight"]["transform"]["detail"]
    assert "transform" not in loaded["fc_in.bias"]
    json.dumps(report.to_dict())


def test_linear_into_conv1d_and_build_on_meta():
    src = _seeded(LinearMLP, 0)
    model, report = ckptfit.build(Conv1DMLP, src.state_dict())
    x = torch.randn(3, 16)
    assert _close(model(x), src(x))
    assert all(p.is_contiguous() for p in model.parameters())
    assert report.num_loaded == 6


def test_conflicting_evidence_is_refused():
    class Mixed(nn.Module):  # fc_in stored as Conv1D, fc_out as nn.Linear: one file, two layouts
        def __init__(self):
            super().__init__()
            self.fc_in = Conv1D(64, 16)
            self.fc_mid = nn.Linear(64, 64)
            self.fc_out = nn.Linear(64, 16)

    dst = LinearMLP()
    with pytest.raises(LoadError, match="evidence conflicts: 1 fit only transposed"):
        ckptfit.load(dst, Mixed().state_dict())


def test_all_square_into_conv1d_is_refused_and_the_advice_loads_it():
    src = _seeded(lambda: LinearMLP(32, 32, 32), 0)  # every weight square: shapes cannot tell
    dst = _seeded(lambda: Conv1DMLP(32, 32, 32), 1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(LoadError, match="all 3 of them are square") as e:
        ckptfit.load(dst, src.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched
    p = e.value.plan
    advice = "\n".join(p.suggestions)
    assert "transforms=" in advice
    ckptfit.load(dst, src.state_dict(), transforms=_advised(advice, "transpose"))
    x = torch.randn(4, 32)
    assert _close(dst(x), src(x))

    # the other branch of the same advice: a Conv1D file into a Conv1D model loads as stored
    src2 = _seeded(lambda: Conv1DMLP(32, 32, 32), 2)
    with pytest.raises(LoadError):
        ckptfit.load(dst, src2.state_dict())
    ckptfit.load(dst, src2.state_dict(), transforms=_advised(advice, "none"))
    assert _close(dst(x), src2(x))


def test_all_square_into_linear_loads_as_stored():
    src = _seeded(lambda: LinearMLP(32, 32, 32), 0)
    dst = _seeded(lambda: LinearMLP(32, 32, 32), 1)
    report = ckptfit.load(dst, src.state_dict())
    assert not [d for d in report.loaded if d.transform is not None]
    x = torch.randn(2, 32)
    assert torch.equal(dst(x), src(x))


# ----------------------------------------------------------------------------- GPT-2 and nanoGPT

N_LAYER, N_EMBD, N_HEAD, VOCAB, N_POS = 2, 32, 2, 100, 32


class _Attn(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = _Attn(d, h)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = _MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: nn.Linear everywhere, c_attn fused [3d, d], lm_head tied to wte."""

    def __init__(self, d=N_EMBD, h=N_HEAD, n_layer=N_LAYER, vocab=VOCAB, n_pos=N_POS):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(n_pos, d),
            h=nn.ModuleList(_Block(d, h) for _ in range(n_layer)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for p in self.parameters():
            nn.init.normal_(p, std=0.2)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
                                  n_positions=N_POS, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(cfg)


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def _randomize_gpt2(model):
    with torch.no_grad():  # biases and norms start at 0 / 1: make every value count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(std=0.2)


def test_gpt2_save_pretrained_into_nanogpt(tmp_path):
    src = _seeded(_gpt2, 0)
    _randomize_gpt2(src)
    src.save_pretrained(tmp_path)
    dst = _seeded(NanoGPT, 1)

    p = ckptfit.plan(dst, tmp_path)
    assert p.ok, str(p)
    transposed = sorted(d.target for d in p.decisions if d.transform is not None)
    assert len(transposed) == 8 and "transformer.h.0.attn.c_proj.weight" in transposed  # square, with its role
    assert all(d.transform.kind == "transpose" for d in p.decisions if d.transform is not None)
    assert not any(d.transform for d in p.decisions if "wte" in d.target or "wpe" in d.target)  # embeddings

    ckptfit.load(dst, tmp_path)
    idx = torch.randint(0, VOCAB, (2, 16))
    assert _close(_logits(dst, idx), _logits(src, idx))


def test_nanogpt_state_dict_into_gpt2(tmp_path):
    src = _seeded(NanoGPT, 0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "iter_num": 10}, path)  # nanoGPT's own checkpoint layout
    dst = _seeded(_gpt2, 1)
    report = ckptfit.load(dst, path)
    idx = torch.randint(0, VOCAB, (2, 16))
    assert _close(_logits(dst, idx), _logits(src, idx))
    assert sum(d.transform is not None for d in report.loaded) == 8


# ----------------------------------------------------------------------------- fused and separate

class SeparateAttn(nn.Module):
    """Attention with separate q, k, v projections (names: ``q_name`` ...) and an output projection."""

    def __init__(self, d=24, h=2, names=("q_proj", "k_proj", "v_proj"), out="c_proj"):
        super().__init__()
        self.h, self.names, self.out = h, names, out
        for n in names:
            setattr(self, n, nn.Linear(d, d))
        setattr(self, out, nn.Linear(d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (getattr(self, n)(x) for n in self.names)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return getattr(self, self.out)(y.transpose(1, 2).reshape(b, t, d))


class FusedNet(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.attn = _Attn(d, 2)
        self.attn.c_attn = nn.Linear(d, 3 * d)

    def forward(self, x):
        return self.attn(x)


class SeparateNet(nn.Module):
    def __init__(self, d=24, **kw):
        super().__init__()
        self.attn = SeparateAttn(d, 2, **kw)

    def forward(self, x):
        return self.attn(x)


class GPT2AttnNet(nn.Module):
    """A fused Conv1D c_attn ([d, 3d], GPT-2) with a Conv1D c_proj."""

    def __init__(self, d=24):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(3 * d, d)
        self.attn.c_proj = Conv1D(d, d)
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, 2, d // 2).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn.c_proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("names", [("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("to_q", "to_k", "to_v"),
                                   ("q", "k", "v")])
def test_fused_qkv_is_split_into_named_projections(names):
    src = _seeded(FusedNet, 0)
    dst = _seeded(lambda: SeparateNet(names=names), 1)
    p = ckptfit.plan(dst, src.state_dict())
    assert p.ok, str(p)
    parts = {d.target: (d.transform.kind, d.transform.part) for d in p.decisions if d.transform is not None}
    assert parts == {f"attn.{n}.{leaf}": ("split", i) for i, n in enumerate(names) for leaf in ("weight", "bias")}
    assert "split:" in str(p) and "'c_attn' names a fused (q, k, v) tensor" in str(p)
    ckptfit.load(dst, src.state_dict())
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))


def test_gpt2_conv1d_c_attn_is_transposed_and_split():
    src = _seeded(GPT2AttnNet, 0)
    dst = _seeded(SeparateNet, 1)
    report = ckptfit.load(dst, src.state_dict())
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))
    q = next(d for d in report.loaded if d.target == "attn.q_proj.weight")
    assert q.transform.kind == "split" and q.transform.transpose


def test_separate_projections_are_joined_into_fused():
    src = _seeded(SeparateNet, 0)
    dst = _seeded(FusedNet, 1)
    report = ckptfit.load(dst, src.state_dict())
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))
    c = next(d for d in report.loaded if d.target == "attn.c_attn.weight")
    assert c.transform.kind == "concat"
    assert c.transform.sources == ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
    assert not report.unused


def test_model_declaring_another_order_is_not_split():
    src = _seeded(FusedNet, 0)
    dst = SeparateNet(names=("v_proj", "k_proj", "q_proj"))
    with pytest.raises(LoadError, match="not in the checkpoint"):
        ckptfit.load(dst, src.state_dict())


def test_head_interleaved_query_key_value_is_never_split_automatically():
    src = FusedNet()
    sd = {k.replace("c_attn", "query_key_value"): v for k, v in src.state_dict().items()}
    dst = SeparateNet()
    p = ckptfit.plan(dst, sd)
    assert not p.ok and not any(d.transform for d in p.decisions)


def test_unnamed_fused_tensor_needs_a_rule_and_the_rule_splits_it():
    src = _seeded(FusedNet, 0)
    sd = {k.replace("c_attn", "proj_in"): v for k, v in src.state_dict().items()}
    dst = _seeded(SeparateNet, 1)
    assert not ckptfit.plan(dst, sd).ok
    ckptfit.load(dst, sd, transforms={"attn.proj_in.*": "split:3"})
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))


class GatedMLP(nn.Module):
    def __init__(self, d=16, i=40, fused=False):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(d, 2 * i, bias=False)
        else:
            self.gate_proj = nn.Linear(d, i, bias=False)
            self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


@pytest.mark.parametrize("fused_src", [True, False])
def test_gate_up_fused_and_separate(fused_src):
    src = _seeded(lambda: GatedMLP(fused=fused_src), 0)
    dst = _seeded(lambda: GatedMLP(fused=not fused_src), 1)
    ckptfit.load(dst, src.state_dict())
    x = torch.randn(3, 16)
    assert _close(dst(x), src(x))


# ----------------------------------------------------------------------------- options and CLI

@pytest.mark.parametrize("value, exc, message", [
    ({"*.weight": "rotate"}, ValueError, "unknown transform 'rotate'"),
    ({"*.weight": "transpose+none"}, ValueError, "contradict"),
    ({"*.weight": "split:1"}, ValueError, "N >= 2"),
    ({"": "transpose"}, ValueError, "pattern is empty"),
    ({"*.weight": 3}, TypeError, "pattern: kind pair of strings"),
    (42, TypeError, "must be a dict"),
])
def test_bad_transform_rules_fail_early(value, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        ckptfit.load(LinearMLP(), "/no/such/file.pth", transforms=value)  # before the file is opened


def test_rules_accept_globs_and_regexes():
    glob, regex = parse_rules({"*.c_attn.weight": "transpose", r"h\.\d+\.mlp\.c_fc\.weight": "none"})
    assert glob.hits("transformer.h.0.attn.c_attn.weight") and not glob.hits("h.0.attn.c_proj.weight")
    assert regex.hits("h.12.mlp.c_fc.weight") and regex.transpose is False


def test_rule_that_matches_nothing_warns():
    src = LinearMLP()
    p = ckptfit.plan(LinearMLP(), src.state_dict(), transforms={"nothing.*": "transpose"})
    assert p.ok and any("matched no key" in w for w in p.warnings)


def test_cli_transform_option(tmp_path):
    from safetensors.torch import save_file

    src = _seeded(lambda: LinearMLP(32, 32, 32), 0)
    path = tmp_path / "square.safetensors"
    save_file(src.state_dict(), str(path))
    spec = f"{__name__}:{_square_conv1d.__name__}"
    runner = CliRunner()
    refused = runner.invoke(main, ["plan", str(path), "--model", spec])
    assert refused.exit_code == 1 and "all 3 of them are square" in refused.output
    ok = runner.invoke(main, ["plan", str(path), "--model", spec, "--transform", "*.weight=transpose"])
    assert ok.exit_code == 0, ok.output
    assert "transpose: {fc_in,fc_mid,fc_out}.weight — your rule" in ok.output
    bad = runner.invoke(main, ["plan", str(path), "--model", spec, "--transform", "*.weight"])
    assert bad.exit_code == 2 and "PATTERN=KIND" in bad.output
    bad = runner.invoke(main, ["plan", str(path), "--model", spec, "--transform", "*.weight=flip"])
    assert bad.exit_code == 2 and "unknown transform 'flip'" in bad.output


def _square_conv1d():
    return Conv1DMLP(32, 32, 32)


def test_no_transform_no_change():
    """A plain load is untouched by porting: same plan object contents, no transform anywhere."""
    src = LinearMLP()
    p = ckptfit.plan(LinearMLP(), src.state_dict())
    assert p.ok and all(d.transform is None for d in p.decisions)
    assert not math.isnan(0.0)


class MHANet(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False, is_causal=True,
                         attn_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]))[0]


@pytest.mark.parametrize("mha_src", [True, False])
def test_multihead_attention_in_proj_and_separate_projections(mha_src):
    src = _seeded(MHANet if mha_src else (lambda: SeparateNet(out="out_proj")), 0)
    dst = _seeded((lambda: SeparateNet(out="out_proj")) if mha_src else MHANet, 1)
    ckptfit.load(dst, src.state_dict())
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))


def test_conflict_advice_none_keeps_other_layers_at_init_under_partial():
    class Other(nn.Module):  # fc_out really is another layer: [64, 16] where the model has [16, 64]
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(16, 64)
            self.fc_mid = nn.Linear(64, 64)
            self.fc_out = nn.Linear(16, 64)

    src = Other()
    dst = LinearMLP()
    with pytest.raises(LoadError, match="evidence conflicts") as e:
        ckptfit.load(dst, src.state_dict(), partial=True)
    rules = _advised("\n".join(e.value.plan.suggestions), "none")
    report = ckptfit.load(dst, src.state_dict(), partial=True, transforms=rules)
    assert [d.target for d in report.skipped_shape] == ["fc_out.weight", "fc_out.bias"]
    assert torch.equal(dst.fc_mid.weight, src.fc_mid.weight)


def test_whole_model_pickle_records_conv1d_so_all_square_ports(tmp_path):
    """A model saved whole (torch.save(model)) records each layer's class: evidence even when all are square."""
    src = _seeded(lambda: Conv1DMLP(32, 32, 32), 0)
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    dst = _seeded(lambda: LinearMLP(32, 32, 32), 1)
    p = ckptfit.plan(dst, path)
    assert p.ok, str(p)
    assert "records 3 square ones as Conv1D layers" in str(p)
    ckptfit.load(dst, path)
    x = torch.randn(2, 32)
    assert _close(dst(x), src(x))

    same = _seeded(lambda: Conv1DMLP(32, 32, 32), 2)  # and into Conv1D: as stored, no refusal
    report = ckptfit.load(same, path)
    assert not any(d.transform for d in report.loaded)
    assert _close(same(x), src(x))


def test_rule_transposes_a_weight_of_a_layer_type_without_known_layout():
    class Custom(nn.Module):
        def __init__(self, rows, cols):
            super().__init__()
            self.table = nn.Parameter(torch.randn(rows, cols))

    src, dst = Custom(4, 6), Custom(6, 4)
    with pytest.raises(LoadError):  # no layout evidence for a custom parameter: never moved on its own
        ckptfit.load(dst, src.state_dict())
    report = ckptfit.load(dst, src.state_dict(), transforms={"table": "transpose"})
    assert torch.equal(dst.table, src.table.t())
    assert report.to_dict()["tensor_transforms"] == [
        {"kind": "transpose", "targets": ["table"], "reason": "your rule transforms={'table': 'transpose'}"}]


def test_old_gpt2_file_with_mask_buffers_and_module_prefix_into_nanogpt(tmp_path):
    """Older transformers saved ``attn.bias`` / ``attn.masked_bias``; DataParallel adds ``module.``."""
    src = _seeded(_gpt2, 0)
    _randomize_gpt2(src)
    sd = dict(src.state_dict())
    for i in range(N_LAYER):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS, dtype=torch.bool)).view(1, 1, N_POS, N_POS)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    dst = _seeded(NanoGPT, 1)
    report = ckptfit.load(dst, path)
    assert {u.source.rsplit(".", 1)[1] for u in report.unused} <= {"bias", "masked_bias", "weight"}
    assert all("attn.bias" in u.source or "masked_bias" in u.source or "lm_head" in u.source for u in report.unused)
    idx = torch.randint(0, VOCAB, (2, 16))
    assert _close(_logits(dst, idx), _logits(src, idx))


def test_gpt2_into_nanogpt_built_on_meta_in_bf16(tmp_path):
    src = _seeded(_gpt2, 0)
    src.save_pretrained(tmp_path)
    model, report = ckptfit.build(NanoGPT, tmp_path, dtype=torch.bfloat16)
    w = model.transformer.h[0].attn.c_attn.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, src.transformer.h[0].attn.c_attn.weight.t().to(torch.bfloat16))


class GQA(nn.Module):
    """Grouped-query attention (4 query heads, 2 key/value heads of 6): fused ``qkv_proj`` or separate."""

    def __init__(self, fused: bool, d=24, h=4, kv=2):
        super().__init__()
        self.fused, self.h, self.kv, self.hd = fused, h, kv, d // h
        if fused:
            self.qkv_proj = nn.Linear(d, (h + 2 * kv) * self.hd, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * self.hd, bias=False)
            self.k_proj = nn.Linear(d, kv * self.hd, bias=False)
            self.v_proj = nn.Linear(d, kv * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.h, self.hd).transpose(1, 2)
        k, v = (z.view(b, t, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
                for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("fused_src", [True, False])
def test_grouped_query_attention_fused_and_separate(fused_src):
    src = _seeded(lambda: GQA(fused_src), 0)
    dst = _seeded(lambda: GQA(not fused_src), 1)
    report = ckptfit.load(dst, src.state_dict())
    x = torch.randn(2, 5, 24)
    assert _close(dst(x), src(x))
    if fused_src:
        k = next(d for d in report.to_dict()["loaded"] if d["target"] == "k_proj.weight")
        assert k["transform"]["sizes"] == [24, 12, 12]


def test_advice_for_nested_square_layers_names_each_layer_form_and_works():
    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.ln = nn.LayerNorm(16)  # a 'weight' the advice must not catch
            self.attn = nn.Module()
            self.attn.c_proj = layer(16, 16)
            self.mlp = nn.Module()
            self.mlp.c_fc = layer(16, 16)

        def forward(self, x):
            return self.mlp.c_fc(torch.tanh(self.attn.c_proj(self.ln(x))))

    class Net(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.h = nn.ModuleList(Block(layer) for _ in range(3))

        def forward(self, x):
            for b in self.h:
                x = b(x)
            return x

    src, dst = _seeded(lambda: Net(nn.Linear), 0), _seeded(lambda: Net(Conv1D), 1)
    with pytest.raises(LoadError) as e:
        ckptfit.load(dst, src.state_dict())
    rules = _advised("\n".join(e.value.plan.suggestions), "transpose")
    assert rules == {"h.*.attn.c_proj.weight": "transpose", "h.*.mlp.c_fc.weight": "transpose"}
    ckptfit.load(dst, src.state_dict(), transforms=rules)
    x = torch.randn(2, 16)
    assert _close(dst(x), src(x))
