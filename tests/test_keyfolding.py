"""Key folding: short patterns a person reads, and never a key that was not given."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfit.keyfolding import expand_pattern, fold_keys, fold_pairs, group_by_module

torchvision = pytest.importorskip("torchvision")


def expand_all(patterns: list[str]) -> list[str]:
    return [key for pattern in patterns for key in expand_pattern(pattern)]


def assert_lossless(keys: list[str]) -> list[str]:
    patterns = fold_keys(keys)
    expanded = expand_all(patterns)
    assert len(expanded) == len(set(expanded)), "patterns overlap"
    assert set(expanded) == set(keys)
    return patterns


def resnet_keys(name: str) -> list[str]:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    return list(model.state_dict())


def test_resnet18_folds_to_a_few_lines():
    patterns = assert_lossless(resnet_keys("resnet18"))
    assert patterns == [
        "conv1.weight",
        "bn1.{weight,bias,running_mean,running_var,num_batches_tracked}",
        "layer{1..4}.{0,1}.conv{1,2}.weight",
        "layer{1..4}.{0,1}.bn{1,2}.{weight,bias,running_mean,running_var,num_batches_tracked}",
        "layer{2..4}.0.downsample.0.weight",
        "layer{2..4}.0.downsample.1.{weight,bias,running_mean,running_var,num_batches_tracked}",
        "fc.{weight,bias}",
    ]


def test_downsample_only_where_it_exists():
    # layer1 has no downsample: no pattern may claim layer1.0.downsample.
    keys = resnet_keys("resnet18")
    patterns = fold_keys(keys)
    assert "layer1.0.downsample.0.weight" not in expand_all(patterns)
    assert_lossless(resnet_keys("resnet50"))


def test_fold_conv1_across_layers_and_blocks():
    keys = [f"layer{i}.{b}.conv1.weight" for i in range(1, 5) for b in (0, 1)]
    assert fold_keys(keys) == ["layer{1..4}.{0,1}.conv1.weight"]


def test_weight_before_bias_in_input_order():
    assert fold_keys(["fc.weight", "fc.bias"]) == ["fc.{weight,bias}"]
    assert fold_keys(["fc.bias", "fc.weight"]) == ["fc.{bias,weight}"]


def test_bert_like_keys():
    leaves = [
        "attention.self.query.weight", "attention.self.query.bias",
        "attention.self.key.weight", "attention.self.key.bias",
        "attention.self.value.weight", "attention.self.value.bias",
        "attention.output.dense.weight", "attention.output.dense.bias",
        "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
        "intermediate.dense.weight", "intermediate.dense.bias",
        "output.dense.weight", "output.dense.bias",
        "output.LayerNorm.weight", "output.LayerNorm.bias",
    ]  # fmt: skip
    keys = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"]
    keys += [f"encoder.layer.{i}.{leaf}" for i in range(12) for leaf in leaves]
    keys += ["pooler.dense.weight", "pooler.dense.bias"]
    patterns = assert_lossless(keys)
    assert patterns == [
        "embeddings.{word_embeddings,position_embeddings}.weight",
        "encoder.layer.{0..11}.attention.self.{query,key,value}.{weight,bias}",
        "encoder.layer.{0..11}.attention.output.{dense,LayerNorm}.{weight,bias}",
        "encoder.layer.{0..11}.intermediate.dense.{weight,bias}",
        "encoder.layer.{0..11}.output.{dense,LayerNorm}.{weight,bias}",
        "pooler.dense.{weight,bias}",
    ]


def test_blocks_range():
    assert fold_keys(f"blocks.{i}.attn.qkv.weight" for i in range(12)) == ["blocks.{0..11}.attn.qkv.weight"]


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        ([0, 1], "{0,1}"),
        ([0, 1, 2], "{0..2}"),
        ([0, 1, 2, 3, 7], "{0..3,7}"),
        ([0, 2, 4], "{0,2,4}"),
        ([5, 6, 8, 9, 10], "{5,6,8..10}"),
    ],
)
def test_integer_ranges(numbers, expected):
    assert fold_keys(f"h.{n}.w" for n in numbers) == [f"h.{expected}.w"]


def test_embedded_numbers():
    assert fold_keys(f"layer{i}.weight" for i in range(1, 5)) == ["layer{1..4}.weight"]
    assert fold_keys(f"block{i}_conv.weight" for i in (1, 2)) == ["block{1,2}_conv.weight"]
    # Different heads around the number do not fold around it.
    assert fold_keys(["a1.w", "b2.w"]) == ["{a1,b2}.w"]
    # Leading zeros survive.
    assert_lossless(["x01.w", "x02.w", "x03.w", "x1.w"])


def test_mixed_lengths_and_unrelated_names():
    keys = ["a", "a.b", "a.b.c", "x.y", "z.y", "x.w"]
    assert_lossless(keys)


def test_special_characters_are_escaped():
    keys = ["a{b}.w", "a,c.w", "back\\slash.w", "e..f", ".lead", "trail.", ""]
    assert_lossless(keys)


def test_duplicates_and_empty():
    assert fold_keys([]) == []
    assert fold_keys(["a.b", "a.b"]) == ["a.b"]


def test_expand_pattern_errors():
    with pytest.raises(ValueError, match="unclosed"):
        expand_pattern("a.{b,c")
    with pytest.raises(ValueError, match="unmatched"):
        expand_pattern("a.b}")
    with pytest.raises(ValueError, match="nested"):
        expand_pattern("a.{b,{c}}")
    with pytest.raises(ValueError, match="empty range"):
        expand_pattern("a.{3..1}")


def test_twenty_thousand_keys():
    keys = [
        f"model.layers.{i}.{m}.{p}.weight"
        for i in range(1000)
        for m in ("self_attn", "mlp")
        for p in "qkvoabcdef"
    ]
    patterns = fold_keys(keys)  # ~0.2 s here; timings live in bench/, never in tests
    assert patterns == ["model.layers.{0..999}.{self_attn,mlp}.{q,k,v,o,a,b,c,d,e,f}.weight"]


segment = st.one_of(
    st.sampled_from(["weight", "bias", "conv", "bn", "layer", "a", "b"]),
    st.integers(0, 12).map(str),
    st.tuples(st.sampled_from(["layer", "blk", "x"]), st.integers(0, 6)).map(lambda t: f"{t[0]}{t[1]}"),
    st.text("ab01{},\\_", max_size=3),
)
key = st.lists(segment, min_size=1, max_size=5).map(".".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(key, max_size=60))
def test_fold_is_lossless(keys):
    assert_lossless(keys)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(["weight", "bias"])), max_size=30))
def test_fold_is_lossless_on_dense_grids(triples):
    keys = [f"layer{a}.{b}.{leaf}" for a, b, leaf in triples]
    assert_lossless(keys)


def test_fold_pairs():
    assert fold_pairs([("0.weight", "conv1.weight"), ("0.bias", "conv1.bias")]) == [
        "0.{weight,bias} -> conv1.{weight,bias}"
    ]
    pairs = [(f"blocks.{i}.attn.qkv.{w}", f"encoder.layer.{i}.attention.qkv.{w}") for i in range(12) for w in ("weight", "bias")]
    assert fold_pairs(pairs) == ["blocks.{0..11}.attn.qkv.{weight,bias} -> encoder.layer.{0..11}.attention.qkv.{weight,bias}"]
    # Numbers that do not correspond stay on their own lines.
    assert fold_pairs([("0.w", "a.w"), ("1.w", "b.w")]) == ["0.w -> a.w", "1.w -> b.w"]
    assert fold_pairs([("x.w", "y.v")], sep=" = ") == ["x.w = y.v"]


def test_group_by_module():
    assert group_by_module(["fc.weight", "fc.bias", "scale", "a.b.c"]) == {
        "fc": ["weight", "bias"],
        "": ["scale"],
        "a.b": ["c"],
    }


def expand_pair_line(line: str) -> set[tuple[str, str]]:
    """Expand ``src -> tgt`` where the n-th brace on each side is the same choice."""
    from itertools import product

    from ckptfit.keyfolding import _parse

    left, right = (_parse(side) for side in line.split(" -> "))
    braces_left = [c for c in left if len(c) > 1]
    braces_right = [c for c in right if len(c) > 1]
    assert braces_left == braces_right
    out = set()
    for choice in product(*braces_left):
        sides = []
        for side in (left, right):
            it = iter(choice)
            sides.append("".join(next(it) if len(c) > 1 else c[0] for c in side))
        out.add(tuple(sides))
    return out


pair_segment = st.one_of(st.sampled_from(["w", "b", "attn", "blocks", "layer"]), st.integers(0, 4).map(str))
pair_key = st.lists(pair_segment, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(pair_key, pair_key), max_size=30, unique_by=lambda p: p[0]))
def test_fold_pairs_is_lossless(pairs):
    lines = fold_pairs(pairs)
    expanded = [pair for line in lines for pair in expand_pair_line(line)]
    assert set(expanded) == set(pairs)
