"""A built model never changes when its file does: build copies into private memory unless mmap=True."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptfit
from _checkpoints import write_checkpoint
from ckptfit.lazy import locate


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(512, 512)
        self.out = nn.Linear(512, 8)


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """What a training job does to ``last.pth``: open for writing (same inode, no rename) and write."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_built_model_keeps_its_values_when_the_file_is_rewritten(tmp_path: Path, fmt: str) -> None:
    sd = Net().state_dict()
    path = Path(write_checkpoint(sd, tmp_path, fmt, f"last.{'pt' if fmt == 'torch-zip' else 'safetensors'}"))
    model, report = ckptfit.build(Net, path)
    assert locate(model.fc.weight) is None  # private memory, not a view of the file
    other = Net().state_dict()  # same structure, other random values: a file of the same size
    new = Path(write_checkpoint(other, tmp_path / "o", fmt, path.name)).read_bytes()  # same name: torch zips embed it
    assert len(new) == path.stat().st_size
    _rewrite_in_place(path, new)  # same size, other bytes
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mmap_true_is_zero_copy_and_follows_the_file(tmp_path: Path) -> None:
    """The explicit opt-in keeps the old behaviour (and its risk): the weights view the file."""
    sd = Net().state_dict()
    path = write_checkpoint(sd, tmp_path, "safetensors", "a.safetensors")
    model, _ = ckptfit.build(Net, path, mmap=True)
    assert locate(model.fc.weight) is not None
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    with pytest.raises(TypeError, match="mmap= must be True or False"):
        ckptfit.build(Net, path, mmap="yes")


_TRUNCATE = textwrap.dedent("""
    import sys, torch, ckptfit
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 512)
            self.out = nn.Linear(512, 8)

    path, fmt, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    sd = Net().state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save(sd, path)
    model, _ = ckptfit.build(Net, path, mmap=mmap)
    with open(path, "r+b") as f:
        f.truncate(100)  # the file is cut short while the model is in use
    total = sum(float(p.double().sum()) for p in model.parameters())  # touches every weight
    same = all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    print("same" if same else "changed", total)
""")


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_built_model_survives_truncation_of_its_file(tmp_path: Path, fmt: str) -> None:
    """Run in a child process: a mapped model would die of SIGBUS here."""
    script = tmp_path / "child.py"
    script.write_text(_TRUNCATE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), fmt, "0"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("same ")


def test_mmap_true_model_dies_on_truncation_as_documented(tmp_path: Path) -> None:
    """The risk the mmap=True docs state, shown (in a child process)."""
    script = tmp_path / "child.py"
    script.write_text(_TRUNCATE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), "safetensors", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0  # SIGBUS (-7 on Linux)
