"""ckptfit.resume: continuing a run after the model's code changed is bit-identical to never stopping.

The oracle: train k steps, save, change the model's code (reorder, rename, wrap), resume,
train k more; the losses and weights equal (torch.equal, on the CPU) those of 2k
uninterrupted steps. Plain position-based ``optimizer.load_state_dict`` fails the same
check, so the check can fail.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import LoadError

K = 3


# ---------------------------------------------------------------------------------- tiny models

class Net(nn.Module):
    """The saved run's model: two same-shape hidden layers, a norm, a head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.relu(self.l2(torch.relu(self.l1(torch.relu(self.inp(x))))))))


class Reordered(nn.Module):
    """Net with its layers defined in another order: the same names, another parameter order."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(8, classes)
        self.bn = nn.BatchNorm1d(8)
        self.l2 = nn.Linear(8, 8)
        self.l1 = nn.Linear(8, 8)
        self.inp = nn.Linear(4, 8)

    forward = Net.forward


class Renamed(nn.Module):
    """Net with attributes renamed and reordered."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.head = nn.Linear(8, classes)
        self.second = nn.Linear(8, 8)
        self.first = nn.Linear(8, 8)
        self.stem = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.second(torch.relu(self.first(torch.relu(self.stem(x))))))))


RENAME = [(r"^inp\.", "stem."), (r"^l1\.", "first."), (r"^l2\.", "second."), (r"^bn\.", "norm."), (r"^fc\.", "head.")]
SAME = {"inp": "stem", "l1": "first", "l2": "second", "bn": "norm", "fc": "head"}


def data(n: int = 2 * K) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt, batches, scheduler=None, scaler=None) -> list[torch.Tensor]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
    return losses


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def reference(make_opt, groups=None, sched=None, scaler=False):
    """2K uninterrupted steps; returns (model after K steps, its optimizer ..., losses of steps K..2K, final model)."""
    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    opt = make_opt(groups(net) if groups else net.parameters())
    ropt = make_opt(groups(ref) if groups else ref.parameters())
    s = sched(opt) if sched else None
    rs = sched(ropt) if sched else None
    sc = torch.amp.GradScaler("cpu") if scaler else None
    rsc = torch.amp.GradScaler("cpu") if scaler else None
    batches = data()
    ref_losses = train(ref, ropt, batches, rs, rsc)
    train(net, opt, batches[:K], s, sc)
    return net, opt, s, sc, ref, ref_losses[K:], batches[K:]


def same_weights(model: nn.Module, ref: nn.Module, names: dict[str, str] | None = None) -> None:
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        key = k
        for a, b in (names or {}).items():
            if k.startswith(a + "."):
                key = b + k[len(a):]
        assert torch.equal(got[key], v), key


def assert_losses(losses, ref_losses) -> None:
    assert len(losses) == len(ref_losses)
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert torch.equal(a, b), f"step {K + i}: {a.item()} != {b.item()}"


# ---------------------------------------------------------------------------------- the oracle

VARIANTS = ["reordered", "renamed", "dataparallel-saved", "into-dataparallel", "compiled-saved"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_resume_is_bit_identical_after_the_code_changed(tmp_path: Path, opt_name: str, variant: str) -> None:
    make_opt = OPTIMIZERS[opt_name]
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt)
    saved: nn.Module = net
    if variant == "dataparallel-saved":
        saved = nn.DataParallel(net)
    elif variant == "compiled-saved":
        saved = torch.compile(net)  # its state dict says `_orig_mod.`; nothing is compiled until called
    sd = saved.state_dict()
    assert variant != "compiled-saved" or next(iter(sd)).startswith("_orig_mod.")
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 4, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "loss": 0.25}, path)

    names = None
    opts: dict = {}
    if variant == "renamed":
        new: nn.Module = Renamed()
        opts["rename"] = RENAME
        names = SAME
    elif variant == "into-dataparallel":
        new = nn.DataParallel(Reordered())
    else:
        new = Reordered()
    new_opt = make_opt(new.parameters())
    report = ckptfit.resume(path, new, new_opt, **opts)

    assert (report.epoch, report.loss, report.layout) == (4, 0.25, "PyTorch tutorial dict")
    assert report.optimizer is not None and len(report.optimizer.mapped) == 10
    assert report.optimizer.fresh == () and report.optimizer.dropped == ()
    losses = train(new, new_opt, rest)
    assert_losses(losses, ref_losses)
    trained = new.module if isinstance(new, nn.DataParallel) else new
    same_weights(trained, ref, names)


def test_position_based_loading_after_a_reorder_is_wrong(tmp_path: Path) -> None:
    """What the test above guards against: the same check fails with optimizer.load_state_dict."""
    net, opt, _, _, ref, ref_losses, rest = reference(OPTIMIZERS["adam"])
    path = tmp_path / "ckpt.pth"  # saved first: optimizer.load_state_dict below shares opt's state tensors
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Reordered()
    new.load_state_dict(net.state_dict())  # names agree: the weights load right
    new_opt = OPTIMIZERS["adam"](new.parameters())
    with pytest.raises(RuntimeError):  # moments of fc [3, 8] land on inp [8, 4] ...
        new_opt.load_state_dict(opt.state_dict())
        train(new, new_opt, rest)

    class Swapped(nn.Module):  # only l1 and l2 swap places: the shapes agree, nothing complains
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.l2, self.l1, self.bn, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), \
                nn.BatchNorm1d(8), nn.Linear(8, 3)

        forward = Net.forward

    quiet = Swapped()
    quiet.load_state_dict(net.state_dict())
    quiet_opt = OPTIMIZERS["adam"](quiet.parameters())
    quiet_opt.load_state_dict(opt.state_dict())  # no error ...
    losses = train(quiet, quiet_opt, rest)
    assert not all(torch.equal(a, b) for a, b in zip(losses, ref_losses))  # ... and wrong

    fixed = Swapped()
    fixed_opt = OPTIMIZERS["adam"](fixed.parameters())
    ckptfit.resume(path, fixed, fixed_opt)
    assert_losses(train(fixed, fixed_opt, rest), ref_losses)


# ---------------------------------------------------------------------------------- groups, schedulers, scaler

def two_groups(m: nn.Module) -> list[dict]:
    body = [p for n, p in m.named_parameters() if not n.startswith(("fc.", "head."))]
    head = [p for n, p in m.named_parameters() if n.startswith(("fc.", "head."))]
    return [{"params": body}, {"params": head, "lr": 0.2}]


@pytest.mark.parametrize("kind", ["steplr", "onecycle"])
def test_param_groups_and_scheduler_are_restored(tmp_path: Path, kind: str) -> None:
    if kind == "steplr":
        make_opt = OPTIMIZERS["sgd-momentum"]
        sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    else:
        make_opt = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
        sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.1], total_steps=2 * K)  # noqa: E731
    net, opt, s, _, ref, ref_losses, rest = reference(make_opt, groups=two_groups, sched=sched)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 1, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": s.state_dict()}, path)
    new = Renamed()
    new_opt = make_opt(two_groups(new))
    new_sched = sched(new_opt)
    report = ckptfit.resume(path, new, new_opt, new_sched, rename=RENAME)
    assert report.optimizer.groups == (2, 2)
    assert "restored" in report.schedulers[0]
    assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert_losses(train(new, new_opt, rest, new_sched), ref_losses)
    same_weights(new, ref, SAME)


def test_grad_scaler_is_restored(tmp_path: Path) -> None:
    make_opt = OPTIMIZERS["adamw"]
    net, opt, _, sc, ref, ref_losses, rest = reference(make_opt, scaler=True)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": sc.state_dict()}, path)
    new = Reordered()
    new_opt = make_opt(new.parameters())
    new_sc = torch.amp.GradScaler("cpu", init_scale=4.0)
    report = ckptfit.resume(path, new, new_opt, scaler=new_sc)
    assert new_sc.get_scale() == sc.get_scale() and "restored" in report.scaler
    assert_losses(train(new, new_opt, rest, scaler=new_sc), ref_losses)


def test_disabled_scaler_state_round_trips(tmp_path: Path) -> None:
    net = Net()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict(), "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()}, path)
    new_sc = torch.amp.GradScaler("cpu")
    report = ckptfit.resume(path, Net(), scaler=new_sc)
    assert "disabled" in report.scaler and new_sc.get_scale() == 65536.0


def test_keep_hyperparams_keeps_the_new_learning_rate(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["adam"])
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Net()
    new_opt = torch.optim.Adam(new.parameters(), lr=0.123)
    report = ckptfit.resume(path, new, new_opt, keep_hyperparams=True)
    assert new_opt.param_groups[0]["lr"] == 0.123 and "kept" in report.optimizer.hyperparams
    assert torch.equal(new_opt.state[new.l1.weight]["exp_avg"], opt.state[net.l1.weight]["exp_avg"])
    ckptfit.resume(path, new, new_opt)
    assert new_opt.param_groups[0]["lr"] == 1e-2


def test_groups_filtered_from_the_parameters_map_group_by_group(tmp_path: Path) -> None:
    """Weight decay / no decay groups (HF Trainer, timm): ids follow parameter order within each group."""

    def decay_split(m: nn.Module) -> list[dict]:
        named = list(m.named_parameters())
        return [{"params": [p for n, p in named if p.ndim > 1], "weight_decay": 0.1},
                {"params": [p for n, p in named if p.ndim <= 1], "weight_decay": 0.0}]

    make_opt = lambda groups: torch.optim.AdamW(groups, lr=1e-2)  # noqa: E731
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt, groups=decay_split)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict()}, path)
    new = Reordered()
    new_opt = make_opt(decay_split(new))
    report = ckptfit.resume(path, new, new_opt)
    assert report.optimizer.rule == "parameter order within each group"
    assert_losses(train(new, new_opt, rest), ref_losses)


def test_frozen_parameters_outside_the_optimizer(tmp_path: Path) -> None:
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    only_head = lambda m: [p for n, p in m.named_parameters() if n.startswith(("fc.", "head."))]  # noqa: E731
    net, opt, _, _, ref, ref_losses, rest = reference(make_opt, groups=only_head)
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Renamed()
    new_opt = make_opt(only_head(new))
    ckptfit.resume(path, new, new_opt, rename=RENAME)
    assert_losses(train(new, new_opt, rest), ref_losses)


def test_optimizer_built_from_named_parameters_uses_the_saved_names(tmp_path: Path) -> None:
    try:
        net, opt, _, _, ref, ref_losses, rest = reference(lambda ps: torch.optim.Adam(ps, lr=1e-2),
                                                          groups=lambda m: list(m.named_parameters()))
    except (TypeError, ValueError):
        pytest.skip("this torch does not build optimizers from named parameters")
    assert "param_names" in opt.state_dict()["param_groups"][0]
    path = tmp_path / "ckpt.pth"
    # a model saved under DataParallel while the optimizer named the inner model's parameters
    torch.save({"model_state_dict": nn.DataParallel(net).state_dict(), "optimizer_state_dict": opt.state_dict()},
               path)
    new = Reordered()
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    report = ckptfit.resume(path, new, new_opt)
    assert report.optimizer.rule == "the names saved with it"
    assert_losses(train(new, new_opt, rest), ref_losses)


# ---------------------------------------------------------------------------------- partial, refusals

def test_new_head_gets_fresh_state_and_removed_params_are_reported(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["adam"])
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)

    class Smaller(nn.Module):  # l2 removed, a 5-class head
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.l1, self.bn, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)

    new = Smaller()
    new_opt = OPTIMIZERS["adam"](new.parameters())
    with pytest.raises(LoadError, match="fc.weight"):  # without partial=True: refused like load()
        ckptfit.resume(path, new, new_opt)
    assert new_opt.state_dict()["state"] == {}
    report = ckptfit.resume(path, new, new_opt, partial=True)
    o = report.optimizer
    assert {t for t, _ in o.fresh} == {"fc.weight", "fc.bias"}
    gone = "parameter no longer in the model"
    assert dict(o.dropped) == {"l2.weight": gone, "l2.bias": gone,
                               "fc.weight": "shape changed: checkpoint [3, 8], model [5, 8]",
                               "fc.bias": "shape changed: checkpoint [3], model [5]"}
    assert new.fc.weight not in new_opt.state and torch.equal(new_opt.state[new.l1.weight]["exp_avg"],
                                                             opt.state[net.l1.weight]["exp_avg"])
    text = str(report)
    assert "6/10 parameter states restored by parameter order" in text
    assert "fresh state (2):" in text and "fc.weight — shape changed: checkpoint [3, 8], model [5, 8]" in text
    assert "l2.{weight,bias} — parameter no longer in the model" in text
    new_opt.zero_grad()
    new.fc(new.bn(new.l1(new.inp(torch.randn(4, 4))))).sum().backward()
    new_opt.step()  # the fresh head trains


def test_state_that_does_not_fit_its_parameter_is_refused(tmp_path: Path) -> None:
    """An optimizer built over the parameters in another order than model.parameters(): never guessed."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(list(net.parameters())[::-1], lr=1e-2)
    train(net, opt, data(1))
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Net()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    new_opt = torch.optim.Adam(new.parameters(), lr=0.5)
    with pytest.raises(LoadError, match=r"cannot tell which saved state belongs to which parameter: .*"
                                        r"saved state 0 \(exp_avg \[3\]\) does not fit inp.weight \[8, 4\]"):
        ckptfit.resume(path, new, new_opt)
    assert all(torch.equal(v, before[k]) for k, v in new.state_dict().items())  # nothing changed
    assert new_opt.state_dict()["state"] == {} and new_opt.param_groups[0]["lr"] == 0.5


def test_a_parameter_that_moved_groups_is_refused(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["sgd-momentum"], groups=two_groups)
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Net()
    moved = two_groups(new)
    moved[0]["params"] = [p for p in moved[0]["params"] if p is not new.l2.weight]  # now with the head's lr
    moved[1]["params"].insert(0, new.l2.weight)
    new_opt = OPTIMIZERS["sgd-momentum"](moved)
    with pytest.raises(LoadError, match="l2.weight .*was in parameter group 0 of the saved optimizer "
                                        "and is in group 1"):
        ckptfit.resume(path, new, new_opt)


def test_count_mismatch_is_refused_not_guessed(tmp_path: Path) -> None:
    net = Net()
    opt = torch.optim.SGD([net.l1.weight, net.l2.weight], lr=0.1, momentum=0.9)
    train(net, opt, data(1))
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    new = Net()
    with pytest.raises(LoadError, match="the saved optimizer holds 2 parameters, the checkpoint's model 10 parameters"):
        ckptfit.resume(path, new, torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9))


def test_wrong_arguments_fail_early(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="other way round"):
        ckptfit.resume(Net(), str(tmp_path / "x.pth"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer= must be a Optimizer"):
        ckptfit.resume(tmp_path / "x.pth", Net(), optimizer="adam")


# ---------------------------------------------------------------------------------- layouts

def test_timm_layout(tmp_path: Path) -> None:
    net, opt, _, sc, ref, ref_losses, rest = reference(OPTIMIZERS["sgd-momentum"], scaler=True)
    ema = Net()
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "net", "state_dict": net.state_dict(), "state_dict_ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "amp_scaler": sc.state_dict(), "version": 2, "metric": 0.5}, path)
    new = Reordered()
    new_opt = OPTIMIZERS["sgd-momentum"](new.parameters())
    new_sc = torch.amp.GradScaler("cpu")
    report = ckptfit.resume(path, new, new_opt, scaler=new_sc)
    assert report.layout == "timm" and report.epoch == 3 and report.model.container == "state_dict"
    assert_losses(train(new, new_opt, rest, scaler=new_sc), ref_losses)


def test_lightning_layout(tmp_path: Path) -> None:
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9)  # noqa: E731
    net, opt, s, _, ref, ref_losses, rest = reference(OPTIMIZERS["adam"], sched=sched)

    class LitModule(nn.Module):  # a LightningModule holding the network as self.model
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    path = tmp_path / "epoch=0-step=3.ckpt"
    torch.save({"epoch": 0, "global_step": K, "pytorch-lightning_version": "2.4.0",
                "state_dict": LitModule(net).state_dict(), "loops": {"fit_loop": {"state_dict": {}}},
                "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": [s.state_dict()],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01}}, path)
    new = Renamed()
    new_opt = OPTIMIZERS["adam"](new.parameters())
    new_sched = sched(new_opt)
    report = ckptfit.resume(path, new, new_opt, new_sched, rename=[(r"^model\.", "")] + RENAME)
    assert (report.layout, report.step, report.epoch) == ("Lightning", K, 0)
    assert report.optimizer.where == "optimizer_states.0"
    assert_losses(train(new, new_opt, rest, new_sched), ref_losses)
    same_weights(new, ref, SAME)


def test_hugging_face_trainer_folder(tmp_path: Path) -> None:
    def decay_split(m: nn.Module) -> list[dict]:  # as transformers.Trainer groups parameters
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        no_decay = {n for n, _ in named if n.endswith("bias") or ".bn." in f".{n}"}
        return [{"params": [p for n, p in named if n not in no_decay], "weight_decay": 0.01},
                {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]

    make_opt = lambda groups: torch.optim.AdamW(groups, lr=1e-2)  # noqa: E731
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 - step / (4 * K))  # noqa: E731
    net, opt, s, sc, ref, ref_losses, rest = reference(make_opt, groups=decay_split, sched=sched, scaler=True)
    folder = tmp_path / f"checkpoint-{K}"
    folder.mkdir()
    save_file(net.state_dict(), folder / "model.safetensors")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(s.state_dict(), folder / "scheduler.pt")
    torch.save(sc.state_dict(), folder / "scaler.pt")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               folder / "rng_state.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": K, "epoch": 0.5, "log_history": []}))
    (folder / "training_args.bin").write_bytes(b"not read")

    # safetensors keeps no order: the model's own order stands in for the saved one, so code that
    # reorders parameters is refused here, never guessed
    moved = Reordered()
    with pytest.raises(LoadError, match=r"by the model's parameter order \(the file keeps none\) within each group: "
                                        r"saved state 0 \(exp_avg \[8, 4\]\) does not fit fc.weight \[3, 8\]"):
        ckptfit.resume(folder, moved, make_opt(decay_split(moved)))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    new = nn.DataParallel(Net())  # the same code, wrapped
    new_opt = make_opt(decay_split(new))
    new_sched = sched(new_opt)
    new_sc = torch.amp.GradScaler("cpu")
    report = ckptfit.resume(folder, new, new_opt, new_sched, new_sc)
    assert (report.layout, report.step, report.epoch) == ("Hugging Face Trainer folder", K, 0.5)
    assert report.rng == ("torch", "numpy", "python")
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert_losses(train(new, new_opt, rest, new_sched, new_sc), ref_losses)
    text = str(report)
    assert text.startswith(f"Resumed from checkpoint-{K} (Hugging Face Trainer folder)")
    assert "rng restored: torch, numpy, python" in text


def test_rng_states_in_a_training_dict(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": Net().state_dict(), "rng_state": {"torch": torch.get_rng_state(),
                                                           "numpy": np.random.get_state(),
                                                           "python": random.getstate()}}, path)
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    report = ckptfit.resume(path, Net())
    assert report.rng == ("torch", "numpy", "python")
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(2), expected[2])
    torch.manual_seed(3)
    ckptfit.resume(path, Net(), restore_rng=False)
    assert not torch.equal(torch.rand(2), expected[2])


def test_report_renders(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["sgd-momentum"])
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "model_state_dict": nn.DataParallel(net).state_dict(),
                "optimizer_state_dict": opt.state_dict(), "loss": 0.5}, path)
    new = Reordered()
    report = ckptfit.resume(path, new, OPTIMIZERS["sgd-momentum"](new.parameters()))
    lines = str(report).splitlines()
    assert lines[0] == "Resumed from ckpt.pth (PyTorch tutorial dict)"
    assert lines[1] == "  epoch 7, loss 0.5"
    assert lines[2].startswith("  model: Loaded 13/13 tensors from ")
    assert "  optimizer 'optimizer_state_dict' (1 group): 10/10 parameter states restored by parameter order" in lines
    assert json.dumps(report.to_dict(), default=str)
    with pytest.raises(AttributeError):
        report.epoch = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------- CLI and docs

def make_model() -> nn.Module:
    """A model SPEC for the CLI: ``test_resume:make_model``."""
    return Reordered()


def test_cli_plan_resume_shows_the_optimizer_mapping(tmp_path: Path) -> None:
    net, opt, *_ = reference(OPTIMIZERS["adam"])
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 2, "model_state_dict": nn.DataParallel(net).state_dict(),
                "optimizer_state_dict": opt.state_dict()}, path)
    r = CliRunner().invoke(main, ["plan", str(path), "--model", "test_resume:make_model", "--resume"])
    assert r.exit_code == 0, r.output
    assert "resume (PyTorch tutorial dict):" in r.output
    assert "optimizer 'optimizer_state_dict' (1 group): 10/10 parameter states would map by parameter order" \
        in r.output
    r = CliRunner().invoke(main, ["plan", str(path), "--model", "test_resume:make_model", "--resume", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["resume"]["optimizers"][0]["ok"] is True

    bad = Net()
    bad_opt = torch.optim.Adam(list(bad.parameters())[::-1])
    train(bad, bad_opt, data(1))
    torch.save({"model_state_dict": bad.state_dict(), "optimizer_state_dict": bad_opt.state_dict()}, path)
    r = CliRunner().invoke(main, ["plan", str(path), "--model", "test_resume:make_model", "--resume"])
    assert r.exit_code == 1 and "— refused" in r.output and "does not fit" in r.output


def test_docs_page_runs(tmp_path: Path, monkeypatch) -> None:
    import test_docs

    page = Path(__file__).resolve().parents[1] / "docs" / "resume.md"
    sections = test_docs._sections(page)
    assert sections
    for i, (heading, blocks) in enumerate(sections):  # as tests/test_docs.py: each section on its own
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(tmp_path / str(i))
        namespace: dict = {"__name__": "__doc__", "__raises__": test_docs._raises}
        for block in blocks:
            where = f"docs/resume.md:{block.line} ({heading})"
            if block.lang == "python":
                test_docs._run_python(block, namespace, where)
            else:
                test_docs._run_console(block, where)
    assert re.search(r"ckptfit\.resume\(", page.read_text())


def test_lightning_with_two_optimizers(tmp_path: Path) -> None:
    """A GAN-style LightningModule: each saved optimizer holds part of the parameters."""
    torch.manual_seed(0)
    net = Net()
    make = lambda m: (torch.optim.Adam([p for n, p in m.named_parameters() if not n.startswith("fc.")], lr=1e-2),  # noqa: E731
                      torch.optim.SGD(m.fc.parameters(), lr=0.1, momentum=0.9))
    ref = Net()
    ref.load_state_dict(net.state_dict())
    opts, ref_opts = make(net), make(ref)

    def train2(m, os_, batches):
        losses = []
        for x, y in batches:
            for o in os_:
                o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            for o in os_:
                o.step()
            losses.append(loss.detach())
        return losses

    batches = data()
    ref_losses = train2(ref, ref_opts, batches)[K:]
    train2(net, opts, batches[:K])
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 0, "global_step": K, "pytorch-lightning_version": "2.4.0", "state_dict": net.state_dict(),
                "optimizer_states": [o.state_dict() for o in opts], "lr_schedulers": []}, path)
    new = Reordered()
    new_opts = make(new)
    report = ckptfit.resume(path, new, list(new_opts))
    assert [o.where for o in report.optimizers] == ["optimizer_states.0", "optimizer_states.1"]
    assert [len(o.mapped) for o in report.optimizers] == [8, 2]
    assert_losses(train2(new, new_opts, batches[K:]), ref_losses)


def test_scheduler_state_holding_an_object_is_refused_before_anything_changes(tmp_path: Path) -> None:
    import argparse

    net = Net()
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": net.state_dict(), "scheduler": {"last_epoch": 3, "fn": argparse.Namespace(a=1)}},
               path)
    new = Net()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(new.parameters(), lr=0.1), step_size=1)
    with pytest.raises(LoadError, match=r"scheduler.fn holds an object of class argparse.Namespace"):
        ckptfit.resume(path, new, scheduler=sched)
    assert all(torch.equal(v, before[k]) for k, v in new.state_dict().items())
