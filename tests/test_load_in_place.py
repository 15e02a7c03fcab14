"""``load(atomic=False)``: in place without the undo copy, every byte checked before the model changes;
and the all-or-nothing default refusing, before anything changes, an undo copy the machine cannot hold."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptfit
from _checkpoints import fail_read_at
from test_all_or_nothing import Net
from ckptfit.errors import CorruptCheckpoint, LoadError
from ckptfit.loading import copying


pytestmark = pytest.mark.usefixtures("readers")  # each test on one thread and on several (conftest.py)


def _file(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    sd = Net().state_dict()
    sd["bn.running_mean"] += 3.0
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path, sd


def _values(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {k: (v, v.detach().clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


def _unchanged(model: nn.Module, before: dict) -> bool:
    now = model.state_dict(keep_vars=True)
    return all(now[k] is t and now[k].data_ptr() == ptr and torch.equal(now[k].detach(), v)
               for k, (t, v, ptr) in before.items())


def _damage_last_record(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if "/data/" in i.filename]
    last = max(members, key=lambda i: i.header_offset)
    raw = bytearray(path.read_bytes())
    nlen, elen = struct.unpack("<HH", raw[last.header_offset + 26:last.header_offset + 30])
    raw[last.header_offset + 30 + nlen + elen] ^= 0x01
    path.write_bytes(bytes(raw))
    return last.filename


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_atomic_false_loads_in_place(tmp_path, fmt) -> None:
    path, sd = _file(tmp_path, fmt)
    model = Net()
    before = _values(model)
    report = ckptfit.load(model, path, atomic=False)
    assert report.complete
    now = model.state_dict(keep_vars=True)
    for k, (t, _v, ptr) in before.items():
        assert now[k] is t and t.data_ptr() == ptr, k  # same tensors, same memory: written in place
        assert torch.equal(t.detach(), sd[k]), k


def test_atomic_false_checks_every_byte_before_the_model_changes(tmp_path) -> None:
    """A damaged record met last in file order: refused with nothing written (no undo copy is needed)."""
    path, _ = _file(tmp_path, "torch-zip")
    name = _damage_last_record(path)
    model = Net()
    before = _values(model)
    with pytest.raises(CorruptCheckpoint, match=f"'{name}' fails its CRC check") as e:
        ckptfit.load(model, path, atomic=False)
    assert not getattr(e.value, "__notes__", None)  # nothing was written, so nothing to warn about
    assert _unchanged(model, before)


def test_atomic_false_says_when_a_failure_while_writing_left_the_model_partly_loaded(tmp_path, monkeypatch) -> None:
    path, sd = _file(tmp_path, "safetensors")  # no checksum: no reads before the writes
    model = Net()
    fail_read_at(monkeypatch, 4, OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error") as e:
        ckptfit.load(model, path, atomic=False)
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "load(atomic=False) failed after writing" in notes and "partly loaded" in notes
    written = int(notes.split("after writing ")[1].split()[0])
    assert 1 <= written <= len(sd)
    monkeypatch.undo()
    ckptfit.load(model, path, atomic=False)  # "load it again"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_the_default_adds_no_note_on_failure(tmp_path, monkeypatch) -> None:
    path, _ = _file(tmp_path, "safetensors")
    model = Net()
    before = _values(model)
    fail_read_at(monkeypatch, 4, OSError(5, "Input/output error"))
    with pytest.raises(OSError) as e:
        ckptfit.load(model, path)
    assert not getattr(e.value, "__notes__", None)
    assert _unchanged(model, before)


def test_an_undo_copy_that_cannot_fit_is_refused_before_anything_changes(tmp_path, monkeypatch) -> None:
    path, sd = _file(tmp_path, "torch-zip")
    model = Net()
    before = _values(model)
    need = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    monkeypatch.setattr(copying, "_memory_available", lambda: need // 2)
    with pytest.raises(LoadError) as e:
        ckptfit.load(model, path)
    msg = str(e.value)
    assert msg.startswith(f"Refused: loading {path} in place overwrites {ckptfit.rendering.human_bytes(need)} of the "
                          f"model's memory, and to undo a load that fails part way (all or nothing)")
    assert "the model was not changed" in msg
    assert "suggestions:\n    pass atomic=False to write in place without that copy" in msg
    assert _unchanged(model, before)
    # the suggestion, followed literally: no copy is needed, so the same memory suffices
    report = ckptfit.load(model, path, atomic=False)
    assert report.complete
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_enough_memory_loads_as_before(tmp_path, monkeypatch) -> None:
    path, sd = _file(tmp_path, "torch-zip")
    model = Net()
    need = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    monkeypatch.setattr(copying, "_memory_available", lambda: 2 * need)
    ckptfit.load(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_atomic_must_be_a_bool(tmp_path) -> None:
    path, _ = _file(tmp_path, "safetensors")
    with pytest.raises(TypeError, match="atomic= must be True or False"):
        ckptfit.load(Net(), path, atomic="no")
