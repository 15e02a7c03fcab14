"""Every byte read is checked: a damaged record of any size is refused by load, build, scan and convert."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import ckptfit
from ckptfit.cli import main
from ckptfit.conversion import convert
from ckptfit.errors import CorruptCheckpoint
from ckptfit.scanning import EXIT_CODES, scan


class Big(nn.Module):
    """A 4 MiB weight (above the old 1 MiB lazy-check limit) and small ones."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1024, 1024)  # 4 MiB of float32
        self.head = nn.Linear(1024, 4)
        self.bn = nn.BatchNorm1d(4)


def _data_offset(path: Path, member_suffix: str) -> tuple[str, int, int]:
    """(member name, absolute data offset, size) of the first member ending with ``member_suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    raw = path.read_bytes()
    nlen, elen = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.filename, info.header_offset + 30 + nlen + elen, info.file_size


def _damage(path: Path, member_suffix: str, at: int) -> str:
    """Flip one byte ``at`` bytes into a member's data; returns the member's name."""
    name, off, size = _data_offset(path, member_suffix)
    assert at < size
    raw = bytearray(path.read_bytes())
    raw[off + at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return name


def _record_of(path: Path, sd: dict, key: str) -> str:
    """The storage record that holds ``key`` (torch numbers storages in the order it meets them)."""
    order = list(dict.fromkeys(id(v.untyped_storage()) for v in sd.values()))
    return f"data/{order.index(id(sd[key].untyped_storage()))}"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and now[k].device == v.device and torch.equal(now[k], v) for k, v in before.items())


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, str]:
    """A torch zip whose 4 MiB ``fc.weight`` record has one byte flipped 3 MB in."""
    sd = Big().state_dict()
    path = tmp_path / "big.pt"
    torch.save(sd, path)
    member = _damage(path, _record_of(path, sd, "fc.weight"), 3_000_000)
    return path, member


def test_large_damaged_record_is_refused_by_load(damaged) -> None:
    path, member = damaged
    model = Big()
    before = _state(model)
    with pytest.raises(CorruptCheckpoint, match=rf"tensor record '{member}' fails its CRC check .*tensor 'fc\.weight'"):
        ckptfit.load(model, path)
    assert _same(model, before)


@pytest.mark.parametrize("mmap", [False, True])
def test_large_damaged_record_is_refused_by_build(damaged, mmap: bool) -> None:
    path, member = damaged
    with pytest.raises(CorruptCheckpoint, match=rf"'{member}' fails its CRC check .*'fc\.weight'"):
        ckptfit.build(Big, path, mmap=mmap)


@pytest.mark.parametrize("kw", [dict(dtype=torch.float16), dict(include=["fc.*"], partial=True)])
def test_damaged_record_is_refused_when_cast_or_filtered(damaged, kw) -> None:
    path, _ = damaged
    model = Big()
    before = _state(model)
    with pytest.raises(CorruptCheckpoint, match="fails its CRC check"):
        ckptfit.load(model, path, **kw)
    assert _same(model, before)


def test_damage_outside_the_loaded_view_of_a_record_is_found(tmp_path: Path) -> None:
    """A tensor saved as a view of a larger storage: its record is read and checked whole."""
    base = torch.randn(2048, 1024)
    sd = {"fc.weight": base[:1024], "fc.bias": torch.randn(1024), "head.weight": torch.randn(4, 1024),
          "head.bias": torch.randn(4)}
    path = tmp_path / "view.pt"
    torch.save(sd, path)
    _damage(path, _record_of(path, sd, "fc.weight"), 6_000_000)  # in the half no tensor uses
    model = nn.Module()
    model.fc, model.head = nn.Linear(1024, 1024), nn.Linear(1024, 4)
    before = _state(model)
    with pytest.raises(CorruptCheckpoint, match="fails its CRC check"):
        ckptfit.load(model, path)
    assert _same(model, before)


def test_transposed_source_is_checked(tmp_path: Path) -> None:
    """Bytes a transform reads (a Conv1D weight transposed into a Linear) are checked too."""
    sd = {"fc.weight": torch.randn(1024, 1024).t().contiguous(), "fc.bias": torch.randn(1024)}
    path = tmp_path / "t.pt"
    torch.save(sd, path)
    model = nn.Sequential()
    model.fc = nn.Linear(1024, 1024)
    report = ckptfit.load(model, path, transforms={"fc.weight": "transpose"})
    assert "CRC-32 checked (2 records)" in str(report)
    _damage(path, _record_of(path, sd, "fc.weight"), 100)
    with pytest.raises(CorruptCheckpoint, match="fails its CRC check"):
        ckptfit.load(model, path, transforms={"fc.weight": "transpose"})


def test_report_says_whether_bytes_were_checked(tmp_path: Path) -> None:
    sd = Big().state_dict()
    torch.save(sd, tmp_path / "a.pt")
    save_file(sd, str(tmp_path / "a.safetensors"))
    report = ckptfit.load(Big(), tmp_path / "a.pt")
    n = len(sd) - 0  # one record per tensor here
    assert f"  bytes: CRC-32 checked ({n} records)" in str(report).splitlines()
    assert report.to_dict()["integrity"] == f"CRC-32 checked ({n} records)"
    report = ckptfit.load(Big(), tmp_path / "a.safetensors")
    assert "  bytes: not checked (safetensors has no checksum)" in str(report).splitlines()
    assert ckptfit.load(Big(), tmp_path / "a.pt", verify=False).integrity == "not checked (verify=False)"
    assert ckptfit.load(Big(), sd).integrity is None  # a state dict in memory: no file to check


def test_verify_false_is_an_explicit_opt_out(damaged) -> None:
    path, _ = damaged
    model = Big()
    report = ckptfit.load(model, path, verify=False)  # the user verified the file another way
    assert report.integrity == "not checked (verify=False)"
    with pytest.raises(TypeError, match="verify= must be True or False"):
        ckptfit.load(Big(), path, verify="no")


def test_scan_says_damaged_with_its_own_exit_code(damaged) -> None:
    path, member = damaged
    report = scan(path)
    assert report.verdict == "damaged" and report.exit_code == EXIT_CODES["damaged"] == 4
    assert report.damaged == [f"{member}: CRC mismatch (the bytes differ from what was written)"]
    result = CliRunner().invoke(main, ["scan", str(path)])
    assert result.exit_code == 4 and "verdict: DAMAGED" in result.output


def test_convert_refuses_a_damaged_source(damaged, tmp_path: Path) -> None:
    path, member = damaged
    out = tmp_path / "out.safetensors"
    with pytest.raises(CorruptCheckpoint, match=f"'{member}' fails its CRC check"):
        convert(path, out)
    assert not out.exists()
    result = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "o2.safetensors")])
    assert result.exit_code == 1 and "fails its CRC check" in result.output


def test_inspect_says_how_bytes_can_be_checked(tmp_path: Path) -> None:
    sd = Big().state_dict()
    torch.save(sd, tmp_path / "a.pt")
    save_file(sd, str(tmp_path / "a.safetensors"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 0 and "bytes: no checksum (safetensors has none: damaged bytes cannot be detected)" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "a.pt")])
    assert r.exit_code == 0 and "bytes: CRC-32 per record, checked as they are loaded" in r.output


def test_cli_load_refuses_damage_and_no_crc_opts_out(damaged, tmp_path: Path, monkeypatch) -> None:
    path, _ = damaged
    # the model class is this module's own: importable by its file name however pytest was started
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = f"{Path(__file__).stem}:Big"
    result = CliRunner().invoke(main, ["load", str(path), "--model", spec])
    assert result.exit_code == 1 and "fails its CRC check" in result.output
    result = CliRunner().invoke(main, ["load", str(path), "--model", spec, "--no-crc"])
    assert result.exit_code == 0 and "bytes: not checked (verify=False)" in result.output
