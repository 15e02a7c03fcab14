"""`ckptfit inspect`, `scan` and `diff` of two files run without importing torch.

Each command runs in a fresh interpreter whose import system refuses ``torch`` (any attempt is
recorded and makes the process exit 99, naming the command), on real files written by
``torch.save`` (zip and legacy), ``safetensors`` and ``pickle``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Runs ``python -m ckptfit ARGS`` with torch made unimportable; exit 99 if anything tried to import it.
WRAPPER = r"""
import runpy, sys
tried = []
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            tried.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, NoTorch())
sys.argv = ["ckptfit", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("ckptfit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
if tried or "torch" in sys.modules:
    print(f"TORCH IMPORTED: {tried}", file=sys.stderr)
    code = 99
sys.exit(code)
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), CKPTFIT_PROGRESS="0")
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"encoder.0.weight": torch.randn(8, 4, generator=g), "encoder.0.bias": torch.zeros(8),
            "encoder.1.weight": torch.randn(8, 8, generator=g).t(),  # a non-contiguous view
            "head.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16), "steps": torch.tensor(7)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("notorch")
    sd = _state_dict()
    out = {"zip": d / "train.pth", "legacy": d / "legacy.pt", "safetensors": d / "model.safetensors",
           "pickle": d / "plain.pkl", "zip_copy": d / "copy.pth"}
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": sd}, out["zip"])
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": sd}, out["zip_copy"])
    torch.save(sd, out["legacy"], _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, out["safetensors"])
    with open(out["pickle"], "wb") as f:
        pickle.dump({"epoch": 3, "lr": [0.1, 0.01], "name": "run-1"}, f, protocol=4)
    return out


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_inspect_reads_tensors_without_torch(files: dict[str, Path], kind: str) -> None:
    r = run_without_torch("inspect", str(files[kind]), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    tensors = {t["name"].removeprefix("state_dict."): t for t in d["tensors"]}
    assert tensors["encoder.0.weight"]["shape"] == [8, 4] and tensors["encoder.0.weight"]["dtype"] == "float32"
    assert tensors["head.weight"]["dtype"] == "bfloat16" and tensors["head.weight"]["bytes"] == 3 * 8 * 2
    assert tensors["steps"]["shape"] == [] and tensors["steps"]["dtype"] == "int64"


def test_inspect_of_a_plain_pickle_and_the_text_output_without_torch(files: dict[str, Path]) -> None:
    r = run_without_torch("inspect", str(files["pickle"]))
    assert r.returncode == 0, r.stderr
    assert "plain.pkl" in r.stdout and "pickle" in r.stdout and "run-1" in r.stdout
    r = run_without_torch("inspect", str(files["zip"]))
    assert r.returncode == 0, r.stderr
    assert "argparse.Namespace" in r.stdout and "epoch: 3" in r.stdout


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "pickle"])
def test_scan_without_torch(files: dict[str, Path], kind: str) -> None:
    r = run_without_torch("scan", str(files[kind]), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verdict"] == "clean", d
    if kind == "zip":
        assert "argparse.Namespace" in d["inert"] and d["crc_checked"] > 0


def test_diff_of_two_files_without_torch(files: dict[str, Path]) -> None:
    r = run_without_torch("diff", str(files["zip"]), str(files["zip_copy"]))  # values compared byte for byte
    assert r.returncode == 0, r.stderr
    assert "5 tensors in both" in r.stdout and "identical" in r.stdout
    r = run_without_torch("diff", str(files["legacy"]), str(files["safetensors"]), "--no-values")
    assert r.returncode == 0, r.stderr
    assert "identical (names, shapes and dtypes)" in r.stdout
    r = run_without_torch("diff", str(files["legacy"]), str(files["zip"]), "--json")  # its state dict, by bytes
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["identical"] and d["common"] == 5 and d["max_abs_diff"] == dict.fromkeys(_state_dict(), 0.0), d


def test_byte_identical_values_need_no_torch_and_differences_are_still_measured(files: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    from ckptfit.diffing import diff_sources

    sd = _state_dict()
    sd["encoder.0.bias"] = sd["encoder.0.bias"] + 0.5
    changed = tmp_path / "changed.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": sd}, changed)
    result = diff_sources(str(files["zip"]), str(changed))
    assert result.max_abs_diff["encoder.0.bias"] == 0.5
    assert all(v == 0 for k, v in result.max_abs_diff.items() if k != "encoder.0.bias")
    assert run_without_torch("diff", str(files["zip"]), str(changed)).returncode == 99  # measuring needs torch


def test_the_wrapper_does_catch_an_import_of_torch(files: dict[str, Path]) -> None:
    r = run_without_torch("plan", str(files["zip"]), "--model", "torchvision:resnet18")
    assert r.returncode == 99 or "blocked" in r.stderr, (r.returncode, r.stderr)
