"""One cache setting: ``$CKPTFIT_CACHE`` holds the identify index and fetched files, each in its own subfolder."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from click.testing import CliRunner

from ckptfit.cache_dirs import IDENTIFY, REMOTE, cache_dir, cache_root
from ckptfit.cli import main


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CKPTFIT_CACHE", "CKPTFIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_ckptfit_cache_is_the_root_of_both_subfolders(clean_env, tmp_path):
    clean_env.setenv("CKPTFIT_CACHE", str(tmp_path / "c"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_root() == str(tmp_path / "c")
        assert cache_dir(REMOTE) == str(tmp_path / "c" / "remote")
        assert cache_dir(IDENTIFY) == str(tmp_path / "c" / "identify")


def test_the_default_is_xdg_then_home(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == str(tmp_path / "home" / ".cache" / "ckptfit")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "ckptfit")


def test_ckptfit_cache_dir_still_works_with_a_deprecation_warning(clean_env, tmp_path):
    clean_env.setenv("CKPTFIT_CACHE_DIR", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match=r"CKPTFIT_CACHE_DIR is deprecated; set CKPTFIT_CACHE"):
        assert cache_root() == str(tmp_path / "old")
    clean_env.setenv("CKPTFIT_CACHE", str(tmp_path / "new"))  # the new name wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_root() == str(tmp_path / "new")


def test_the_identify_index_lives_under_identify(clean_env, tmp_path):
    from ckptfit.identification import cache_dir as index_root
    from ckptfit.identification import identify

    clean_env.setenv("CKPTFIT_CACHE", str(tmp_path / "c"))
    clean_env.setenv("CKPTFIT_IDENTIFY_FAMILIES", "torchvision.models.resnet18")
    assert index_root() == str(tmp_path / "c" / "identify")
    path = tmp_path / "head.pt"
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, path)
    identify(str(path))
    assert os.listdir(tmp_path / "c") == ["identify"]
    assert os.listdir(tmp_path / "c" / "identify")  # one index, keyed by the library versions


def test_cli_help_names_the_one_setting():
    r = CliRunner().invoke(main, ["identify", "--help"])
    assert r.exit_code == 0, r.output
    assert "$CKPTFIT_CACHE)" in r.output and "CKPTFIT_CACHE_DIR" not in r.output
