"""Property tests of structural alignment on real model key sets: load exactly or refuse.

Each example takes a real model's state-dict specs (torchvision, timm and transformers models
with tiny configs, built on the meta device), renames some of its submodules in the
checkpoint (to an opaque name, or to a realistic alias such as ``query`` -> ``q``), declares
same-shaped sibling modules in another order in the model, and checks that the plan either
loads every tensor from the checkpoint tensor it came from, or refuses; never anything else.

A fast subset runs by default; ``CKPTFIT_LONG=1`` runs thousands of examples.
"""
from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptfit.matching import match
from ckptfit.plans import TensorSpec

LONG = os.environ.get("CKPTFIT_LONG", "") not in ("", "0")
EXAMPLES = 3000 if LONG else 30


def _specs(model: torch.nn.Module) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


def _torchvision(name: str):
    import torchvision

    with torch.device("meta"):
        return _specs(getattr(torchvision.models, name)(weights=None))


def _timm(name: str, **kw):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        return _specs(timm.create_model(name, pretrained=False, **kw))


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    if kind == "bert":
        cfg, cls = transformers.BertConfig(**common), transformers.BertModel
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        cls = transformers.GPT2Model
    else:
        cfg, cls = transformers.LlamaConfig(**common, num_key_value_heads=2), transformers.LlamaModel
    with torch.device("meta"):
        return _specs(cls(cfg))


MODELS = {
    "resnet18": lambda: _torchvision("resnet18"),
    "mobilenet_v3_small": lambda: _torchvision("mobilenet_v3_small"),
    "vit_tiny": lambda: _timm("vit_tiny_patch16_224", depth=2),
    "convnext_atto": lambda: _timm("convnext_atto"),
    "bert": lambda: _hf("bert"),
    "gpt2": lambda: _hf("gpt2"),
    "llama": lambda: _hf("llama"),
}
_CACHE: dict[str, list[TensorSpec]] = {}

# Realistic aliases a re-implementation uses for a name token.
ALIASES = {"query": "q", "key": "k", "value": "v", "downsample": "down", "upsample": "up", "attention": "attn",
           "attn": "attention", "output": "out", "classifier": "head", "fc": "head", "head": "classifier",
           "encoder": "enc", "decoder": "dec", "embeddings": "emb", "proj": "projection", "norm": "ln",
           "ln": "norm", "mlp": "ffn", "q": "query", "k": "key", "v": "value", "o": "out"}


def specs_of(name: str) -> list[TensorSpec]:
    if name not in _CACHE:
        _CACHE[name] = MODELS[name]()
    return _CACHE[name]


def _children(keys: list[str]) -> dict[str, list[str]]:
    """parent module path -> its child segments, in declaration order."""
    out: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        segs = k.split(".")[:-1]
        for i in range(len(segs)):
            parent, child = ".".join(segs[:i]), segs[i]
            if child not in out[parent]:
                out[parent].append(child)
    return out


def _subtree(specs: list[TensorSpec], path: str) -> tuple:
    n = len(path) + 1
    return tuple((s.name[n:], s.shape, s.dtype) for s in specs if s.name.startswith(path + "."))


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def look_alike_groups(specs: list[TensorSpec]) -> list[tuple[str, list[str]]]:
    """(parent, children) for every parent with two or more children of identical subtrees."""
    groups = []
    for parent, kids in _children([s.name for s in specs]).items():
        by_sig: dict[tuple, list[str]] = defaultdict(list)
        for kid in kids:
            sig = _subtree(specs, _join(parent, kid))
            if sig:
                by_sig[sig].append(kid)
        groups += [(parent, same) for same in by_sig.values() if len(same) >= 2]
    return groups


def _opaque(rng: random.Random) -> str:
    return "zz" + "".join(rng.choice("jkqxw") for _ in range(4))  # no token of a real model resembles it


def _alias(segment: str, rng: random.Random) -> str:
    import re

    tokens = re.findall(r"[a-z]+|\d+", segment)
    if tokens and tokens[0] in ALIASES and rng.random() < 0.8:
        return ALIASES[tokens[0]] + segment[len(tokens[0]):]
    return _opaque(rng)


@dataclass(repr=False)
class Case:
    target: list[TensorSpec]
    source: list[TensorSpec]
    truth: dict[str, str]  # checkpoint key -> the model key it came from
    params: str

    def __repr__(self) -> str:
        return f"Case({self.params})"


@st.composite
def cases(draw) -> Case:
    model = draw(st.sampled_from(sorted(MODELS)))
    base = specs_of(model)
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    groups = look_alike_groups(base)
    n_perm = draw(st.integers(0, 2))
    n_ren = draw(st.integers(0, 3))
    sort_source = draw(st.integers(0, 5)) == 0

    # the model declares some look-alike siblings in another order
    order = [s.name for s in base]
    permuted = []
    for _ in range(min(n_perm, len(groups))):
        parent, kids = groups[rng.randrange(len(groups))]
        shuffled = kids[:]
        rng.shuffle(shuffled)
        blocks = {kid: [k for k in order if k.startswith(_join(parent, kid) + ".")] for kid in kids}
        slots = sorted(i for kid in kids for i, k in enumerate(order) if k.startswith(_join(parent, kid) + "."))
        new_keys = [k for kid in shuffled for k in blocks[kid]]
        for i, k in zip(slots, new_keys):
            order[i] = k
        permuted.append((parent, shuffled))
    by_name = {s.name: s for s in base}
    target = [by_name[k] for k in order]

    # the checkpoint renames some submodules, mostly look-alike siblings (or their parents)
    paths = sorted({".".join(s.name.split(".")[:i]) for s in base for i in range(1, len(s.name.split(".")))})
    paths = [p for p in paths if not p.split(".")[-1].isdigit()]
    favoured = [_join(parent, kid) for parent, kids in groups for kid in kids if not kid.isdigit()]
    renames: dict[str, str] = {}
    for _ in range(n_ren):
        pool = favoured if favoured and rng.random() < 0.7 else paths
        if not pool:
            break
        path = rng.choice(pool)
        new_seg = _alias(path.split(".")[-1], rng) if rng.random() < 0.6 else _opaque(rng)
        renames[path] = new_seg

    def renamed(key: str) -> str:
        segs = key.split(".")
        out = list(segs)
        for i in range(len(segs) - 1):
            path = ".".join(segs[:i + 1])
            if path in renames:
                out[i] = renames[path]
        return ".".join(out)

    source, truth = [], {}
    for s in base:
        name = renamed(s.name)
        if name in truth:  # an alias collided with a sibling's own name: keep this case simple
            name = s.name
        truth[name] = s.name
        source.append(TensorSpec(name, s.shape, s.dtype))
    if len(set(truth)) != len(base):
        source, truth = list(base), {s.name: s.name for s in base}
    if sort_source:
        source.sort(key=lambda s: s.name)
    params = f"model={model!r}, permuted={permuted}, renames={renames}, sort_source={sort_source}"
    return Case(target, source, truth, params)


def check(case: Case) -> None:
    plan = match(case.target, case.source)
    assert [d.target for d in plan.decisions] == [t.name for t in case.target]
    for d in plan.decisions:
        if d.source is not None:
            assert case.truth[d.source] == d.target, f"{d.source} -> {d.target} ({d.stage}: {d.reason})"
    if plan.ok:
        # a load that goes ahead loads everything, each from where it came from
        for d in plan.decisions:
            assert d.action in ("load", "tied") or d.target.endswith("num_batches_tracked"), d
    if all(truth == src for src, truth in case.truth.items()):
        assert plan.ok, plan.problems[:3]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_renamed_and_reordered_look_alikes_load_exactly_or_are_refused(case: Case):
    check(case)


def test_the_generator_makes_real_look_alikes():
    # the property above is only as good as its damage: every model offers look-alike siblings
    for name in MODELS:
        assert look_alike_groups(specs_of(name)), name
