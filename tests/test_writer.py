"""The one writer (convert, load --save): keeps every tensor it is given, ties once, atomic, verified.

Each case is written through ``convert`` (from a torch file) and through ``ckptfit load --model
... --save`` (the CLI, through click's runner), to safetensors and to torch, then read back with
the reference readers (``safetensors.safe_open``, ``torch.load``) and compared bit for bit.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import ckptfit
from ckptfit import writing
from ckptfit.cli import main
from ckptfit.conversion import convert
from ckptfit.errors import CheckpointError
from ckptfit.writing import write_checkpoint

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

FORMATS = ["safetensors", "pt"]


class Views(nn.Module):
    """Buffers that are views of one storage: disjoint, overlapping, transposed, zero-size."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.arange(8.0)
        self.register_buffer("a", flat[:4])
        self.register_buffer("b", flat[4:])
        over = torch.arange(10.0) * 10
        self.register_buffer("lo", over[:6])
        self.register_buffer("hi", over[3:])
        base = torch.arange(6.0).view(2, 3)
        self.register_buffer("base", base)
        self.register_buffer("base_t", base.t())  # same storage, same offset, other stride: not a tie
        self.register_buffer("alone_t", torch.arange(12.0).view(3, 4).t())  # transposed, nothing else shares it
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("empty2", torch.empty(0))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight  # one shared Parameter

    def forward(self, x):
        return self.head(self.emb(x))


class Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(4, 4).to(torch.float16)
        self.b = nn.Linear(4, 4).to(torch.bfloat16)
        flat = torch.randn(8).to(torch.bfloat16)
        self.register_buffer("bv0", flat[:3])
        self.register_buffer("bv1", flat[3:])
        self.register_buffer("nan", torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float16))

    def forward(self, x):
        return self.b(self.h(x).to(torch.bfloat16))


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _read(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return torch.load(path, weights_only=True)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _assert_all_kept(expected: dict, got: dict, aliases: dict | None = None) -> None:
    aliases = aliases or {}
    assert set(got) | set(aliases) == set(expected)
    for k, v in expected.items():
        assert _bits_equal(got[aliases.get(k, k)], v), k


def _save_via_cli(model_cls: type, tmp_path, out_name: str):
    """``ckptfit load SRC --model tests.test_writer:CLS --save OUT``: the model built from its own state dict."""
    torch.manual_seed(0)
    model = model_cls()
    src = tmp_path / "src.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / out_name
    res = CliRunner().invoke(main, ["load", str(src), "--model", f"{__name__}:{model_cls.__name__}",
                                    "--save", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return _expected(model), out, json.loads(res.stdout)


def _save_via_convert(model_cls: type, tmp_path, out_name: str):
    torch.manual_seed(0)
    model = model_cls()
    src = tmp_path / "src.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / out_name
    result = convert(src, out)
    assert result.verified
    return _expected(model), out, result


# ------------------------------------------------------------------------------------ views


@pytest.mark.parametrize("ext", FORMATS)
def test_cli_save_keeps_every_view(tmp_path, ext):
    expected, out, data = _save_via_cli(Views, tmp_path, f"out.{ext}")
    got = _read(out)
    _assert_all_kept(expected, got)  # b, hi, base_t were lost from safetensors before
    assert data["save"]["verified"] and data["save"]["aliases"] == {}


@pytest.mark.parametrize("ext", FORMATS)
def test_convert_keeps_every_view(tmp_path, ext):
    expected, out, result = _save_via_convert(Views, tmp_path, f"out.{ext}")
    _assert_all_kept(expected, _read(out))
    assert result.aliases == {}


def test_torch_output_views_are_copies_of_their_own(tmp_path):
    """A view of part of a buffer does not drag the whole buffer into the file, nor tie to the others."""
    expected, out, _ = _save_via_cli(Views, tmp_path, "out.pt")
    got = torch.load(out, weights_only=True)
    for k in ("a", "b", "lo", "hi"):
        t = got[k]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
    assert got["a"].untyped_storage().data_ptr() != got["b"].untyped_storage().data_ptr()
    _assert_all_kept(expected, got)


def test_writer_keeps_views_given_directly(tmp_path):
    flat = torch.arange(10.0)
    sd = {"a": flat[:4], "b": flat[4:], "o1": flat[2:7], "t": torch.arange(6.0).view(2, 3).t(), "z": flat[:0]}
    for name in ("x.safetensors", "x.pt"):
        w = write_checkpoint(tmp_path / name, sd)
        assert w.verified and w.aliases == {} and w.num_tensors == 5
        _assert_all_kept(sd, _read(tmp_path / name))


# ------------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("ext", FORMATS)
def test_cli_save_writes_a_tie_once_and_records_it(tmp_path, ext):
    expected, out, data = _save_via_cli(Tied, tmp_path, f"out.{ext}")
    assert data["save"]["aliases"] == {"head.weight": "emb.weight"}
    got = _read(out)
    if ext == "safetensors":
        assert set(got) == {"emb.weight"}
        with safe_open(str(out), "pt") as f:
            assert json.loads(f.metadata()["ckptfit.aliases"]) == {"head.weight": "emb.weight"}
        _assert_all_kept(expected, got, {"head.weight": "emb.weight"})
    else:  # torch keeps the tie itself: one storage under both names
        assert got["head.weight"].untyped_storage().data_ptr() == got["emb.weight"].untyped_storage().data_ptr()
        _assert_all_kept(expected, got)
    fresh = Tied()
    ckptfit.load(fresh, out)
    assert torch.equal(fresh.head.weight, expected["emb.weight"])


def test_cli_save_reports_the_tie_in_text(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save(Tied().state_dict(), src)
    res = CliRunner().invoke(main, ["load", str(src), "--model", f"{__name__}:Tied", "--save",
                                    str(tmp_path / "o.safetensors")])
    assert res.exit_code == 0, res.output
    assert "tied, written once (1): head.weight = emb.weight" in res.stdout


@pytest.mark.parametrize("ext", FORMATS)
def test_convert_writes_a_tie_once_and_reports_it(tmp_path, ext):
    expected, out, result = _save_via_convert(Tied, tmp_path, f"out.{ext}")
    assert dict(result.aliases) == {"head.weight": "emb.weight"}
    assert "shared tensors written once (1): head.weight = emb.weight" in str(result)
    _assert_all_kept(expected, _read(out), {"head.weight": "emb.weight"} if ext == "safetensors" else None)


def test_zero_size_tensors_are_never_taken_for_ties(tmp_path):
    sd = {"e1": torch.empty(0), "e2": torch.empty(0), "e3": torch.empty(0, 4)}
    for name in ("z.safetensors", "z.pt"):
        w = write_checkpoint(tmp_path / name, sd)
        assert w.aliases == {}
        _assert_all_kept(sd, _read(tmp_path / name))


# ------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("how", ["cli", "convert"])
def test_fp16_bf16_bit_for_bit(tmp_path, ext, how):
    save = _save_via_cli if how == "cli" else _save_via_convert
    expected, out, _ = save(Half, tmp_path, f"out.{ext}")
    got = _read(out)
    assert got["h.weight"].dtype == torch.float16 and got["b.weight"].dtype == torch.bfloat16
    _assert_all_kept(expected, got)


# ------------------------------------------------------------------------------------ verification, atomicity


@pytest.mark.parametrize("name", ["v.safetensors", "v.pt"])
def test_a_difference_on_reading_back_leaves_the_old_file(tmp_path, monkeypatch, name):
    dest = tmp_path / name
    dest.write_bytes(b"old")
    real = writing._read_back

    def corrupting(path):
        ckpt, md = real(path)
        for _k, t in writing._leaves(ckpt.tree):
            data = t.load()
            data.view(-1)[0] += 1  # a copy-on-write map: the file itself is not changed
        return ckpt, md

    monkeypatch.setattr(writing, "_read_back", corrupting)
    with pytest.raises(CheckpointError, match="verification of the output failed"):
        write_checkpoint(dest, {"w": torch.arange(4.0)})
    assert dest.read_bytes() == b"old"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".partial")] == []


def test_cli_save_never_writes_over_its_source(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save(Tied().state_dict(), src)
    before = src.read_bytes()
    res = CliRunner().invoke(main, ["load", str(src), "--model", f"{__name__}:Tied", "--save", str(src)])
    assert res.exit_code == 1 and "refusing to write over the file being read" in res.output
    assert src.read_bytes() == before


def test_what_safetensors_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="safetensors holds only tensors under string names"):
        write_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(2), "epoch": 3})
    with pytest.raises(CheckpointError, match="cannot hold the dtype"):
        write_checkpoint(tmp_path / "x.safetensors", {"c": torch.ones(2, dtype=torch.complex128)})
    with pytest.raises(CheckpointError, match="meta device"):
        write_checkpoint(tmp_path / "x.pt", {"m": torch.empty(2, device="meta")})
    assert os.listdir(tmp_path) == []


def test_torch_output_keeps_a_whole_tree(tmp_path):
    shared = torch.arange(6.0)
    tree = {"model": {"w": shared, "tied": shared, "v": shared[2:]}, "step": 5, "hist": [torch.ones(2), 0.5],
            "pair": (torch.zeros(1), "x")}
    w = write_checkpoint(tmp_path / "t.pt", tree)
    assert w.aliases == {"model.tied": "model.w"} and w.num_tensors == 5
    back = torch.load(tmp_path / "t.pt", weights_only=True)
    assert back["step"] == 5 and back["hist"][1] == 0.5 and back["pair"][1] == "x"
    assert torch.equal(back["model"]["v"], shared[2:]) and torch.equal(back["model"]["tied"], shared)


# ------------------------------------------------------------------------------------ metadata claims


def test_safetensors_metadata_into_torch_is_reported_dropped_not_kept(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(2)}, src, metadata={"format": "pt", "epoch": "3"})
    result = convert(src, tmp_path / "y.pth")
    assert result.metadata == ()
    text = str(result)
    assert "metadata kept" not in text
    assert "not written: metadata (epoch)" in text
    assert set(torch.load(tmp_path / "y.pth", weights_only=True)) == {"w"}


def test_torch_metadata_claims_match_the_file(tmp_path):
    src = tmp_path / "train.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 4, "cfg": {"lr": 0.1}}, src)
    full = convert(src, tmp_path / "full.pt")
    back = torch.load(tmp_path / "full.pt", weights_only=True)
    assert set(full.metadata) == {"epoch", "cfg"} and all(k in back for k in full.metadata)
    slim = convert(src, tmp_path / "slim.pt", only_weights=True)
    assert slim.metadata == () and set(torch.load(tmp_path / "slim.pt", weights_only=True)) == {"w"}
    assert any(d.startswith("metadata (epoch, cfg)") for d in slim.dropped)
    st = convert(src, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        md = f.metadata()
    assert set(st.metadata) == {"epoch", "cfg"} and json.loads(md["epoch"]) == 4


@pytest.mark.parametrize("ext", FORMATS)
def test_output_is_reread_by_ckptfits_own_readers_before_the_rename(tmp_path, monkeypatch, ext):
    """convert and --save verify with the readers ckptfit loads with, not a private second reader."""
    import ckptfit.formats as formats

    opened: list[tuple[str, str]] = []
    real = formats.open_checkpoint

    def spy(path, **kw):
        ckpt = real(path, **kw)
        opened.append((os.path.basename(os.fspath(path)), ckpt.format))
        return ckpt

    monkeypatch.setattr(formats, "open_checkpoint", spy)
    fmt = "safetensors" if ext == "safetensors" else "torch-zip"
    _save_via_convert(Views, tmp_path, f"c.{ext}")
    assert [(n.startswith(".c.") and n.endswith(".partial"), f) for n, f in opened] == [(True, fmt)]
    opened.clear()
    _save_via_cli(Views, tmp_path, f"s.{ext}")
    assert [(n.startswith(".s.") and n.endswith(".partial"), f) for n, f in opened if n != "src.pth"] == [(True, fmt)]


@pytest.mark.gpu
def test_cuda_tensors_keep_views_and_ties(tmp_path):
    flat = torch.arange(8.0, device="cuda")
    w = torch.randn(3, 4, device="cuda")
    sd = {"a": flat[:4], "b": flat[4:], "w": w, "tied": w, "t": w.t(), "h": torch.ones(2, device="cuda").half()}
    for name in ("g.safetensors", "g.pt"):
        written = write_checkpoint(tmp_path / name, sd)
        assert written.aliases == {"tied": "w"}
        got = _read(tmp_path / name)
        cpu = {k: v.cpu() for k, v in sd.items()}
        _assert_all_kept(cpu, got, {"tied": "w"} if name.endswith(".safetensors") else None)
