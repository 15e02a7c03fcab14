"""ckptfit.build builds on the meta device for its own thread only: other threads build real modules."""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

import ckptfit
from ckptfit.loading.meta import parameters_on_meta


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.bn = nn.BatchNorm1d(16)


def _check_real(m: nn.Module) -> str | None:
    """Why ``m`` (made by another thread) is not a real, initialised module, or None."""
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if t.is_meta or t.device.type != "cpu":
            return f"{name} is on {t.device}"
    bound = 1 / 16 ** 0.5  # nn.Linear's kaiming-uniform bound for fan_in 16
    if not (m.fc.weight.abs().max() <= bound and m.fc.weight.std() > 0):
        return "fc.weight was not initialised by reset_parameters"
    if not (torch.equal(m.norm.weight, torch.ones(16)) and torch.equal(m.norm.bias, torch.zeros(16))):
        return "LayerNorm was not initialised (ones/zeros)"
    if not torch.equal(m.bn.running_var, torch.ones(16)):
        return "BatchNorm running_var is not ones"
    return None


def _with_builder_thread(work) -> list[str]:
    """Run ``work()`` while another thread builds ``_Net`` in a loop; that thread's failures."""
    stop = threading.Event()
    failures: list[str] = []
    built = [0]

    def builder() -> None:
        while not stop.is_set() and not failures:
            why = _check_real(_Net())
            if why:
                failures.append(why)
            built[0] += 1

    t = threading.Thread(target=builder, daemon=True)
    t.start()
    try:
        work()
    finally:
        stop.set()
        t.join(timeout=60)
    assert built[0] > 0
    return failures


def test_another_thread_building_modules_during_build_gets_real_initialised_parameters(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(_Net().state_dict(), path)
    expected = torch.load(path)

    def work() -> None:
        for _ in range(60):
            model, _report = ckptfit.build(_Net, path)
            for k, v in model.state_dict().items():
                assert torch.equal(v, expected[k]), k

    assert _with_builder_thread(work) == []


def test_meta_construction_holds_only_in_its_own_thread():
    inside = threading.Event()
    release = threading.Event()
    made: list[nn.Module] = []

    def build_on_meta() -> None:
        with parameters_on_meta():
            made.append(nn.Linear(4, 4))
            inside.set()
            release.wait(30)

    t = threading.Thread(target=build_on_meta)
    t.start()
    try:
        assert inside.wait(30)
        here = nn.Linear(4, 4)  # built in this thread while the other is inside parameters_on_meta
        assert not here.weight.is_meta and here.weight.std() > 0
        nn.init.ones_(here.weight)  # initialisers still work here
        assert torch.equal(here.weight, torch.ones(4, 4))
    finally:
        release.set()
        t.join(30)
    assert made[0].weight.is_meta  # while the other thread's module is on meta


def test_two_threads_building_at_once_both_get_their_checkpoint(tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp_path / f"net{i}.pt")
        torch.save(_Net().state_dict(), paths[i])
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            want = torch.load(paths[i])
            for _ in range(30):
                model, _ = ckptfit.build(_Net, paths[i])
                assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
