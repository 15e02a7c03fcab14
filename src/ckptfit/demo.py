"""``ckptfit demo``: the classic ways ``load_state_dict(torch.load(path))`` breaks, and what ckptfit does.

:func:`write_examples` writes a few small, realistic checkpoints (no download, no GPU):

1. a training checkpoint of an ``nn.DataParallel`` model, with an ``argparse.Namespace``
   and optimizer state beside the weights;
2. ImageNet-style 1000-class weights, to fine-tune on 10 classes (another ``num_classes``);
3. a ``torch.compile``-d model's state dict saved on a GPU (the ``cuda:0`` location tags
   are faked, as a CPU-only machine cannot write real ones).

:func:`run_demo` shows for each what plain PyTorch says, then loads it with ckptfit and
prints the report.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["SmallCNN", "Example", "write_examples", "run_demo", "saved_as_cuda"]

_WIDTH = 120  # longest line of a quoted PyTorch error


class SmallCNN(nn.Module):
    """A tiny image classifier (two conv blocks and a linear head), for examples and tests.

    Args:
        num_classes: size of the output layer.
        in_chans: number of input channels.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class Example:
    """One demo checkpoint: the file, the model it is meant for, and how to load it.

    Attributes:
        file: the checkpoint's file name inside the demo directory.
        title: one line saying what the file is.
        target: what the model is, in words (``"torchvision resnet18(num_classes=10)"``).
        make_model: builds the model to load into (randomly initialised).
        spec: the model SPEC as the CLI takes it, with any further options
            (``"torchvision:resnet18 --model-arg num_classes=10 --partial"``).
        options: keyword arguments for :func:`ckptfit.load` (``{"partial": True}``).
    """

    file: str
    title: str
    target: str
    make_model: Callable[[], nn.Module]
    spec: str
    options: dict[str, Any] = field(default_factory=dict)


def _resnet18(num_classes: int = 1000) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('ckptfit demo needs torchvision: pip install -e ".[vision]"') from e
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


@contextlib.contextmanager
def saved_as_cuda() -> Iterator[None]:
    """Make ``torch.save`` tag CPU storages as living on ``cuda:0``, as on a GPU machine.

    ``torch.save`` asks ``torch.serialization.location_tag`` for every storage it writes;
    patching it writes exactly the file a GPU box would, without a GPU.
    """
    import torch.serialization as ser

    original = ser.location_tag

    def fake_tag(storage: Any) -> str:
        tag = original(storage)
        return "cuda:0" if tag == "cpu" else tag

    ser.location_tag = fake_tag
    try:
        yield
    finally:
        ser.location_tag = original


def _compiled(model: nn.Module) -> nn.Module:
    """What ``torch.compile(model)`` returns, as far as its state dict goes: ``model`` under ``_orig_mod``.

    ``torch.compile``'s ``OptimizedModule`` registers the model as its submodule ``_orig_mod``,
    so its state dict has ``_orig_mod.`` keys and the same tensors. Calling ``torch.compile``
    itself would import the inductor compiler (most of the demo's time on a small machine).
    """
    wrapper = nn.Module()
    wrapper._orig_mod = model
    return wrapper


def write_examples(directory: str | os.PathLike[str]) -> list[Example]:
    """Write the demo checkpoints into ``directory`` and describe them.

    Args:
        directory: an existing directory.

    Returns:
        One :class:`Example` per file written, in the order the demo shows them.

    Example:
        >>> examples = write_examples(tmp_dir)                  # doctest: +SKIP
        >>> [e.file for e in examples]                          # doctest: +SKIP
        ['train_dataparallel.pth', 'resnet18_imagenet.pth', 'compiled_on_gpu.pt']
    """
    directory = os.fspath(directory)
    torch.manual_seed(0)

    # 1. what the pytorch/examples ImageNet script writes, plus the parsed command line
    model = _resnet18()
    wrapped = nn.DataParallel(model)  # state_dict keys get a "module." prefix
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(arch="resnet18", lr=0.1, momentum=0.9, batch_size=256, epochs=90)
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": wrapped.state_dict(), "best_acc1": 69.76,
                "optimizer": optimizer.state_dict(), "args": args},
               os.path.join(directory, "train_dataparallel.pth"))

    # 2. 1000-class weights, as torchvision publishes them (random here: no download)
    torch.save(model.state_dict(), os.path.join(directory, "resnet18_imagenet.pth"))

    # 3. model = torch.compile(model) on a GPU box, then torch.save(model.state_dict(), ...)
    with saved_as_cuda():
        torch.save(_compiled(SmallCNN(num_classes=10)).state_dict(), os.path.join(directory, "compiled_on_gpu.pt"))

    return [
        Example("train_dataparallel.pth",
                "a training checkpoint of nn.DataParallel(resnet18), with argparse args and optimizer state",
                "torchvision resnet18()", _resnet18, "torchvision:resnet18"),
        Example("resnet18_imagenet.pth",
                "1000-class ImageNet-style weights, to fine-tune on 10 classes",
                "torchvision resnet18(num_classes=10)", lambda: _resnet18(num_classes=10),
                "torchvision:resnet18 --model-arg num_classes=10 --partial", {"partial": True}),
        Example("compiled_on_gpu.pt",
                "the state dict of a torch.compile-d model, saved on a GPU",
                "SmallCNN() on this CPU", SmallCNN, "ckptfit.demo:SmallCNN"),
    ]


# ---------------------------------------------------------------------------------- showing

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TELLING = ("Unsupported global", "Missing key", "Unexpected key", "size mismatch", "Attempting to deserialize")


def _clip(line: str, width: int = _WIDTH) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _error_lines(e: BaseException, max_lines: int = 3) -> list[str]:
    """The first line of a PyTorch error and its telling lines, each clipped to one screen line."""
    lines = [ln.strip().removeprefix("WeightsUnpickler error: ") for ln in _ANSI.sub("", str(e)).splitlines()
             if ln.strip()]
    if not lines:
        return [type(e).__name__]
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.startswith(_TELLING)]
    out = [f"{type(e).__name__}: {keep[0]}", *keep[1:max_lines]]
    return [_shorten(ln) for ln in out]


def _shorten(line: str) -> str:
    """A long error line cut after its first sentence, or clipped (a size mismatch is kept whole)."""
    if len(line) <= _WIDTH or line.startswith("size mismatch"):
        return line
    head, dot, _rest = line.partition(". ")
    if dot and len(head) < _WIDTH:
        return head + ". …"
    return _clip(line)


def _plain_attempts(example: Example, path: str, echo: Callable[[str], None]) -> bool:
    """What ``model.load_state_dict(torch.load(path))`` (and the usual next tries) say; True if it loads."""
    model = example.make_model()
    echo("   plain PyTorch:")
    echo("   >>> model.load_state_dict(torch.load(path))")
    try:
        model.load_state_dict(torch.load(path))
        echo("      (no error)")
        return True
    except Exception as e:  # noqa: BLE001 - shown, not raised
        for line in _error_lines(e):
            echo(f"      {line}")
        weights_only = "Weights only load failed" in str(e)
    if not weights_only:
        return False
    # the usual next step: turn off the safety check (runs any code in the file), pick the weights
    echo('   >>> model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])'
         "  # may run code from the file")
    sd = torch.load(path, weights_only=False)["state_dict"]
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        for line in _error_lines(e):
            echo(f"      {line}")
    model.load_state_dict(sd, strict=False)
    own = model.state_dict()
    total = len(own)
    loaded = sum(1 for k, v in sd.items() if k in own and own[k].shape == v.shape)
    echo('   >>> model.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=False)')
    echo(f"      no error, and {loaded} of {total} tensors loaded: the model is still random")
    return False


def _ckptfit_load(example: Example, path: str, echo: Callable[[str], None]) -> bool:
    from . import loading
    from .errors import CheckpointError, LoadError

    echo("   ckptfit:")
    options = dict(example.options)
    model = example.make_model()
    if options.get("partial"):
        # first without partial=True: ckptfit refuses to leave layers at init silently (the model unchanged)
        echo(f"   >>> ckptfit.load(model, {example.file!r})")
        try:
            loading.load(model, path)
        except LoadError as e:
            echo(f"      LoadError: {len(e.problems)} problem(s), the model was not changed:")
            for problem in e.problems[:3]:
                echo(_clip(f"        {problem}"))
            if e.hint:
                echo(_clip(f"      hint: {e.hint}"))
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    echo(f"   >>> ckptfit.load(model, {example.file!r}{', ' + args if args else ''})")
    try:
        report = loading.load(model, path, **options)
    except CheckpointError as e:  # not expected: say so and go on with the next example
        first, *rest = str(e).splitlines()
        for line in [f"{type(e).__name__}: {first}", *rest[:5]]:
            echo(_clip(f"      {line}"))
        return False
    for line in str(report).splitlines():
        echo(f"      {line}")
    with loading.open(path) as ckpt:
        safety = ckpt.safety
    if safety.unknown:
        echo(f"      safety: {', '.join(safety.unknown)} read as inert data; no code from the file was run")
    return True


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Run in ``path`` so that reports show short file names."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_demo(keep: str | os.PathLike[str] | None = None, echo: Callable[[str], None] = print) -> bool:
    """Write the demo checkpoints, show how plain PyTorch and ckptfit load each, print it all.

    Args:
        keep: a directory to write the files into and leave them in (created if needed);
            ``None`` uses a temporary directory, removed afterwards.
        echo: where each line of output goes.

    Returns:
        True when ckptfit loaded every example (``ckptfit demo`` exits 1 otherwise).

    Example:
        >>> from ckptfit.demo import run_demo
        >>> run_demo()                                           # doctest: +SKIP
        ckptfit demo: 3 checkpoints with the classic problems ...
    """
    with contextlib.ExitStack() as stack:
        if keep is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="ckptfit-demo-"))
        else:
            directory = os.path.abspath(os.fspath(keep))
            os.makedirs(directory, exist_ok=True)
        echo("ckptfit demo: how model.load_state_dict(torch.load(path)) breaks, and what ckptfit does instead.")
        echo(f"Writing small checkpoints with the classic problems to {directory} (no download, no GPU) …")
        examples = write_examples(directory)
        loaded = plain = 0
        with _working_directory(directory):
            for i, example in enumerate(examples, 1):
                echo("")
                echo(f"{i}. {example.file}: {example.title}")
                echo(f"   into {example.target}")
                plain += _plain_attempts(example, example.file, echo)
                loaded += _ckptfit_load(example, example.file, echo)
        echo("")
        n = len(examples)
        echo(f"Plain PyTorch loaded {plain} of {n} files; ckptfit loaded {loaded} of {n}, each with a report.")
        if keep is None:
            echo("Keep the files to try the other commands on them:  ckptfit demo --keep ./ckptfit-demo")
        else:
            rel = os.path.relpath(directory)
            shown = rel if not rel.startswith("..") else directory
            where = "the current directory" if shown == os.curdir else shown
            echo(f"The files are in {where}. Try:")
            for line in _commands_to_try(shown, examples):
                echo(f"  {line}")
        return loaded == len(examples)


def _commands_to_try(directory: str, examples: list[Example]) -> list[str]:
    import shlex

    def path(e: Example) -> str:
        return shlex.quote(os.path.join(directory, e.file))

    first, second, third = examples[0], examples[1], examples[2]
    fixed = shlex.quote(os.path.join(directory, "fixed.safetensors"))
    return [
        f"ckptfit inspect {path(first)}",
        f"ckptfit load {path(first)} --model {first.spec} --verify",
        f"ckptfit plan {path(second)} --model {second.spec}",
        f"ckptfit load {path(third)} --model {third.spec} --save {fixed}",
        f"ckptfit diff {path(first)} {path(second)}",
    ]
