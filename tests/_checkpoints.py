"""Checkpoints written with the real writers, in every format ckptfit reads (shared by the tests).

``from _checkpoints import FORMATS, write_checkpoint`` in a test module (``tests/`` is on the path),
or the ``write_checkpoint`` fixture from conftest.py.
"""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

#: Every format :func:`write_checkpoint` writes (the name ckptfit reports for it).
FORMATS = ("torch-zip", "torch-legacy", "safetensors", "hf-folder", "dcp")

_DEFAULT_NAMES = {"torch-zip": "m.pt", "torch-legacy": "m_legacy.pt", "safetensors": "m.safetensors",
                  "hf-folder": "hf", "dcp": "dcp"}


def write_checkpoint(sd: dict[str, torch.Tensor], folder: str | os.PathLike[str], fmt: str,
                     name: str | None = None) -> str:
    """Write ``sd`` (ties already removed where the format needs it) in ``fmt`` under ``folder``."""
    if fmt not in _DEFAULT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    os.makedirs(folder, exist_ok=True)
    p = os.path.join(os.fspath(folder), name or _DEFAULT_NAMES[fmt])
    if fmt == "torch-zip":
        torch.save(sd, p)
    elif fmt == "torch-legacy":
        torch.save(sd, p, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, p)
    elif fmt == "hf-folder":
        os.makedirs(p)
        keys = list(sd)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for shard, ks in shards.items():
            safetensors.torch.save_file({k: sd[k].contiguous() for k in ks}, os.path.join(p, shard))
        with open(os.path.join(p, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    else:  # dcp
        import torch.distributed.checkpoint as dcp

        with pytest.warns(UserWarning):  # "saving in a single process"
            dcp.save({k: v.clone() for k, v in sd.items()}, checkpoint_id=p)
    return p


def linear_state_dict() -> dict[str, torch.Tensor]:
    """The state dict of ``nn.Linear(3, 4)`` made with seed 0: the smallest real checkpoint."""
    torch.manual_seed(0)
    return nn.Linear(3, 4).state_dict()


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every floating-point tensor drawn from N(0, 1) by ``seed``: values that tell tensors apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def fail_read_at(monkeypatch: pytest.MonkeyPatch, k: int, exc: BaseException) -> None:
    """Make the k-th read of tensor bytes from a file raise ``exc`` (the disk failing mid-copy).

    Reads may run on several threads: the count is an ``itertools.count`` (``next`` is atomic).
    """
    import itertools

    from ckptfit.lazy import MappedFile

    counter = itertools.count(1)
    real = MappedFile.readinto

    def readinto(self, offset, buf):
        if next(counter) == k:
            raise exc
        return real(self, offset, buf)

    monkeypatch.setattr(MappedFile, "readinto", readinto)
