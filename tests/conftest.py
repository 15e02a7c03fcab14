"""Shared fixtures and markers for the tests.

Fixtures:
    write_checkpoint: ``write_checkpoint(sd, folder, fmt, name=None) -> str`` writes the state
        dict ``sd`` in ``fmt`` (one of ``_checkpoints.FORMATS``) with that format's own writer
        (``torch.save``, ``safetensors``, a sharded Hugging Face folder,
        ``torch.distributed.checkpoint``) and returns the path (see tests/_checkpoints.py).
    linear_state_dict: the state dict of ``nn.Linear(3, 4)`` made with seed 0.

Markers (declared in pyproject.toml): ``gpu`` tests are skipped where no CUDA device is usable;
``slow`` tests are the long ones (deselect with ``-m "not slow"``).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _checkpoints import linear_state_dict, write_checkpoint


@pytest.fixture(name="write_checkpoint")
def _write_checkpoint_fixture() -> Callable[..., str]:
    return write_checkpoint


@pytest.fixture(name="linear_state_dict")
def _linear_state_dict_fixture() -> dict[str, torch.Tensor]:
    return linear_state_dict()


@pytest.fixture(params=["one thread", "threads"])
def readers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A test run twice: copies on the calling thread, then each tensor its own task on 3 worker threads
    (``pytestmark = pytest.mark.usefixtures("readers")`` in a module of load tests)."""
    from ckptfit.loading import streaming

    if request.param == "one thread":
        monkeypatch.setattr(streaming, "worker_count", lambda: 1)
    else:
        monkeypatch.setattr(streaming, "worker_count", lambda: 3)
        monkeypatch.setattr(streaming, "_BATCH_BYTES", 1)
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
