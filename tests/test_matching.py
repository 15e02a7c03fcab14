"""Unit tests of the matcher on plain lists of TensorSpec: one realistic case per test."""
from __future__ import annotations


import pytest
import torch

from ckptfit.matching import match
from ckptfit.plans import Plan, TensorSpec

F32, F16, I64 = torch.float32, torch.float16, torch.int64


# -- helpers ---------------------------------------------------------------------------


def spec(name: str, *shape: int, dtype: torch.dtype = F32) -> TensorSpec:
    return TensorSpec(name, shape, dtype)


def conv(name: str, cout: int, cin: int, k: int = 3) -> list[TensorSpec]:
    return [spec(f"{name}.weight", cout, cin, k, k)]


def bn(name: str, c: int, nbt: bool = True) -> list[TensorSpec]:
    out = [spec(f"{name}.{role}", c) for role in ("weight", "bias", "running_mean", "running_var")]
    return out + ([spec(f"{name}.num_batches_tracked", dtype=I64)] if nbt else [])


def linear(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [spec(f"{name}.weight", out, inp), spec(f"{name}.bias", out)]


def small_resnet(classes: int = 10, fc: bool = True) -> list[TensorSpec]:
    specs = conv("conv1", 8, 3, 7) + bn("bn1", 8)
    for layer, (cin, cout) in enumerate([(8, 8), (8, 16)], start=1):
        specs += conv(f"layer{layer}.0.conv1", cout, cin) + bn(f"layer{layer}.0.bn1", cout)
        specs += conv(f"layer{layer}.0.conv2", cout, cout) + bn(f"layer{layer}.0.bn2", cout)
    return specs + (linear("fc", classes, 16) if fc else [])


def prefixed(specs: list[TensorSpec], prefix: str) -> list[TensorSpec]:
    return [TensorSpec(prefix + s.name, s.shape, s.dtype) for s in specs]


def actions(plan: Plan) -> dict[str, str]:
    return {d.target: d.action for d in plan.decisions}


def decision(plan: Plan, target: str):
    return next(d for d in plan.decisions if d.target == target)


def assert_well_formed(plan: Plan, target: list[TensorSpec], source: list[TensorSpec]) -> None:
    assert [d.target for d in plan.decisions] == [t.name for t in target]
    loaded = [d.source for d in plan.loads]
    assert len(loaded) == len(set(loaded))
    unused = [u.source for u in plan.unused]
    assert set(loaded) | set(unused) == {s.name for s in source}
    assert not set(loaded) & set(unused)
    for d in plan.loads:
        assert d.source_shape == d.target_shape


# -- stage 2: exact --------------------------------------------------------------------


def test_exact_names_load_everything():
    model = small_resnet()
    plan = match(model, model)
    assert_well_formed(plan, model, model)
    assert plan.ok and plan.transforms == () and plan.unused == ()
    assert {d.stage for d in plan.decisions} == {"exact"}
    assert decision(plan, "fc.weight").reason == "same name and shape"


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="checkpoint key 'a' occurs twice"):
        match([spec("a", 1)], [spec("a", 1), spec("a", 1)])


# -- stage 3: learned prefixes ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model._orig_mod.module."])
def test_wrapper_prefix_is_stripped(prefix):
    model = small_resnet()
    ckpt = prefixed(model, prefix)
    plan = match(model, ckpt)
    assert_well_formed(plan, model, ckpt)
    assert plan.ok
    assert plan.transforms == (f"strip '{prefix}'",)
    assert plan.mapping() == {s.name: prefix + s.name for s in model}
    d = decision(plan, "layer1.0.conv1.weight")
    assert d.stage == "prefix"
    assert d.reason == f"from '{prefix}layer1.0.conv1.weight' (strip '{prefix}'); same shape"


def test_prefix_is_added():
    model = prefixed(small_resnet(), "resnet.")
    ckpt = small_resnet()
    plan = match(model, ckpt)
    assert plan.ok and plan.transforms == ("add 'resnet.'",)
    assert plan.mapping()["resnet.fc.weight"] == "fc.weight"


def test_detector_backbone_into_classifier():
    model = small_resnet()
    ckpt = prefixed(small_resnet(fc=False), "backbone.body.") + [
        spec("backbone.fpn.inner_blocks.0.weight", 32, 16, 1, 1),
        spec("roi_heads.box_head.fc6.weight", 64, 128),
    ]
    plan = match(model, ckpt)
    assert_well_formed(plan, model, ckpt)
    assert plan.transforms == ("strip 'backbone.body.'",)
    assert plan.problems == ("fc.weight: not in the checkpoint", "fc.bias: not in the checkpoint")
    assert actions(plan)["fc.weight"] == "missing"
    assert "pass partial=True (on the command line: --partial) to keep the missing tensors at their init" in plan.suggestions
    assert {u.source: u.reason for u in plan.unused} == {
        "backbone.fpn.inner_blocks.0.weight": "not in the model",
        "roi_heads.box_head.fc6.weight": "not in the model",
    }

    plan = match(model, ckpt, partial=True)
    assert plan.ok and plan.partial
    d = decision(plan, "fc.bias")
    assert (d.action, d.stage, d.reason) == ("keep", "none", "not in the checkpoint; kept at init (partial=True)")
    assert len(plan.loads) == len(model) - 2


def bert(prefix: str = "", pooler: bool = True) -> list[TensorSpec]:
    specs = [spec("embeddings.word_embeddings.weight", 100, 16), spec("embeddings.position_embeddings.weight", 32, 16),
             spec("embeddings.LayerNorm.weight", 16), spec("embeddings.LayerNorm.bias", 16)]
    for i in range(2):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            specs += linear(f"encoder.layer.{i}.{part}", 16, 16)
        specs += linear(f"encoder.layer.{i}.intermediate.dense", 64, 16) + linear(f"encoder.layer.{i}.output.dense", 16, 64)
    if pooler:
        specs += linear("pooler.dense", 16, 16)
    return prefixed(specs, prefix)


def test_hf_head_checkpoint_into_base_model():
    model = bert()
    ckpt = bert("bert.") + linear("classifier", 2, 16)
    plan = match(model, ckpt)
    assert_well_formed(plan, model, ckpt)
    assert plan.ok and plan.transforms == ("strip 'bert.'",)
    assert plan.mapping()["pooler.dense.weight"] == "bert.pooler.dense.weight"
    assert {u.source: u.reason for u in plan.unused} == {
        "classifier.weight": "not in the model", "classifier.bias": "not in the model"}


def test_hf_base_checkpoint_into_head_model_needs_partial():
    model = bert("bert.") + linear("classifier", 2, 16)
    plan = match(model, bert())
    assert plan.transforms == ("add 'bert.'",)
    assert plan.problems == ("classifier.weight: not in the checkpoint", "classifier.bias: not in the checkpoint")
    assert match(model, bert(), partial=True).ok


def test_equally_good_prefixes_are_refused():
    model = small_resnet()
    ckpt = prefixed(model, "student.") + prefixed(model, "teacher.")
    plan = match(model, ckpt)
    assert plan.loads == ()
    assert not plan.ok
    assert any("rename=[(r'^student\\.', '')]" in s for s in plan.suggestions)
    assert all(u.reason.startswith("ambiguous") for u in plan.unused)


def test_single_segment_replace_is_not_evidence():
    # "1." -> "bn1." sharing only "weight" must not be learned as a prefix.
    model = bn("bn1", 8) + bn("bn2", 8)
    ckpt = bn("1", 8)
    plan = match(model, ckpt)
    assert plan.loads == ()
    assert plan.transforms == ()
    assert any("rename=[(r'^1\\.', 'bn1.')]" in s for s in plan.suggestions)


# -- shapes, dtypes, harmless differences ------------------------------------------------


def test_transfer_learning_head_shape_change():
    model = small_resnet(classes=10)
    ckpt = small_resnet(classes=1000)
    plan = match(model, ckpt)
    assert plan.problems == ("fc.weight: checkpoint has [1000, 16], model has [10, 16]",
                             "fc.bias: checkpoint has [1000], model has [10]")
    assert "pass partial=True (on the command line: --partial) to keep these layers at their init" in plan.suggestions
    assert actions(plan)["fc.weight"] == "skip_shape"

    plan = match(model, ckpt, partial=True)
    assert plan.ok
    d = decision(plan, "fc.weight")
    assert (d.action, d.source, d.source_shape, d.target_shape) == ("skip_shape", "fc.weight", (1000, 16), (10, 16))
    assert d.reason == "same name, but checkpoint has [1000, 16], model has [10, 16]; not loaded, kept at init (partial=True)"
    assert {u.source: u.reason for u in plan.unused} == {
        "fc.weight": "shape differs from 'fc.weight' ([1000, 16] vs [10, 16])",
        "fc.bias": "shape differs from 'fc.bias' ([1000] vs [10])",
    }
    assert len(plan.loads) == len(model) - 2


def test_shape_change_under_a_prefix_names_the_checkpoint_key():
    plan = match(linear("fc", 10, 16), prefixed(linear("fc", 1000, 16), "module."))
    assert plan.problems == ("fc.weight: checkpoint has [1000, 16] (as 'module.fc.weight'), model has [10, 16]",
                             "fc.bias: checkpoint has [1000] (as 'module.fc.bias'), model has [10]")


def test_missing_num_batches_tracked_is_harmless():
    model = small_resnet()
    ckpt = [s for s in model if not s.name.endswith("num_batches_tracked")]
    plan = match(model, ckpt)
    assert plan.ok
    d = decision(plan, "bn1.num_batches_tracked")
    assert (d.action, d.stage) == ("keep", "harmless")


def test_optional_keys_may_stay_at_init():
    model = linear("fc", 2, 2) + [spec("attn.mask", 4, 4)]
    plan = match(model, linear("fc", 2, 2), optional={"attn.mask"})
    assert plan.ok
    assert (decision(plan, "attn.mask").action, decision(plan, "attn.mask").stage) == ("keep", "harmless")


def test_fp16_checkpoint_is_cast():
    model = linear("fc", 4, 4)
    ckpt = [TensorSpec(s.name, s.shape, F16) for s in model]
    plan = match(model, ckpt)
    assert plan.ok
    assert decision(plan, "fc.weight").reason == "same name and shape; cast fp16 -> fp32"
    assert "cast fp16 -> fp32: 2 tensors (the checkpoint's dtype differs from the model's)" in plan.warnings


def test_float_to_integer_is_a_problem_not_a_cast():
    plan = match([spec("w", 4)], [spec("w", 4, dtype=torch.int8)])
    assert plan.problems == ("w: checkpoint has int8 (as 'w'), model has fp32; int to float is not a cast",)
    assert decision(plan, "w").action == "missing"
    assert match([spec("w", 4)], [spec("w", 4, dtype=torch.int8)], partial=True).ok


def test_num_batches_tracked_int32_is_cast_and_float_is_skipped():
    plan = match([spec("bn.num_batches_tracked", dtype=I64)], [spec("bn.num_batches_tracked", dtype=torch.int32)])
    assert plan.ok and decision(plan, "bn.num_batches_tracked").action == "load"
    plan = match([spec("bn.num_batches_tracked", dtype=I64)], [spec("bn.num_batches_tracked", dtype=F32)])
    assert plan.ok and decision(plan, "bn.num_batches_tracked").action == "keep"
    assert plan.warnings


def lm(head: bool = True, embed: bool = True) -> list[TensorSpec]:
    out = [spec("embed.weight", 50, 8)] if embed else []
    out += linear("block.proj", 8, 8)
    return out + ([spec("lm_head.weight", 50, 8)] if head else [])


def test_tied_head_is_filled_through_the_tie():
    tied = {"lm_head.weight": "embed.weight"}
    plan = match(lm(), lm(head=False), tied=tied)
    assert plan.ok
    d = decision(plan, "lm_head.weight")
    assert (d.action, d.stage, d.tied_to) == ("tied", "tie", "embed.weight")

    # both saved: the canonical key is loaded, the tied copy is not loaded twice
    plan = match(lm(), lm(), tied=tied)
    d = decision(plan, "lm_head.weight")
    assert plan.ok and (d.action, d.source, d.tied_to) == ("tied", "lm_head.weight", "embed.weight")
    assert d.reason.endswith("the checkpoint holds its own tensor 'lm_head.weight' for this tied weight: "
                             "checked equal to 'embed.weight' at load")  # by the loader (ckptfit.loading.ties)
    assert [(u.source, u.reason) for u in plan.unused] == [
        ("lm_head.weight", "the model ties 'lm_head.weight' to 'embed.weight'; checked equal to 'embed.weight' "
                           "at load, filled through the tie")]


def test_tied_only_in_checkpoint_fills_the_canonical_key():
    plan = match(lm(), lm(embed=False), tied={"lm_head.weight": "embed.weight"})
    assert plan.ok and plan.unused == ()
    d = decision(plan, "embed.weight")
    assert (d.action, d.source, d.stage) == ("load", "lm_head.weight", "tie")
    assert decision(plan, "lm_head.weight").action == "tied"


def test_tied_with_nothing_is_missing():
    plan = match(lm(), lm(head=False, embed=False), tied={"lm_head.weight": "embed.weight"})
    assert plan.problems == ("embed.weight: not in the checkpoint",
                             "lm_head.weight: tied to 'embed.weight', which is not loaded")


# -- stage 4: structural -----------------------------------------------------------------


def named_net() -> list[TensorSpec]:
    return conv("conv1", 8, 3) + bn("bn1", 8) + conv("conv2", 8, 8) + bn("bn2", 8)


def test_sequential_checkpoint_into_named_layers_is_aligned_by_order():
    model = named_net()
    ckpt = conv("0", 8, 3) + bn("1", 8) + conv("3", 8, 8) + bn("4", 8)
    plan = match(model, ckpt)
    assert_well_formed(plan, model, ckpt)
    assert plan.ok
    assert plan.mapping() == {
        "conv1.weight": "0.weight",
        **{f"bn1.{r}": f"1.{r}" for r in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        "conv2.weight": "3.weight",
        **{f"bn2.{r}": f"4.{r}" for r in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
    }
    # the convs have shapes nothing else has; the two BatchNorms only their order tells apart,
    # and both sides number them in that order
    assert plan.transforms == ("structural alignment of 4 modules (2 by unique signature, 2 by order)",)
    d = decision(plan, "bn2.running_var")
    assert d.stage == "structural" and d.evidence == "order"
    assert d.reason == ("from '4.running_var' (module '4' aligned with 'bn2' by order, numbered alike "
                        "(same roles and shapes)); same shape")
    assert decision(plan, "conv1.weight").evidence == "unique signature"


def test_structural_refuses_to_guess_between_equal_modules():
    model = named_net()
    ckpt = conv("0", 8, 3) + bn("1", 8) + conv("3", 8, 8)  # one of the two BatchNorms is gone
    plan = match(model, ckpt)
    assert_well_formed(plan, model, ckpt)
    # the convs are unique by shape and may be aligned; the BatchNorm may be bn1 or bn2
    assert plan.mapping() == {"conv1.weight": "0.weight", "conv2.weight": "3.weight"}
    assert {actions(plan)[f"bn{i}.weight"] for i in (1, 2)} == {"missing"}
    assert any("rename=[(r'^1\\.', 'bn1.')]" in s for s in plan.suggestions)
    assert ("bn1.weight: ambiguous: checkpoint module '1' could fill it, but nothing tells which "
            "(see the suggestion)") in plan.problems


def test_structural_refuses_when_only_signature_is_shared():
    plan = match(bn("bn1", 8) + bn("bn2", 8), bn("norm", 8))
    assert plan.loads == () and not plan.ok
    assert any("'bn1', 'bn2'" in s for s in plan.suggestions)


def test_renamed_head_is_aligned_by_unique_signature():
    model = small_resnet()
    ckpt = small_resnet(fc=False) + linear("classifier", 10, 16)
    plan = match(model, ckpt)
    assert plan.ok
    assert plan.mapping()["fc.weight"] == "classifier.weight"
    assert decision(plan, "fc.bias").stage == "structural"


def test_old_style_digit_segments():
    model = bn("features.denseblock1.denselayer1.norm1", 8) + conv("features.denseblock1.denselayer1.conv1", 8, 8)
    ckpt = bn("features.denseblock1.denselayer1.norm.1", 8) + conv("features.denseblock1.denselayer1.conv.1", 8, 8)
    plan = match(model, ckpt)
    assert plan.ok
    assert plan.mapping()["features.denseblock1.denselayer1.norm1.weight"] == "features.denseblock1.denselayer1.norm.1.weight"
    assert plan.transforms[0].startswith("join digit segments")


def test_sorted_checkpoint_does_not_align_repeated_modules_by_file_order():
    # A safetensors-like file lists keys alphabetically: "10" before "2". Repeated
    # identical modules must not be aligned by that order.
    model = [s for i in range(12) for s in linear(f"blocks.{i}.proj", 4, 4)]
    ckpt = sorted((s for i in range(12) for s in linear(f"layers.{i}.fc", 4, 4)), key=lambda s: s.name)
    plan = match(model, ckpt)
    for d in plan.loads:
        assert d.target.split(".")[1] == d.source.split(".")[1]


# -- stage 1: user rules ---------------------------------------------------------------


def test_rename_rules():
    model = named_net()
    ckpt = conv("0", 8, 3) + bn("1", 8) + conv("3", 8, 8) + bn("4", 8)
    rules = [(r"^0\.", "conv1."), (r"^1\.", "bn1."), (r"^3\.", "conv2."), (r"^4\.", "bn2."), (r"^9\.", "x.")]
    plan = match(model, ckpt, rename=rules)
    assert plan.ok
    assert plan.transforms[:2] == ("rename r'^0\\.' -> 'conv1.'", "rename r'^1\\.' -> 'bn1.'")
    assert "rename r'^9\\.' -> 'x.' matched no checkpoint key" in plan.warnings
    d = decision(plan, "conv1.weight")
    assert (d.stage, d.source) == ("rule", "0.weight")
    assert d.reason == "from '0.weight' (rename r'^0\\.' -> 'conv1.'); same shape"


def test_rename_rule_prefers_the_renamed_key():
    model = linear("fc", 2, 2)
    ckpt = linear("fc", 2, 2) + prefixed(linear("fc", 2, 2), "ema.")
    plan = match(model, ckpt, rename=[(r"^ema\.", "")])
    assert plan.mapping() == {"fc.weight": "ema.fc.weight", "fc.bias": "ema.fc.bias"}
    assert {u.source: u.reason for u in plan.unused} == {
        "fc.weight": "another tensor chosen for 'fc.weight' ('ema.fc.weight')",
        "fc.bias": "another tensor chosen for 'fc.bias' ('ema.fc.bias')"}
    # without the rule, the EMA copy is reported as such
    plan = match(model, ckpt)
    assert plan.mapping() == {"fc.weight": "fc.weight", "fc.bias": "fc.bias"}
    assert {u.reason for u in plan.unused} == {"an EMA copy of the weights, not loaded"}


def test_bad_rename_rule_is_a_value_error():
    with pytest.raises(ValueError, match="is not a"):
        match([spec("a", 1)], [spec("a", 1)], rename=[("(", "x")])


def test_exclude_keeps_the_head_at_init():
    model = small_resnet(classes=10)
    ckpt = small_resnet(classes=1000)
    plan = match(model, ckpt, exclude=["fc.*"])
    assert plan.ok
    d = decision(plan, "fc.weight")
    assert (d.action, d.stage) == ("keep", "user")
    assert {u.source: u.reason for u in plan.unused} == {"fc.weight": "excluded by rule", "fc.bias": "excluded by rule"}


def test_exclude_matches_checkpoint_keys_too():
    model = small_resnet()
    ckpt = prefixed(small_resnet(), "module.")
    plan = match(model, ckpt, exclude=["module.fc.*"])
    assert plan.ok
    assert actions(plan)["fc.weight"] == "keep"
    assert plan.transforms == ("strip 'module.'",)


def test_include_loads_only_what_it_names():
    model = small_resnet()
    plan = match(model, model, include=["layer1.*"], exclude=["*.num_batches_tracked"])
    assert plan.ok
    loaded = {d.target for d in plan.loads}
    assert loaded == {s.name for s in model if s.name.startswith("layer1.") and "num_batches" not in s.name}
    assert decision(plan, "conv1.weight").stage == "user"
    assert {u.reason for u in plan.unused} == {"excluded by rule"}


# -- scale -------------------------------------------------------------------------------


def test_twenty_thousand_keys_plan_quickly():
    model = [spec(f"blocks.{i}.{p}.weight", 64 + i % 7, 64) for i in range(5000) for p in ("q", "k", "v", "o")]
    ckpt = prefixed(model, "model._orig_mod.")
    plan = match(model, ckpt)
    assert plan.ok and len(plan.loads) == 20_000
    # unrelated names: every stage has to look and give up
    plan = match(model, [spec(f"x{i}.y.{i % 13}", 3, i % 17 + 1) for i in range(20_000)], partial=True)
    assert plan.loads == ()  # completes: the number of steps each stage takes is tests/test_scaling.py's
