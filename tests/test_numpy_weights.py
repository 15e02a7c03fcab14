"""Numpy weights: Detectron2-style .pkl, .npz, .npy and numpy arrays inside torch files load as tensors,
without running code, with byte order and memory order handled (views of the file where the layout allows)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import CorruptCheckpoint, UnsafeCheckpoint
from ckptfit.lazy import locate


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4))


def _arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _fresh() -> torch.nn.Module:
    m = _model()
    with torch.no_grad():
        for t in m.state_dict().values():
            t.zero_()
    return m


def _assert_loaded(into: torch.nn.Module, src: torch.nn.Module) -> None:
    for (k, a), b in zip(src.state_dict().items(), into.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("layout", ["native", "big-endian", "fortran", "big-endian fortran"])
@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "detectron2 pkl", "torch.save", "np.save dict"])
def test_numpy_weights_load_exactly(tmp_path, writer, layout):
    src = _model()
    arrays = _arrays(src)
    if "big-endian" in layout:
        arrays = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    if "fortran" in layout:
        arrays = {k: np.asfortranarray(v) if v.ndim > 1 else v for k, v in arrays.items()}
    path = tmp_path / "weights"
    if writer == "savez":
        np.savez(path, **arrays)
        path = tmp_path / "weights.npz"
    elif writer == "savez_compressed":
        np.savez_compressed(path, **arrays)
        path = tmp_path / "weights.npz"
    elif writer == "detectron2 pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    elif writer == "torch.save":
        torch.save(arrays, path)
    else:
        np.save(path, arrays, allow_pickle=True)
        path = tmp_path / "weights.npy"
    model = _fresh()
    report = ckptfit.load(model, path)
    _assert_loaded(model, src)
    assert len(report.loaded) == len(arrays)


def test_npz_members_are_views_of_the_file_and_crc_checked(tmp_path):
    arrays = {"w": np.arange(12, dtype="<f4").reshape(3, 4), "f": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    np.savez(tmp_path / "a.npz", **arrays)
    with ckptfit.open(tmp_path / "a.npz") as ckpt:
        assert ckpt.format == "npz"
        tensors = dict(ckpt.tensors())
        w, f = tensors["w"].load(), tensors["f"].load()
        assert locate(w) is not None and locate(f) is not None  # zero-copy: views of the mapped file
        assert torch.equal(w, torch.from_numpy(arrays["w"])) and torch.equal(f, torch.from_numpy(arrays["f"]))
        assert f.stride() == (1, 2)  # Fortran order kept as strides, not copied
    # one flipped data byte: the member's CRC-32 catches it
    data = bytearray((tmp_path / "a.npz").read_bytes())
    i = data.index(np.arange(12, dtype="<f4").tobytes())
    data[i + 5] ^= 0xFF
    (tmp_path / "b.npz").write_bytes(bytes(data))
    model = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(CorruptCheckpoint, match=r"record 'w\.npy' fails its CRC check"):
        ckptfit.load(model, tmp_path / "b.npz", rename=[("^w$", "weight")], partial=True)


def test_single_npy_is_a_one_tensor_state_dict_named_after_the_file(tmp_path):
    a = np.random.default_rng(0).standard_normal((4, 3)).astype(">f8")
    np.save(tmp_path / "weight.npy", a)
    model = torch.nn.Linear(3, 4, bias=False).double()
    report = ckptfit.load(model, tmp_path / "weight.npy")
    assert len(report.loaded) == 1
    assert torch.equal(model.weight.detach(), torch.from_numpy(a.astype("<f8")))


def test_inspect_lists_numpy_arrays_as_tensors(tmp_path):
    np.savez(tmp_path / "w.npz", conv=np.zeros((8, 3, 3, 3), "f4"), names=np.array(["a", "b"]))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "w.npz")])
    assert result.exit_code == 0, result.output
    assert "npz" in result.output and "1 tensor" in result.output
    assert "conv" in result.output and "[8, 3, 3, 3]" in result.output and "float32" in result.output
    assert "names: <ndarray <U1 [2]: no torch dtype>" in result.output
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), "f4")}, "__author__": "me"}, f)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "d2.pkl")])
    assert result.exit_code == 0 and "stem.conv1.weight" in result.output and "[64, 3, 7, 7]" in result.output
    assert "ndarray" not in result.output


def test_numpy_arrays_inside_a_torch_file_are_weights(tmp_path):
    src = _model()
    torch.save({"epoch": 3, "model": _arrays(src)}, tmp_path / "np.pth")
    model = _fresh()
    report = ckptfit.load(model, tmp_path / "np.pth")
    _assert_loaded(model, src)
    assert len(report.loaded) == len(src.state_dict())


def test_object_npy_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    np.save(tmp_path / "evil.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeCheckpoint, match=r"print"):
        ckptfit.open(tmp_path / "evil.npy")


def test_truncated_numpy_files_are_corrupt(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100, dtype="f4"))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpoint, match=r"the file holds only \d+: truncated"):
        ckptfit.open(tmp_path / "cut.npy")
    (tmp_path / "head.npy").write_bytes(data[:40])
    with pytest.raises(CorruptCheckpoint, match=r"\.npy header .*cannot be read"):
        ckptfit.open(tmp_path / "head.npy")
    np.savez(tmp_path / "a.npz", x=np.arange(100, dtype="f4"))
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match=r"truncated"):
        ckptfit.open(tmp_path / "cut.npz")


def test_a_large_compressed_npz_member_loads(tmp_path):
    a = np.random.default_rng(0).standard_normal((200, 100)).astype("f4")  # 80 KB: beyond one header's worth
    np.savez_compressed(tmp_path / "c.npz", weight=a)
    model = torch.nn.Linear(100, 200, bias=False)
    ckptfit.load(model, tmp_path / "c.npz")
    assert torch.equal(model.weight.detach(), torch.from_numpy(a))
