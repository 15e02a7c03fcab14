"""``ckptfit demo``: runs offline in seconds, loads every example, and the commands it suggests work."""
from __future__ import annotations

import os
import shlex

import pytest
import torch
from click.testing import CliRunner

from ckptfit.cli import main
from ckptfit.demo import SmallCNN, saved_as_cuda, write_examples


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """``ckptfit demo --keep files``, run in a fresh directory: (that directory, the result)."""
    cwd = tmp_path_factory.mktemp("demo")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, ["demo", "--keep", "files"], catch_exceptions=False)
    finally:
        os.chdir(before)
    return cwd, result


def test_demo_loads_every_example_and_quotes_plain_pytorch(kept) -> None:
    cwd, result = kept
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Plain PyTorch loaded 0 of 3 files; ckptfit loaded 3 of 3" in out
    for message in ("Unsupported global: GLOBAL argparse.Namespace", "Missing key(s) in state_dict",
                    "size mismatch for fc.weight", "0 of 122 tensors loaded"):
        assert message in out
    if not torch.cuda.is_available():
        assert "Attempting to deserialize object on a CUDA device" in out
    for transform in ("strip 'module.'", "strip '_orig_mod.'"):
        assert transform in out
    assert "argparse.Namespace read as inert data" in out
    assert sorted(p.name for p in (cwd / "files").iterdir()) == [
        "compiled_on_gpu.pt", "resnet18_imagenet.pth", "train_dataparallel.pth"]


def _suggested(output: str) -> list[str]:
    after = output.split("Try:", 1)[1]
    return [ln.strip() for ln in after.splitlines() if ln.strip().startswith("ckptfit ")]


def test_demo_suggests_commands_that_work(kept, monkeypatch) -> None:
    cwd, result = kept
    commands = _suggested(result.output)
    assert {c.split()[1] for c in commands} >= {"inspect", "load", "plan", "diff"}
    monkeypatch.chdir(cwd)  # the paths printed are relative to where the demo ran
    for command in commands:
        r = CliRunner().invoke(main, shlex.split(command)[1:])
        assert r.exit_code == (7 if command.startswith("ckptfit diff") else 0), f"{command}:\n{r.output}"  # 7: differ


def test_demo_without_keep_leaves_nothing(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = CliRunner().invoke(main, ["demo"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "ckptfit demo --keep" in r.output
    assert list(tmp_path.iterdir()) == []


def test_gpu_saved_file_carries_cuda_tags(tmp_path) -> None:
    import ckptfit

    with saved_as_cuda():
        torch.save(SmallCNN().state_dict(), tmp_path / "gpu.pt")
    with ckptfit.open(tmp_path / "gpu.pt") as ckpt:
        assert {t.device for _, t in ckpt.tensors()} == {"cuda:0"}


def test_examples_are_small_and_name_their_model(tmp_path) -> None:
    examples = write_examples(tmp_path)
    assert [e.file for e in examples] == ["train_dataparallel.pth", "resnet18_imagenet.pth", "compiled_on_gpu.pt"]
    assert sum((tmp_path / e.file).stat().st_size for e in examples) < 100_000_000
    for e in examples:
        assert e.spec.split()[0].count(":") == 1  # a model SPEC the CLI takes


def test_demo_suggestions_quote_paths_and_name_the_current_directory(tmp_path, monkeypatch) -> None:
    from ckptfit.demo import _commands_to_try

    examples = write_examples(str(tmp_path))
    commands = _commands_to_try("my files", examples)
    assert all(shlex.split(c)[2].startswith("my files/") for c in commands)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["demo", "--keep", "."], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "The files are in the current directory. Try:" in r.output
