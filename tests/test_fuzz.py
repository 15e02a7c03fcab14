"""Mutation fuzzing of valid files, one per reader: a correct load or a ckptfit error, nothing else.

Bytes flipped, files truncated, zip members reordered: for torch zip, legacy, safetensors,
TorchScript, plain pickle, a Hugging Face sharded folder (index + shards) and a
torch.distributed checkpoint (``.metadata``). Opening, rendering metadata and reading every
tensor may only succeed or raise a :class:`ckptfit.CheckpointError`: never another exception,
a crash or a hang (each example has a deadline). ``bench/fuzz.py`` runs the same with many
more examples.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfit
from ckptfit import CheckpointError

EXAMPLES = int(os.environ.get("CKPTFIT_FUZZ_EXAMPLES", "12"))
DEADLINE_MS = int(os.environ.get("CKPTFIT_FUZZ_DEADLINE_MS", "5000"))


def _sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()


# ----------------------------------------------------------------------------------------- valid files

def _torch_zip(d: str) -> str:
    p = os.path.join(d, "m.pt")
    torch.save({"state_dict": _sd(), "epoch": 3, "args": {"lr": 0.1}}, p)
    return p


def _legacy(d: str) -> str:
    p = os.path.join(d, "m.pt")
    torch.save({"state_dict": _sd(), "epoch": 3}, p, _use_new_zipfile_serialization=False)
    return p


def _safetensors(d: str) -> str:
    from safetensors.torch import save_file

    p = os.path.join(d, "m.safetensors")
    save_file(_sd(), p, metadata={"format": "pt"})
    return p


def _torchscript(d: str) -> str:
    p = os.path.join(d, "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(nn.Linear(3, 4).eval(), torch.randn(1, 3)), p)
    return p


def _plain_pickle(d: str) -> str:
    p = os.path.join(d, "m.pkl")
    with open(p, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in _sd().items()}, "step": np.int64(4)}, f, protocol=4)
    return p


def _hf_folder(d: str) -> str:
    import json

    from safetensors.torch import save_file

    sd = _sd()
    keys = list(sd)
    out = os.path.join(d, "hf")
    os.makedirs(out)
    weight_map = {}
    for i, part in enumerate((keys[:3], keys[3:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}, f)
    return out


def _dcp(d: str) -> str:
    import torch.distributed.checkpoint as dcp

    out = os.path.join(d, "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": _sd(), "step": 5}, checkpoint_id=out)
    return out


FORMATS: dict[str, tuple[Callable[[str], str], str | None]] = {
    # name: (builder, file to mutate inside a folder)
    "torch-zip": (_torch_zip, None),
    "legacy": (_legacy, None),
    "safetensors": (_safetensors, None),
    "torchscript": (_torchscript, None),
    "pickle": (_plain_pickle, None),
    "hf-index": (_hf_folder, "model.safetensors.index.json"),
    "hf-shard": (_hf_folder, "model-00001-of-00002.safetensors"),
    "dcp-metadata": (_dcp, ".metadata"),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, (build, _) in FORMATS.items():
        d = root / name
        d.mkdir()
        out[name] = build(str(d))
    return out


# ----------------------------------------------------------------------------------------- the oracle

def exercise(path: str) -> bool:
    """Open, render, read every tensor. True if it loaded; False for a ckptfit error; anything else raises."""
    try:
        with ckptfit.open(path) as ckpt:
            ckpt.metadata  # noqa: B018
            ckpt.safety  # noqa: B018
            ckpt.state_dicts()
            for _, t in ckpt.tensors():
                t.load()
        return True
    except CheckpointError as e:
        assert str(e), "a ckptfit error must say something"
        return False


def _target(original: str, inner: str | None, workdir: str) -> tuple[str, str]:
    """A private copy of the original: (path to open, file to mutate)."""
    if os.path.isdir(original):
        dst = os.path.join(workdir, "ckpt")
        shutil.copytree(original, dst)
        return dst, os.path.join(dst, inner or "")
    dst = os.path.join(workdir, os.path.basename(original))
    shutil.copyfile(original, dst)
    return dst, dst


def apply_mutation(data: bytes, flips: list[tuple[int, int]], cut: float | None) -> bytes:
    b = bytearray(data)
    for pos, x in flips:
        if b:
            b[pos % len(b)] ^= x
    if cut is not None:
        b = b[: int(len(b) * cut)]
    return bytes(b)


MUTATIONS = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=0, max_size=6),
    st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)

FUZZ = settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, derandomize="CKPTFIT_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", list(FORMATS))
@FUZZ
@given(mutation=MUTATIONS)
def test_mutated_files_load_or_raise_ckptfit_errors(originals, fmt, mutation) -> None:
    flips, cut = mutation
    with tempfile.TemporaryDirectory() as work:
        path, victim = _target(originals[fmt], FORMATS[fmt][1], work)
        with open(victim, "rb") as f:
            data = f.read()
        with open(victim, "wb") as f:
            f.write(apply_mutation(data, flips, cut))
        exercise(path)


def _reorder(src: str, dst: str, order: list[int]) -> None:
    with zipfile.ZipFile(src) as z:
        infos = z.infolist()
        perm = sorted(range(len(infos)), key=lambda i: order[i % len(order)] if order else i)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
            for i in perm:
                out.writestr(infos[i].filename, z.read(infos[i].filename))


@pytest.mark.parametrize("fmt", ["torch-zip", "torchscript"])
@FUZZ
@given(order=st.lists(st.integers(0, 1000), min_size=1, max_size=12))
def test_reordered_zip_members_load_exactly(originals, fmt, order) -> None:
    """A zip's member order is not its meaning: any order loads, and loads the same tensors."""
    with tempfile.TemporaryDirectory() as work:
        dst = os.path.join(work, "r.pt")
        _reorder(originals[fmt], dst, order)
        with ckptfit.open(originals[fmt]) as a, ckptfit.open(dst) as b:
            ta, tb = dict(a.tensors()), dict(b.tensors())
            assert list(ta) == list(tb)
            for k in ta:
                assert torch.equal(ta[k].load(), tb[k].load()), k


@pytest.mark.parametrize("fmt", ["torch-zip", "torchscript"])
@FUZZ
@given(order=st.lists(st.integers(0, 1000), min_size=1, max_size=12),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=3))
def test_reordered_and_flipped(originals, fmt, order, flips) -> None:
    with tempfile.TemporaryDirectory() as work:
        dst = os.path.join(work, "r.pt")
        _reorder(originals[fmt], dst, order)
        with open(dst, "rb") as f:
            data = f.read()
        with open(dst, "wb") as f:
            f.write(apply_mutation(data, flips, None))
        exercise(dst)


def test_unmutated_originals_load(originals) -> None:
    for name, path in originals.items():
        assert exercise(path), name


def test_flipped_pickle_never_escapes(tmp_path) -> None:
    """Every single-byte change of a small data.pkl, exhaustively: only ckptfit errors or a load."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "n": 1}, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    pkl = z.read(name)
    from ckptfit.lazy import StorageRef
    from ckptfit.safety import interpret

    def persistent_load(pid):
        return StorageRef("0", torch.float32, 3, "cpu", None)

    for i in range(len(pkl)):
        for x in (0x01, 0x80, 0xFF):
            b = bytearray(pkl)
            b[i] ^= x
            try:
                interpret(bytes(b), persistent_load=persistent_load)
            except CheckpointError:
                pass


# ----------------------------------------------------------------------------------------- every entry point

@pytest.mark.slow
def test_generated_hostile_inputs_on_every_entry_point(tmp_path, monkeypatch) -> None:
    """Generated pickles (real stdlib/torch/numpy callables, tensor rebuilds of any storage type and view,
    memo tricks, raw opcodes) and folder metadata (index, config.json, safetensors header, DCP fields),
    run on every entry point in a child process under a memory cap and a per-example deadline: each
    works or raises a ckptfit error; no other exception, crash or hang. ``python bench/fuzz.py
    --entrypoints`` runs many more."""
    import sys as _sys

    _sys.path.insert(0, os.path.dirname(__file__))
    from _fuzz_entrypoints import run_child

    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / "cache"))  # identify's index, for the child
    monkeypatch.setenv("CKPTFIT_IDENTIFY_FAMILIES", "torchvision.models.resnet18")
    n = int(os.environ.get("CKPTFIT_FUZZ_ENTRY_EXAMPLES", "12"))
    ran, failure = run_child(n, deadline_s=60)  # derandomized: the same examples on every run
    assert not failure, failure
    assert ran >= 1
