"""Hugging Face checkpoint folders: ``*.index.json`` over safetensors or ``.bin`` shards, or one weights file.

``save_pretrained`` writes ``model.safetensors`` (or ``pytorch_model.bin``), or, above the shard
size, ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` whose
``weight_map`` says which shard holds each tensor. Each shard is opened by its own reader
(lazily); ``config.json``, when present, is kept as metadata.
"""
from __future__ import annotations

import collections
import json
import os

from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpoint
from ..lazy import LazyTensor
from . import detect, register

__all__ = ["open_hf_dir"]

_SINGLE = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
           "diffusion_pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def _index_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".index.json"))
    # safetensors first: the format transformers prefers when both exist
    return sorted(names, key=lambda n: (".safetensors" not in n, n))


def _sniff(path: str, head: bytes) -> bool:
    names = os.listdir(path)
    return bool(_index_files(path)) or any(n in names for n in _SINGLE)


@register("hf-folder", sniff=_sniff, priority=5, directory=True)
def open_hf_dir(path: str, trust: bool = False) -> Checkpoint:
    """Open a Hugging Face folder: all shards behind one flat, lazy state dict."""
    indexes = _index_files(path)
    scans = []
    closers = []
    tensors: dict[str, LazyTensor] = collections.OrderedDict()
    metadata: dict = {}
    if indexes:
        index_path = os.path.join(path, indexes[0])
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpoint(f"{indexes[0]} is not a valid shard index ({e})", path=path,
                                    hint=f"download {indexes[0]} again (a JSON object with a weight_map)") from e
        if not isinstance(weight_map, dict):
            raise CorruptCheckpoint(f"{indexes[0]}: weight_map is not an object", path=path)
        shards = list(dict.fromkeys(weight_map.values()))
        metadata["index"] = {"file": indexes[0], "shards": len(shards), **(index.get("metadata") or {})}
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise CorruptCheckpoint(f"{indexes[0]} names a shard outside the folder: {shard!r}", path=path)
            spath = os.path.join(path, shard)
            if not os.path.exists(spath):
                raise CorruptCheckpoint(f"shard {shard} listed in {indexes[0]} is missing", path=path,
                                        hint="download every shard of the checkpoint")
            ck = detect(spath).open(spath, trust)
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
        single = next(n for n in _SINGLE if n in names)
        spath = os.path.join(path, single)
        ck = detect(spath).open(spath, trust)
        scans.extend(ck.scans)
        closers.append(ck.close)
        tensors.update(ck.state_dict().tensors)
        metadata["file"] = single
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        try:
            with open(cfg) as f:
                metadata["config"] = json.load(f)
        except (OSError, ValueError):
            metadata["config"] = "<unreadable config.json>"
    return Checkpoint(path=path, format="hf-folder", tree=tensors, scans=tuple(scans), metadata=metadata,
                      closers=tuple(closers))
