"""Property tests of source-aware ports (ckptfit.provenance): exact or refused, never wrong.

Each example draws a small network (linear layers, each optionally followed by a LayerNorm or
an activation), a source implementation of it, and a re-implementation that declares the same
layers in a random order under random names (and sometimes another LayerNorm eps, or the layers
applied in another order; activations stay where they are: they carry no weights, and where they
sit is not something a port can see). Loading the source's weights into the re-implementation with
``source_model=`` must either give the source's outputs or be refused; when only names and
declaration order differ, it must load.
"""
from __future__ import annotations

import os
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckptfit

LONG = os.environ.get("CKPTFIT_LONG", "") not in ("", "0")  # CKPTFIT_LONG=1: many more examples
NAMES = ["fc", "proj", "dense", "linear", "layer", "q", "k", "v", "norm", "ln", "out", "head", "mlp", "a", "b"]


class Source(nn.Module):
    """Layers applied in the order given: ('linear', in, out) / ('norm', width, eps) / ('act',)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(_layer(s) for s in spec)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


class Port(nn.Module):
    """The same layers, declared in ``order`` under ``names``, applied in ``apply`` order."""

    def __init__(self, spec, order, names, apply):
        super().__init__()
        self.keys = [None] * len(spec)
        for i in order:
            setattr(self, names[i], _layer(spec[i]))
            self.keys[i] = names[i]
        self.apply_order = apply

    def forward(self, x):
        for i in self.apply_order:
            x = getattr(self, self.keys[i])(x)
        return x


def _layer(s):
    if s[0] == "linear":
        return nn.Linear(s[1], s[2])
    if s[0] == "norm":
        return nn.LayerNorm(s[1], eps=s[2])
    return nn.Tanh()


@st.composite
def networks(draw):
    widths = draw(st.lists(st.sampled_from([4, 6, 8]), min_size=2, max_size=6))
    spec = []
    for a, b in zip(widths, widths[1:]):
        spec.append(("linear", a, b))
        extra = draw(st.sampled_from(["", "norm", "act"]))
        if extra == "norm":
            spec.append(("norm", b, 1e-5))
        elif extra == "act":
            spec.append(("act",))
    seed = draw(st.integers(0, 2**16))
    mutation = draw(st.sampled_from(["", "", "eps", "swap"]))
    return widths[0], spec, seed, mutation


@settings(max_examples=600 if LONG else 25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_source_aware_port_is_exact_or_refused(net):
    width, spec, seed, mutation = net
    rng = random.Random(seed)
    torch.manual_seed(seed)
    src = Source(spec).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.5)
    order = list(range(len(spec)))
    rng.shuffle(order)
    names = [f"{rng.choice(NAMES)}{i}_{rng.randrange(100)}" for i in range(len(spec))]
    apply = list(range(len(spec)))
    port_spec = list(spec)
    if mutation == "eps":
        norms = [i for i, s in enumerate(spec) if s[0] == "norm"]
        if norms:
            i = rng.choice(norms)
            port_spec[i] = ("norm", spec[i][1], 1e-3)
    elif mutation == "swap":  # two adjacent layers with weights used in the other order (activations carry no
        # weights: a port cannot see where they sit, and is not claimed to)
        pairs = [i for i in range(len(spec) - 1) if spec[i][0] != "act" and spec[i + 1][0] != "act"]
        if pairs:
            i = rng.choice(pairs)
            apply[i], apply[i + 1] = apply[i + 1], apply[i]
    try:
        model = Port(port_spec, order, names, apply).eval()
        x = torch.randn(3, width)
        model(x)  # a swap may not even run (widths differ): nothing to port then
    except RuntimeError:
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ckptfit.load(model, src.state_dict(), source_model=lambda: Source(spec))
    except ckptfit.LoadError:
        assert mutation, "only names and declaration order differ: the port must load"
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused: untouched
        return
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5), (spec, mutation, apply)
