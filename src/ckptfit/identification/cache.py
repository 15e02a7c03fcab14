"""The signature index on disk: where it lives (keyed by the library versions) and its JSON files,
written through the one atomic writer (:mod:`ckptfit._atomic`)."""
from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version

from .. import cache_dirs
from .._atomic import atomic_write

__all__ = ["cache_dir", "cached_entries", "index_dir", "read_json", "write_json"]

_INDEX_VERSION = 2


def cache_dir() -> str:
    """Where the signature index lives: ``identify/`` under the cache root (:func:`ckptfit.cache_dirs.cache_root`)."""
    return cache_dirs.cache_dir(cache_dirs.IDENTIFY)


def _version_of(module: str) -> str | None:
    try:
        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def index_dir() -> str:
    key = json.dumps([_INDEX_VERSION, _version_of("torch"), _version_of("torchvision"), _version_of("timm"),
                      _version_of("transformers")])
    return os.path.join(cache_dir(), hashlib.sha1(key.encode()).hexdigest()[:12])


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))


def cached_entries(root: str, name: str, make) -> list[dict]:
    """A registry's entry list, cached beside the index so a cached answer never imports the registry."""
    path = os.path.join(root, f"entries-{name}.json")
    data = read_json(path)
    if isinstance(data.get("entries"), list):
        return data["entries"]
    entries = make()
    write_json(path, {"entries": entries})
    return entries
