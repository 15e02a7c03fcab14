"""Advice that works, as a property: every printed suggestion, followed literally, loads correctly
or leads to a different, more specific refusal; never the same refusal, never a load it did not mean.

Each case below is a refusal people meet (a head of another size, other input channels, another
width, a MoCo file with two encoders, an inserted layer, renamed blocks, two state dicts, a
dtype that is not a cast, ties). The test refuses it, reads every alternative the suggestions
print (the Python spelling through ``ckptfit.build``, the command-line spelling through the CLI),
applies it on top of what was passed, and runs again, following the chain to its end:

- a load must hold the file's tensors where the report says they came from, and leave at init
  only what ``partial=True`` (when the advice named it) or harmless buffers allow;
- a refusal must differ from the one before (other problems), and its own advice is followed in turn.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ckptfit
from _advice_follow import (check_load, cli_alternatives, file_tensor, flat_tensors, merged,
                            python_alternatives, renames_onto_one_name)
from ckptfit.cli import main
from _checkpoints import seeded

MODULE = Path(__file__).stem
MAX_DEPTH = 4


# -- tiny models, importable by the CLI as test_advice_property:NAME ---------------------------

class Net(nn.Module):
    """A small CNN whose constructor arguments set its sizes (as torchvision's and timm's do)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3)
        self.fc = nn.Linear(width, num_classes)


class NetPlus(Net):
    """Net with a layer inserted between conv1 and conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.inserted = nn.Conv2d(8, 8, 1)


class MoCoEncoder(Net):
    """Net whose head is MoCo v2's projection MLP (fc.0, fc.2) instead of a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


class AlphaBeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Linear(6, 6)
        self.beta = nn.Linear(6, 6)


class FirstSecond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight


class Counter(nn.Module):
    """A model with an integer buffer (a step counter) beside its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(3))


# -- the refusals ------------------------------------------------------------------------------

def _head(d: Path) -> Path:
    torch.save(seeded(Net(num_classes=5), 1).state_dict(), d / "head.pth")
    return d / "head.pth"


def _in_chans(d: Path) -> Path:
    torch.save({"model": seeded(Net(in_chans=1), 2).state_dict(), "epoch": 3}, d / "gray.pth")
    return d / "gray.pth"


def _width(d: Path) -> Path:
    torch.save(seeded(Net(width=16), 3).state_dict(), d / "wide.pth")
    return d / "wide.pth"


def _moco(d: Path) -> Path:
    q, k = seeded(MoCoEncoder(), 4), seeded(MoCoEncoder(), 5)
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd |= {f"module.encoder_k.{n}": t for n, t in k.state_dict().items()}
    sd |= {"module.queue": torch.randn(4, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "net", "state_dict": sd, "optimizer": {}}, d / "moco.pth.tar")
    return d / "moco.pth.tar"


def _inserted(d: Path) -> Path:
    torch.save(seeded(Net(), 6).state_dict(), d / "net.pth")
    return d / "net.pth"


def _renamed(d: Path) -> Path:
    torch.save(seeded(FirstSecond(), 7).state_dict(), d / "fs.pth")
    return d / "fs.pth"


def _two_models(d: Path) -> Path:
    torch.save({"student": seeded(Net(), 8).state_dict(), "teacher": seeded(Net(), 9).state_dict()}, d / "dino.pth")
    return d / "dino.pth"


def _int_buffer(d: Path) -> Path:
    sd = seeded(Counter(), 11).state_dict()
    sd["steps"] = torch.arange(3)  # saved as int64: not a cast into a float buffer
    torch.save(sd, d / "steps.pth")
    return d / "steps.pth"


def _prefixes(d: Path) -> Path:
    a, b = seeded(Net(), 12), seeded(Net(), 13)
    sd = {f"online.{n}": t for n, t in a.state_dict().items()} | {f"target.{n}": t for n, t in b.state_dict().items()}
    torch.save(sd, d / "byol.pth")
    return d / "byol.pth"


def _untied(d: Path) -> Path:
    m = seeded(Tied(), 14)
    m.head.weight = nn.Parameter(torch.randn(12, 6))  # saved from the model without its tie: values differ
    torch.save(m.state_dict(), d / "untied.pth")
    return d / "untied.pth"


# (name, file maker, factory name in this module, model_kwargs the user passed, a load must be reachable)
CASES = [
    ("head of another size", _head, "Net", {}, True),
    ("new head on purpose", _head, "Net", {"num_classes": 3}, True),
    ("other input channels", _in_chans, "Net", {}, True),
    ("another width", _width, "Net", {}, True),
    ("MoCo: two encoders", _moco, "Net", {}, True),
    ("inserted layer", _inserted, "NetPlus", {}, True),
    ("renamed blocks", _renamed, "AlphaBeta", {}, True),
    ("two state dicts", _two_models, "Net", {}, True),
    ("another model's file", _renamed, "Net", {}, False),
    ("int buffer into a float one", _int_buffer, "Counter", {}, True),
    ("two prefixes", _prefixes, "Net", {}, True),
    ("tied weights saved untied", _untied, "Tied", {}, True),
]


# -- following the advice ----------------------------------------------------------------------

def _refusal_key(e: ckptfit.LoadError) -> tuple:
    return tuple(e.problems), tuple(e.plan.suggestions) if e.plan is not None else ()


def _check_suggestions(e: ckptfit.LoadError) -> None:
    assert e.hint, f"a refusal without a hint:\n{e}"
    text = str(e)
    assert text.startswith("Refused: would load "), text
    assert text.count("\n  suggestion") == 1 and text.rstrip().splitlines()[-1].startswith("  "), text
    for s in e.plan.suggestions:
        for alt in python_alternatives(s):
            if "rename" in alt:
                assert not renames_onto_one_name(alt["rename"]), f"two modules renamed onto one name: {s}"


def _python_chain(path: Path, factory, options: dict, flat: dict, depth: int, seen: set, trail: list) -> int:
    """Follow every Python alternative from ``options``; the number of correct loads reached."""
    try:
        model, report = ckptfit.build(factory, path, **options)
    except ckptfit.LoadError as e:
        key = _refusal_key(e)
        assert key not in seen, f"{' -> '.join(trail)}: the same refusal again:\n{e}"
        _check_suggestions(e)
        if depth >= MAX_DEPTH:
            return 0
        loads = 0
        for s in e.plan.suggestions:
            for alt in python_alternatives(s):
                loads += _python_chain(path, factory, merged(options, alt), flat, depth + 1, seen | {key},
                                       [*trail, repr(alt)])
        return loads
    got = model.state_dict()
    wrong = check_load([(d.target, d.source, d.transform is not None) for d in report.loaded], got, flat,
                       report.container)
    assert not wrong, f"{' -> '.join(trail)}: a wrong load:\n" + "\n".join(wrong)
    for d in report.tied:
        assert torch.equal(got[d.target], got[d.tied_to])
    if not options.get("partial"):  # nothing left at init that the advice did not ask for
        asked = ("harmless", "user") if options.get("exclude") else ("harmless",)
        assert not report.skipped_shape and all(d.stage in asked for d in report.left_at_init), \
            f"{' -> '.join(trail)}: left at init without partial=True:\n{report}"
    assert report.num_loaded > 0
    return 1


@pytest.mark.parametrize("name,make,factory,kwargs,loads", CASES, ids=[c[0] for c in CASES])
def test_python_advice_followed_literally(tmp_path, name, make, factory, kwargs, loads) -> None:
    path = make(tmp_path)
    flat = flat_tensors(torch.load(path, weights_only=True))
    options = {"model_kwargs": dict(kwargs)} if kwargs else {}
    with pytest.raises(ckptfit.LoadError):
        ckptfit.build(globals()[factory], path, **options)
    reached = _python_chain(path, globals()[factory], options, flat, 0, set(), [name])
    assert (reached > 0) == loads, f"{name}: {reached} correct loads reached"


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cli_chain(path: Path, spec: str, args: list[str], flat: dict, out: Path, depth: int, seen: set) -> int:
    r = _cli("load", path, "--model", spec, *args, "--save", out, "--json")
    data = json.loads(r.stdout)
    if r.exit_code == 1 and data.get("error", {}).get("type") == "LoadError":
        message, hint = data["error"]["message"], data["error"]["hint"]
        assert message.startswith("Refused: would load") and message.count("Refused") == 1, message
        assert message not in seen, f"{args}: the same refusal again:\n{message}"
        if depth >= MAX_DEPTH:
            return 0
        loads = 0
        for s in hint.splitlines():  # one suggestion a line
            for alt in cli_alternatives(s):
                loads += _cli_chain(path, spec, [*args, *alt], flat, out, depth + 1, seen | {message})
        return loads
    assert r.exit_code == 0, f"{args}: exit {r.exit_code}:\n{r.output}"
    d = data["report"]
    with ckptfit.open(out) as saved:
        got = {k: t.load() for k, t in saved.tensors()}
    loaded = [(x["target"], x["source"], "transform" in x) for x in d["loaded"]]
    wrong = check_load(loaded, got, flat, d["container"])
    assert not wrong, f"{args}: a wrong load:\n" + "\n".join(wrong)
    if "--partial" not in args:
        asked = ("harmless", "user") if "--exclude" in args else ("harmless",)
        assert not d["skipped_shape"] and all(x["stage"] in asked for x in d["left_at_init"]), \
            f"{args}: left at init without --partial: {d['left_at_init']}"
    return 1


@pytest.mark.parametrize("name,make,factory,kwargs,loads", CASES, ids=[c[0] for c in CASES])
def test_cli_advice_followed_literally(tmp_path, monkeypatch, name, make, factory, kwargs, loads) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = make(tmp_path)
    flat = flat_tensors(torch.load(path, weights_only=True))
    args = [a for k, v in kwargs.items() for a in ("--model-arg", f"{k}={v}")]
    reached = _cli_chain(path, f"{MODULE}:{factory}", args, flat, tmp_path / "out.safetensors", 0, set())
    assert (reached > 0) == loads, f"{name}: {reached} correct loads reached"


def test_the_file_tensor_lookup_follows_the_container() -> None:
    flat = flat_tensors({"state_dict": {"module": {"w": torch.ones(1)}}, "epoch": 3})
    assert file_tensor(flat, "state_dict", "module.w") is flat["state_dict.module.w"]
    assert file_tensor(flat, "state_dict.module", "w") is flat["state_dict.module.w"]
