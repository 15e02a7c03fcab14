"""Property tests of the matcher on real torchvision key sets: never a wrong mapping.

Each example takes a real model's state-dict specs (built on the meta device, so it is
instant), damages a copy the way real checkpoints differ (wrapper prefixes, renamed
submodules, old key styles, dropped buffers, a resized head, lost keys, extra tensors,
alphabetical order) while tracking which model key every checkpoint key came from, and
checks that the plan never pairs a checkpoint key with any other model key.
"""
from __future__ import annotations

import ast
import os
import random
import re
from dataclasses import dataclass

import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptfit.matching import match
from ckptfit.plans import Plan, TensorSpec


def _specs(ctor) -> list[TensorSpec]:
    with torch.device("meta"):
        model = ctor(weights=None)
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


MODELS = {
    "resnet18": _specs(torchvision.models.resnet18),
    "mobilenet_v3_small": _specs(torchvision.models.mobilenet_v3_small),
    "densenet121": _specs(torchvision.models.densenet121),
}
# Module segments that a re-implementation might call differently (never the leaf role).
SEGMENTS = {name: sorted({seg for s in specs for seg in s.name.split(".")[:-1]}) for name, specs in MODELS.items()}
WRAPPERS = ["module", "_orig_mod", "model", "net", "backbone", "encoder", "student", "body"]
TARGET_PREFIXES = ["", "", "", "resnet.", "backbone.", "model."]
LONG = os.environ.get("CKPTFIT_LONG", "") not in ("", "0")  # CKPTFIT_LONG=1: thousands of examples
OLD_STYLE = re.compile(r"(?<=\b)(norm|conv)(\d+)(?=\.)")


@dataclass(repr=False)
class Scenario:
    target: list[TensorSpec]
    source: list[TensorSpec]
    truth: dict[str, str | None]  # checkpoint key -> the model key it came from (None: noise)
    resized: set[str]  # model keys whose checkpoint tensor has another shape
    partial: bool
    rename: list[tuple[str, str]]  # rules a user might pass (undoing some renamed segments)
    easy: bool  # only prefixes, dropped num_batches_tracked, a resized head, order
    clean_renames: bool  # renamed segments, but nothing lost, added or resized
    params: str = ""  # how the checkpoint was made, for a readable falsifying example

    def __repr__(self) -> str:
        return f"Scenario({self.params})"


@st.composite
def scenarios(draw) -> Scenario:
    model = draw(st.sampled_from(sorted(MODELS)))
    base = MODELS[model]
    tprefix = draw(st.sampled_from(TARGET_PREFIXES))
    wrappers = draw(st.lists(st.sampled_from(WRAPPERS), max_size=3))
    sprefix = "".join(w + "." for w in wrappers)
    renamed = draw(st.lists(st.sampled_from(SEGMENTS[model]), max_size=2, unique=True))
    old_style = draw(st.booleans())
    nbt = draw(st.sampled_from(["keep", "drop_all", "drop_some"]))
    resize_head = draw(st.booleans())
    drops = draw(st.lists(st.integers(0, len(base) - 1), max_size=3, unique=True))
    extras = draw(st.integers(0, 2))
    sort_source = draw(st.booleans())
    partial = draw(st.booleans())
    undo = draw(st.lists(st.sampled_from(renamed), unique=True)) if renamed else []
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))

    # opaque new names, without digits: numbers in module names are evidence (layer1 is stage1), so a
    # rename that swaps them ("1" -> "renamed0x", "0" -> "renamed1x") would be a lie, not a rename
    new_name = {seg: f"renamed{'abcdefgh'[k]}x" for k, seg in enumerate(renamed)}
    head = [s.name for s in base if s.name.endswith((".weight", ".bias"))][-2:]  # the classifier

    target = [TensorSpec(tprefix + s.name, s.shape, s.dtype) for s in base]
    source, truth, resized = [], {}, set()
    for i, s in enumerate(base):
        if i in drops:
            continue
        if s.name.endswith("num_batches_tracked") and (nbt == "drop_all" or (nbt == "drop_some" and rng.random() < .5)):
            continue
        segs = s.name.split(".")
        name = ".".join([new_name.get(seg, seg) for seg in segs[:-1]] + segs[-1:])
        if old_style:
            name = OLD_STYLE.sub(r"\1.\2", name)
        shape = s.shape
        if resize_head and s.name in head:
            shape = (shape[0] + 7, *shape[1:])
            resized.add(tprefix + s.name)
        source.append(TensorSpec(sprefix + name, shape, s.dtype))
        truth[sprefix + name] = tprefix + s.name
    for k in range(extras):
        source.append(TensorSpec(f"aux_head.{k}.weight", (997 + k, 3), torch.float32))
        truth[f"aux_head.{k}.weight"] = None
    if sort_source:
        source.sort(key=lambda s: s.name)
    assert len(truth) == len(source), "the damage made two checkpoint keys equal"
    # rules act once per key, so a segment that occurs twice in a key is only half undone
    rename = [(rf"(^|\.){new_name[seg]}(\.|$)", rf"\g<1>{seg}\g<2>") for seg in undo]
    easy = not renamed and not old_style and not drops and not extras
    clean = not drops and not extras and not resize_head and not sort_source
    params = (f"model={model!r}, tprefix={tprefix!r}, sprefix={sprefix!r}, renamed={renamed!r}, "
              f"old_style={old_style}, nbt={nbt!r}, resize_head={resize_head}, drops={[base[i].name for i in drops]}, "
              f"extras={extras}, sort_source={sort_source}, partial={partial}, undo={undo}")
    return Scenario(target, source, truth, resized, partial, rename, easy, clean, params)


def check_plan(plan: Plan, sc: Scenario) -> None:
    # one decision per model key, in order
    assert [d.target for d in plan.decisions] == [t.name for t in sc.target]
    # never a wrong mapping: any checkpoint key a decision names is the one that came from it
    for d in plan.decisions:
        if d.source is not None:
            assert sc.truth[d.source] == d.target, f"{d.source} -> {d.target} ({d.stage}: {d.reason})"
    # a resized tensor is never loaded; whatever is loaded has the model's shape
    for d in plan.loads:
        assert d.target not in sc.resized
        assert d.source_shape == d.target_shape
    # every checkpoint key is loaded once or reported unused, never both
    loaded = [d.source for d in plan.loads]
    unused = [u.source for u in plan.unused]
    assert len(set(loaded)) == len(loaded) and len(set(unused)) == len(unused)
    assert set(loaded).isdisjoint(unused)
    assert set(loaded) | set(unused) == set(sc.truth)
    # strictness
    if sc.partial:
        assert plan.problems == ()
    else:
        assert plan.ok == all(d.action in ("load", "tied", "keep") for d in plan.decisions)
    assert all(d.action != "keep" or d.stage in ("harmless", "user", "none", "tie") for d in plan.decisions)


@settings(max_examples=2000 if LONG else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_never_a_wrong_mapping(sc: Scenario):
    plan = match(sc.target, sc.source, partial=sc.partial, rename=sc.rename)
    check_plan(plan, sc)
    if sc.easy:
        # prefixes alone must be fully recovered
        for d in plan.decisions:
            if d.target in sc.resized:
                assert d.action == "skip_shape"
            elif d.target.endswith("num_batches_tracked"):
                assert d.action in ("load", "keep")
            else:
                assert d.action == "load", d
    if sc.clean_renames and not all(d.action in ("load", "keep") for d in plan.decisions):
        # renamed submodules with nothing lost line up by structure, or, where only the order
        # tells look-alikes apart and the names do not confirm it, are refused with a rename=
        # that, followed literally (the declaration order's reading: nothing was reordered), loads it all
        offered = [s for s in plan.suggestions if "have the same roles and shapes, but" in s]
        assert offered, plan.problems[:5]
        rules = [r for s in offered for r in ast.literal_eval(re.findall(r"rename=(\[.*?\])(?:;|$)", s)[-1])]
        again = match(sc.target, sc.source, partial=sc.partial, rename=sc.rename + rules)
        check_plan(again, sc)
        assert all(d.action in ("load", "keep") for d in again.decisions), again.problems[:5]


@settings(max_examples=1000 if LONG else 30, deadline=None)
@given(scenarios(), st.lists(st.sampled_from(["*.num_batches_tracked", "fc.*", "classifier.*", "layer1.*",
                                              "features.1*"]), max_size=2))
def test_exclusions_never_load_an_excluded_key(sc: Scenario, exclude: list[str]):
    plan = match(sc.target, sc.source, partial=sc.partial, rename=sc.rename, exclude=exclude)
    check_plan(plan, sc)
    from fnmatch import fnmatchcase
    for d in plan.loads:
        assert not any(fnmatchcase(n, p) for p in exclude for n in (d.target, d.source))
