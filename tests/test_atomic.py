"""atomic_write: all or nothing, never over its source, no partial file left behind."""
from __future__ import annotations

import json
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


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
    from ckptfit._atomic import atomic_path

    dest = tmp_path / "w.bin"
    with atomic_path(dest) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not dest.exists()
        with open(tmp, "wb") as f:
            f.write(b"by name")
    assert dest.read_bytes() == b"by name" and _leftovers(tmp_path) == []
    with pytest.raises(OSError):
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")
    assert dest.read_bytes() == b"by name" and _leftovers(tmp_path) == []


def test_atomic_dir_all_or_nothing(tmp_path):
    from ckptfit._atomic import atomic_dir

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp_path / "out-never").mkdir()
            open(os.path.join(tmp, "a"), "wb").close()
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out-never"]
    with atomic_dir(tmp_path / "out") as tmp:
        with open(os.path.join(tmp, "a"), "wb") as f:
            f.write(b"a")
    assert (tmp_path / "out" / "a").read_bytes() == b"a"
    with pytest.raises(CheckpointError, match="not empty"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_identify_cache_goes_through_the_one_atomic_writer(tmp_path, monkeypatch):
    """The cache file is written like every other file: atomically, with a plain file's permissions."""
    from ckptfit import _atomic
    from ckptfit.identification import cache

    calls = []
    real = _atomic.atomic_path

    def spy(path, **kw):
        calls.append(os.fspath(path))
        return real(path, **kw)

    monkeypatch.setattr(_atomic, "atomic_path", spy)
    path = tmp_path / "cache" / "index.json"
    cache.write_json(str(path), {"x": [1, 2]})
    assert calls == [str(path)]
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)  # not mkstemp's 0o600
    assert [n for n in os.listdir(path.parent) if n != "index.json"] == []
