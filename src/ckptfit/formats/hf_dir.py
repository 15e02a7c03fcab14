"""Hugging Face checkpoint folders: ``*.index.json`` over safetensors or ``.bin`` shards, or one weights file.

``save_pretrained`` writes ``model.safetensors`` (or ``pytorch_model.bin``), or, above the shard
size, ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` whose
``weight_map`` says which shard holds each tensor. Each shard is opened by its own reader
(lazily); ``config.json``, when present, is kept as metadata.
"""
from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..errors import CheckpointError, CorruptCheckpoint
from ..lazy import LazyTensor
from . import check_regular, detect, read_json, register

if TYPE_CHECKING:
    from ..scan_walk import ScanWalk

__all__ = ["open_hf_dir"]

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
           "diffusion_pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def index_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".index.json"))
    # safetensors first: the format transformers prefers when both exist
    return sorted(names, key=lambda n: (".safetensors" not in n, n))


def _sniff(path: str, head: bytes) -> bool:
    names = os.listdir(path)
    return bool(index_files(path)) or any(n in names for n in SINGLE_FILES)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def scan_hf(w: ScanWalk, path: str) -> set[str]:
    """The scan hook: the shards an ``*.index.json`` names (or the single weights file), as the folder
    reader opens them; returns their real paths."""
    covered: set[str] = set()
    indexes = index_files(path)
    if indexes:
        try:
            weight_map = read_json(os.path.join(path, indexes[0]), what=indexes[0], folder=path)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError) as e:
            w.errors.append(f"{indexes[0]} is not a valid shard index ({e})")
            return covered
    else:
        names = os.listdir(path)
        shards = [next(n for n in SINGLE_FILES if n in names)]
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            w.errors.append(f"the index names a shard outside the folder: {shard!r}")
            continue
        sp = os.path.join(path, shard)
        if not os.path.lexists(sp):
            w.errors.append(f"shard {shard} is missing")
            continue
        covered.add(w.scan_path(sp, f"{shard}:") or "")
    return covered


@register("hf-folder", sniff=_sniff, priority=5, directory=True, scan=scan_hf)
def open_hf_dir(path: str, trust: bool = False) -> Checkpoint:
    """Open a Hugging Face folder: all shards behind one flat, lazy state dict."""
    indexes = index_files(path)
    scans = []
    closers = []
    tensors: dict[str, LazyTensor] = collections.OrderedDict()
    metadata: dict = {}
    if indexes:
        try:
            index = read_json(os.path.join(path, indexes[0]), what=indexes[0], folder=path)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{indexes[0]} is not a valid shard index ({e.detail})", path=path,
                                    hint=f"download {indexes[0]} again (a JSON object with a weight_map)") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptCheckpoint(f"{indexes[0]} is not a valid shard index (no weight_map object)", path=path,
                                    hint=f"download {indexes[0]} again (a JSON object with a weight_map)")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CorruptCheckpoint(f"{indexes[0]}: the weight_map entry {_short(bad[0])} names no shard file "
                                    f"({type(bad[1]).__name__} instead of a file name)", path=path,
                                    hint=f"download {indexes[0]} again")
        shards = list(dict.fromkeys(weight_map.values()))
        extra = index.get("metadata")
        metadata["index"] = {"file": indexes[0], "shards": len(shards), **(extra if isinstance(extra, dict) else {})}
        for shard in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CorruptCheckpoint(f"{indexes[0]} names a shard outside the folder: {_short(shard)}", path=path)
            spath = os.path.join(path, shard)
            if not os.path.lexists(spath):
                raise CorruptCheckpoint(f"shard {shard} listed in {indexes[0]} is missing", path=path,
                                        hint="download every shard of the checkpoint")
            try:
                check_regular(spath, what=f"shard {_short(shard)}")
                reader = detect(spath)
            except CheckpointError as e:
                raise CorruptCheckpoint(f"shard {_short(shard)} listed in {indexes[0]}: {e.detail}", path=path,
                                        hint=e.hint) from e
            ck = reader.open(spath, trust)
            scans.extend(ck.scans)
            closers.append(ck.close)
            sd = ck.state_dict().tensors
            for k, t in sd.items():
                if weight_map.get(k, shard) != shard:
                    continue  # the index says another shard holds it
                tensors[k] = t
        missing = [k for k in weight_map if k not in tensors]
        if missing:
            raise CorruptCheckpoint(f"{len(missing)} tensor(s) listed in {indexes[0]} are in no shard, e.g. "
                                    f"{missing[0]!r}", path=path, hint="the shards and the index do not match")
    else:
        names = os.listdir(path)
        single = next(n for n in SINGLE_FILES if n in names)
        spath = os.path.join(path, single)
        check_regular(spath, what=single)
        ck = detect(spath).open(spath, trust)
        scans.extend(ck.scans)
        closers.append(ck.close)
        tensors.update(ck.state_dict().tensors)
        metadata["file"] = single
    cfg = os.path.join(path, "config.json")
    if os.path.lexists(cfg):
        try:
            metadata["config"] = read_json(cfg, what="config.json", folder=path)
        except CheckpointError as e:
            metadata["config"] = f"<unreadable config.json: {e.detail}>"
    return Checkpoint(path=path, format="hf-folder", tree=tensors, scans=tuple(scans), metadata=metadata,
                      closers=tuple(closers))
