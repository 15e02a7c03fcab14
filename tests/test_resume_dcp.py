"""ckptfit.resume from torch.distributed.checkpoint (DCP) folders: optimizer state keyed by name.

``get_state_dict(model, optimizer)`` keys the optimizer state by each parameter's fully
qualified name (``{"state": {"l1.weight": {...}}, "param_groups": [{"params": ["l1.weight", ...]}]}``)
and ``dcp.save`` writes it next to the model's weights in one folder. The oracle is the one of
tests/test_resume.py: train K steps, save, change the model's code, resume, train K more; the
losses and weights equal those of 2K uninterrupted steps (torch.equal, on the CPU).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptfit
from ckptfit.errors import LoadError
from test_resume import OPTIMIZERS, RENAME, SAME, Renamed, Reordered, assert_losses, reference, same_weights, \
    train, two_groups

dcp = pytest.importorskip("torch.distributed.checkpoint")
state_dict_api = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def save_dcp(path: Path, model: nn.Module, opt, flatten: bool = False, **extra) -> None:
    """What a training loop on DCP writes, in one process (no process group: ``no_dist=True``)."""
    options = state_dict_api.StateDictOptions(flatten_optimizer_state_dict=flatten)
    model_sd, optim_sd = state_dict_api.get_state_dict(model, opt, options=options)
    if flatten:  # torchtitan's layout: "state.<name>.exp_avg", "param_groups.<name>.lr"
        assert any(k.startswith("param_groups.inp.") for k in optim_sd)
    else:
        assert isinstance(optim_sd["param_groups"][0]["params"][0], str)  # keyed by name, not by position
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd, **extra}, checkpoint_id=str(path), no_dist=True)


@pytest.mark.parametrize("variant", ["reordered", "renamed"])
@pytest.mark.parametrize("opt_name", ["adam", "sgd-momentum"])
def test_dcp_resume_is_bit_identical_after_the_code_changed(tmp_path: Path, opt_name: str, variant: str) -> None:
    make_opt = OPTIMIZERS[opt_name]
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt)
    save_dcp(tmp_path / "dcp", net, opt, epoch=4)

    new: nn.Module = Renamed() if variant == "renamed" else Reordered()
    new_opt = make_opt(new.parameters())
    report = ckptfit.resume(tmp_path / "dcp", new, new_opt, **({"rename": RENAME} if variant == "renamed" else {}))

    assert (report.layout, report.epoch) == ("DCP folder", 4)
    assert report.optimizer.rule == "the names saved with it" and len(report.optimizer.mapped) == 10
    assert report.optimizer.fresh == () and report.optimizer.dropped == ()
    assert_losses(train(new, new_opt, rest), ref_losses)
    same_weights(new, ref, SAME if variant == "renamed" else None)


def test_dcp_param_groups_and_hyperparameters(tmp_path: Path) -> None:
    """Two groups (the head at another lr): each saved group is put back in its index order."""
    make_opt = OPTIMIZERS["adam"]
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt, groups=two_groups)
    save_dcp(tmp_path / "dcp", net, opt)
    new = Reordered()
    new_opt = make_opt(two_groups(new))
    for g in new_opt.param_groups:
        g["lr"] = 0.5  # the saved learning rates come back
    report = ckptfit.resume(tmp_path / "dcp", new, new_opt)
    assert [g["lr"] for g in new_opt.param_groups] == [1e-2, 0.2]
    assert report.optimizer.groups == (2, 2)
    assert_losses(train(new, new_opt, rest), ref_losses)


@pytest.mark.parametrize("opt_name", ["adam", "sgd-momentum"])
def test_flattened_optimizer_state_two_groups_renamed(tmp_path: Path, opt_name: str) -> None:
    """``flatten_optimizer_state_dict=True`` (torchtitan): one key per parameter and state or
    hyper-parameter; the groups are rebuilt from equal hyper-parameters, in their saved order."""
    make_opt = OPTIMIZERS[opt_name]
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt, groups=two_groups)
    save_dcp(tmp_path / "dcp", net, opt, flatten=True, step=3)
    new = Renamed()
    new_opt = make_opt(two_groups(new))
    report = ckptfit.resume(tmp_path / "dcp", new, new_opt, rename=RENAME)
    assert (report.step, report.optimizer.groups, len(report.optimizer.mapped)) == (3, (2, 2), 10)
    assert [g["lr"] for g in new_opt.param_groups] == [opt.param_groups[0]["lr"], 0.2]
    assert_losses(train(new, new_opt, rest), ref_losses)
    same_weights(new, ref, SAME)


def test_dcp_state_that_does_not_fit_is_refused_before_anything_changes(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["adam"])
    save_dcp(tmp_path / "dcp", net, opt)
    new = Reordered()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    # the saved run had one group; this optimizer puts the head in a group of its own: which saved
    # hyper-parameters belong to it cannot be told, so nothing is guessed and nothing changes
    new_opt = OPTIMIZERS["adam"](two_groups(new))
    with pytest.raises(LoadError, match=r"cannot be restored exactly: .*nothing was changed"):
        ckptfit.resume(tmp_path / "dcp", new, new_opt)
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert new_opt.state_dict()["state"] == {}
