"""No step of open / plan / load / build is quadratic in the number of tensors or modules.

Asserted on operation counts (Python function calls, counted by cProfile), not on time: the
same flat model at n and 4n layers must cost at most ~4x the calls. A step that scans every
tensor for every tensor would show as ~16x.
"""
from __future__ import annotations

import cProfile
import pstats

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptfit

SMALL, LARGE = 200, 800  # layers; 2 tensors each


def flat(n: int) -> nn.Module:
    """A flat model (one container, n children): the layout that makes per-child filtering quadratic."""
    return nn.ModuleList(nn.Linear(2, 2) for _ in range(n))


def calls(fn) -> int:
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return pstats.Stats(prof).total_calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for n in (SMALL, LARGE):
        torch.manual_seed(n)
        sd = {k: v.clone() for k, v in flat(n).state_dict().items()}
        path = tmp_path_factory.mktemp("scaling") / f"flat{n}.safetensors"
        save_file(sd, str(path))
        torch.save(sd, str(path.with_suffix(".pt")))
        out[n] = (path, path.with_suffix(".pt"), sd)
    return out


@pytest.mark.parametrize("fmt", [0, 1], ids=["safetensors", "torch-zip"])
@pytest.mark.parametrize("step", ["open", "plan", "load", "build"])
def test_cost_grows_linearly_with_tensor_count(files, step, fmt):
    counts = {}
    for n in (SMALL, LARGE):
        path = str(files[n][fmt])
        model = flat(n)

        def run() -> None:
            if step == "open":
                ckpt = ckptfit.open(path)
                ckpt.state_dict().tensors  # noqa: B018 - every tensor's description
            elif step == "plan":
                ckptfit.plan(model, path)
            elif step == "load":
                ckptfit.load(model, path)
            else:
                ckptfit.build(lambda: flat(n), path)

        run()  # first call pays one-time imports
        counts[n] = calls(run)
    growth = counts[LARGE] / counts[SMALL]
    assert growth < 4.4, f"{step}: {counts[SMALL]} calls at {2 * SMALL} tensors, {counts[LARGE]} at {2 * LARGE} ({growth:.2f}x for 4x)"


def test_loaded_values_are_exact(files):
    """The counting above runs real loads: check one of them did load the file."""
    path, _, sd = files[SMALL]
    model, report = ckptfit.build(lambda: flat(SMALL), str(path))
    assert report.complete
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
