"""The parts of a training checkpoint, found by what they hold: the model's weights, optimizer and
scheduler states, a grad scaler, RNG states, epoch and step, in one file or a Trainer folder."""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import Checkpoint, is_optimizer_state
from ..errors import CheckpointError, LoadError
from ..formats import open_checkpoint
from ..lazy import LazyTensor
from ..pickle_numpy import NumpyArray
from ..safety import Placeholder, PlaceholderClass

__all__ = ["Parts", "read_parts", "real_value"]

_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
_HF_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "rng_state.pth")


@dataclass
class Parts:
    """The pieces of a training checkpoint, as found (lazy trees; nothing materialised)."""

    layout: str
    model: Checkpoint
    optimizers: list[tuple[str, Any]] = field(default_factory=list)
    schedulers: list[tuple[str, Any]] = field(default_factory=list)
    scaler: tuple[str, Any] | None = None
    rng: dict[str, tuple[str, Any]] = field(default_factory=dict)
    epoch: Any = None
    step: Any = None
    loss: Any = None
    opened: list[Checkpoint] = field(default_factory=list)

    def close(self) -> None:
        for c in self.opened:
            c.close()


def _word_in(key: str, *words: str) -> bool:
    k = key.lower()
    return any(w in k for w in words)


def _scaler_like(v: Any) -> bool:
    return isinstance(v, dict) and "scale" in v and set(map(str, v)) <= _SCALER_KEYS


def _rng_kind(key: str) -> str | None:
    k = key.lower()
    if "cuda" in k or "gpu" in k:
        return "cuda"
    if "numpy" in k or k in ("np", "np_rng_state"):
        return "numpy"
    if "python" in k or k in ("py", "random", "py_rng_state"):
        return "python"
    if "torch" in k or "cpu" in k:
        return "torch"
    return None


def _collect_rng(key: str, value: Any, out: dict[str, tuple[str, Any]]) -> None:
    """RNG states saved under ``key``: a dict of them (``{"python", "numpy", "cpu", "cuda"}``) or one."""
    if isinstance(value, dict):
        for k, v in value.items():
            kind = _rng_kind(str(k))
            if kind:
                out.setdefault(kind, (f"{key}.{k}", v))
        return
    kind = _rng_kind(key) or ("torch" if isinstance(value, LazyTensor) and value.dtype == torch.uint8 else None)
    if kind:
        out.setdefault(kind, (key, value))


def _scalar(v: Any) -> Any:
    if isinstance(v, LazyTensor):
        if v.numel != 1:
            return None
        return v.load().item()
    if isinstance(v, bool):
        return None
    return v if isinstance(v, int | float) else None


def _optimizer_state(v: dict) -> dict:
    """An optimizer state as ``Optimizer.state_dict()`` lays it out. A DCP folder stores the list
    ``param_groups`` as a dict keyed by each group's index; it is put back in index order."""
    groups = v.get("param_groups")
    if isinstance(groups, dict) and all(str(k).isdigit() for k in groups):
        return {**v, "param_groups": [groups[k] for k in sorted(groups, key=lambda k: int(k))]}
    return v


def _unflatten_optimizer(v: dict) -> dict | None:
    """The nested optimizer state of a flattened one, or None when ``v`` is not one.

    ``get_state_dict(..., options=StateDictOptions(flatten_optimizer_state_dict=True))`` (as
    torchtitan saves) writes ``state.<name>.<key>`` and ``param_groups.<name>.<hyper-parameter>``
    for each parameter name. Parameters are grouped again by equal hyper-parameters, in the order
    the groups were saved (two saved groups with equal hyper-parameters become one).
    """
    if not v or not all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in v):
        return None
    hyper: dict[str, dict] = {}
    for k, x in v.items():
        if k.startswith("param_groups."):
            name, _, hp = k[len("param_groups."):].rpartition(".")
            if not name or not hp:
                return None
            hyper.setdefault(name, {})[hp] = x
    names = sorted(hyper, key=len, reverse=True)  # the longest name first: "a.b" before "a"
    state: dict[str, dict] = {}
    for k, x in v.items():
        if k.startswith("state."):
            rest = k[len("state."):]
            name = next((n for n in names if rest.startswith(n + ".")), None)
            if name is None:
                return None  # state of a parameter in no group: not this layout
            node = state.setdefault(name, {})
            *path, leaf = rest[len(name) + 1:].split(".")
            for part in path:  # nested states (Shampoo) are flattened level by level
                node = node.setdefault(part, {})
            node[leaf] = x
    groups: list[dict] = []
    for name, hp in hyper.items():
        group = next((g for g in groups if {k: x for k, x in g.items() if k != "params"} == hp), None)
        if group is None:
            group = {**hp, "params": []}
            groups.append(group)
        group["params"].append(name)
    return {"state": state, "param_groups": groups} if groups else None


def _find_parts(tree: Any, parts: Parts) -> None:
    """Fill ``parts`` from a training dict's top level."""
    if not isinstance(tree, dict):
        return
    for key, v in tree.items():
        if not isinstance(key, str):
            continue
        flat = _unflatten_optimizer(v) if isinstance(v, dict) and not is_optimizer_state(v) else None
        if flat is not None:
            parts.optimizers.append((key, flat))
        elif isinstance(v, dict) and is_optimizer_state(v):
            parts.optimizers.append((key, _optimizer_state(v)))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, dict) and is_optimizer_state(x) for x in v):
            parts.optimizers.extend((f"{key}.{i}", _optimizer_state(x)) for i, x in enumerate(v))
        elif _word_in(key, "sched"):
            if isinstance(v, dict):
                parts.schedulers.append((key, v))
            elif isinstance(v, list | tuple):
                parts.schedulers.extend((f"{key}.{i}", x) for i, x in enumerate(v) if isinstance(x, dict))
        elif parts.scaler is None and (_scaler_like(v) or (isinstance(v, dict) and (
                _word_in(key, "scaler", "native_amp_scaling_state") or key == "MixedPrecision"))):
            parts.scaler = (key, v)
        elif _word_in(key, "rng", "random_state"):
            _collect_rng(key, v, parts.rng)
    for name in ("epoch", "current_epoch"):
        if parts.epoch is None and name in tree:
            parts.epoch = _scalar(tree[name])
    for name in ("global_step", "step", "iteration", "iter", "steps", "num_updates"):
        if parts.step is None and name in tree:
            parts.step = _scalar(tree[name])
    if "loss" in tree:
        parts.loss = _scalar(tree["loss"])


def _layout_name(tree: Any, fmt: str = "") -> str:
    keys = set(tree) if isinstance(tree, dict) else set()
    if fmt == "dcp":
        return "DCP folder"
    if keys & {"optimizer_states", "lr_schedulers", "loops", "pytorch-lightning_version"}:
        return "Lightning"
    if "model_state_dict" in keys and "optimizer_state_dict" in keys:
        return "PyTorch tutorial dict"
    if "state_dict" in keys and "optimizer" in keys and keys & {"arch", "version"}:
        return "timm"
    return "training dict"


def read_parts(path: str, trust: bool) -> Parts:
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in _HF_FILES):
        return _read_hf_folder(path, trust)
    ckpt = open_checkpoint(path, trust=trust)
    parts = Parts(_layout_name(ckpt.tree, ckpt.format), ckpt, opened=[ckpt])
    _find_parts(ckpt.tree, parts)
    return parts


def _read_hf_folder(path: str, trust: bool) -> Parts:
    """A Hugging Face Trainer ``checkpoint-N/`` folder: one file per part."""
    model = open_checkpoint(path, trust=trust)
    parts = Parts("Hugging Face Trainer folder", model, opened=[model])
    try:
        def part(name: str) -> Any:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                return None
            ck = open_checkpoint(file, trust=trust)
            parts.opened.append(ck)
            return ck.tree

        opt = part("optimizer.pt")
        if isinstance(opt, dict) and is_optimizer_state(opt):
            parts.optimizers.append(("optimizer.pt", opt))
        sched = part("scheduler.pt")
        if isinstance(sched, dict):
            parts.schedulers.append(("scheduler.pt", sched))
        scaler = part("scaler.pt")
        if isinstance(scaler, dict):
            parts.scaler = ("scaler.pt", scaler)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        for name in (f"rng_state_{rank}.pth", "rng_state.pth"):
            rng = part(name)
            if rng is not None:
                _collect_rng(name, rng, parts.rng)
                break
        state_file = os.path.join(path, "trainer_state.json")
        if os.path.exists(state_file):
            try:
                with open(state_file, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"trainer_state.json is not valid JSON ({e})", path=path) from e
            if isinstance(state, dict):
                parts.step = _scalar(state.get("global_step"))
                parts.epoch = _scalar(state.get("epoch"))
    except BaseException:
        parts.close()
        raise
    return parts


def real_value(obj: Any, where: str) -> Any:
    """A lazily read tree made real: tensors read (and copied off the file), numpy arrays rebuilt.

    An object of a class ckptfit does not rebuild (an inert placeholder) cannot be handed to
    PyTorch: it is refused, naming where it is.
    """
    if isinstance(obj, LazyTensor):
        return obj.load().clone()
    if isinstance(obj, NumpyArray):
        return obj.value
    if isinstance(obj, Placeholder | PlaceholderClass):
        raise LoadError(f"{where} holds an object of class {obj.qualname}, which ckptfit does not rebuild "
                        f"(no code from the file is run)", hint="restore that part yourself, or leave it out (pass None for it)")
    if isinstance(obj, dict):
        items = [(k, real_value(v, f"{where}.{k}")) for k, v in obj.items()]
        if type(obj) in (dict, collections.OrderedDict, collections.Counter):
            return type(obj)(items) if type(obj) is not collections.Counter else collections.Counter(dict(items))
        return dict(items)
    if isinstance(obj, list):
        return [real_value(v, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(real_value(v, f"{where}.{i}") for i, v in enumerate(obj))
    return obj
