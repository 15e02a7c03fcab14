"""atomic_write: all or nothing, never over its source, no partial file left behind."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from ckptfit import CheckpointError
from ckptfit._atomic import atomic_write


def _leftovers(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".partial"))


def test_writes_and_replaces(tmp_path):
    p = tmp_path / "out.bin"
    with atomic_write(p) as f:
        f.write(b"one")
    assert p.read_bytes() == b"one"
    with atomic_write(p) as f:
        f.write(b"two")
    assert p.read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


def test_text_mode_and_torch_save(tmp_path):
    with atomic_write(tmp_path / "a.txt", "w", encoding="utf-8") as f:
        f.write("héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    sd = {"w": torch.arange(4.0)}
    with atomic_write(tmp_path / "m.pt") as f:
        torch.save(sd, f)
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], sd["w"])


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_exception_leaves_old_file_and_no_partial(tmp_path, exc):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_write(p) as f:
            f.write(b"half of the new")
            raise exc
    assert p.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_exception_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []


def test_temp_file_is_in_destination_directory(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    with atomic_write(sub / "x.bin") as f:
        assert os.path.dirname(f.name) == str(sub)
        assert not (sub / "x.bin").exists()  # nothing visible under the final name until the end
        f.write(b"x")
    assert (sub / "x.bin").read_bytes() == b"x"


def test_refuses_to_write_over_its_source(tmp_path):
    src = tmp_path / "src.pt"
    src.write_bytes(b"precious")
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    for dest in (src, link):
        with pytest.raises(CheckpointError, match="refusing to write over the file being read"):
            with atomic_write(dest, source=src) as f:
                f.write(b"clobbered")
    assert src.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == []


def test_replacing_a_symlink_never_touches_its_target(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"target")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with atomic_write(link) as f:
        f.write(b"new")
    assert target.read_bytes() == b"target"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_errors_say_what_and_where(tmp_path):
    with pytest.raises(CheckpointError, match="the destination folder does not exist"):
        with atomic_write(tmp_path / "missing" / "x.bin"):
            pass
    with pytest.raises(CheckpointError, match="the destination is a directory"):
        with atomic_write(tmp_path):
            pass
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="the destination already exists"):
        with atomic_write(tmp_path / "x.bin", overwrite=False):
            pass
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(tmp_path / "y.bin", "ab"):
            pass


def test_permissions_like_a_plain_open(tmp_path):
    with atomic_write(tmp_path / "new.bin") as f:
        f.write(b"x")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(plain, 0o640)
    with atomic_write(plain) as f:
        f.write(b"y")
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o640
