"""Resume a training run, even after the model's code changed: weights, optimizer, schedule, RNG.

``optimizer.load_state_dict`` matches saved state to parameters by *position*. After a
rename, a reordering or a wrapper (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, a
new head) positions shift and momentum or Adam moments land on the wrong parameters, without
an error when the shapes happen to agree. :func:`resume` loads the model through the same
plan as :func:`ckptfit.load`, names every saved optimizer state by the saved model's
parameter order, and follows the plan to the parameter that now holds those weights (by
identity, never by position alone). A saved state whose shape does not fit the parameter it
would be attached to is refused; new parameters start with fresh state; the state of
parameters that no longer exist is reported.

Layouts recognised: the PyTorch tutorial dict (``model_state_dict``, ``optimizer_state_dict``,
``epoch``, ``loss``), timm ``train.py`` checkpoints (``state_dict``, ``optimizer``,
``amp_scaler``, ``epoch``), Lightning ``.ckpt`` files (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``global_step``), Hugging Face Trainer ``checkpoint-N/`` folders
(``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``,
``trainer_state.json``), and any dict holding such parts. Every file is read by ckptfit's
restricted reader: no code from the file runs.
"""
from __future__ import annotations

import collections
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._fold import fold_keys
from .checkpoint import Checkpoint, _is_optimizer_state
from .errors import CheckpointError, LoadError
from .lazy import LazyTensor
from .plan import Plan
from .report import LoadReport
from .pickle_numpy import NumpyArray
from .safety import Placeholder, PlaceholderClass

__all__ = ["resume", "ResumeReport", "OptimizerMapping", "ResumePlan", "describe_resume"]

# buffers a model keeps beside its parameters, recognised by name when the model does not say
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked", "position_ids", "inv_freq")
_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
_HF_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "rng_state.pth")


# ---------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class OptimizerMapping:
    """How one saved optimizer state was put onto the new optimizer's parameters.

    Attributes:
        where: the state's place in the checkpoint (``"optimizer_state_dict"``, ``"optimizer.pt"``).
        rule: how the saved parameter ids were named (``"parameter order"``, ...).
        mapped: ``(model parameter, checkpoint parameter)`` pairs whose state was restored.
        fresh: ``(model parameter, why)``: parameters that start with fresh optimizer state.
        dropped: ``(checkpoint parameter, why)``: saved states that went nowhere.
        groups: number of parameter groups (saved, new).
        hyperparams: what happened to the groups' hyper-parameters (lr, betas ...).
        problems: why the state cannot be restored (empty when it was or can be).
    """

    where: str
    rule: str
    mapped: tuple[tuple[str, str], ...] = ()
    fresh: tuple[tuple[str, str], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    groups: tuple[int, int | None] = (0, None)
    hyperparams: str = ""
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the state can be restored as mapped."""
        return not self.problems

    def lines(self, verb: str = "mapped") -> list[str]:
        """The human summary, keys folded, one item per line."""
        saved, new = self.groups
        groups = f"{saved} group{'s' if saved != 1 else ''}"
        if new is not None and new != saved:
            groups += f" saved, {new} now"
        head = f"optimizer {self.where!r} ({groups}): "
        if self.problems:
            out = [head + "— refused"]
            out += [f"  {p}" for p in self.problems]
            return out
        total = len(self.mapped) + len(self.dropped)
        out = [head + f"{len(self.mapped)}/{total} parameter states {verb} by {self.rule}"]
        for title, items in (("fresh state", self.fresh), ("dropped", self.dropped)):
            if not items:
                continue
            out.append(f"  {title} ({len(items)}):")
            by_reason: dict[str, list[str]] = {}
            for key, why in items:
                by_reason.setdefault(why, []).append(key)
            for why, keys in by_reason.items():
                out.append(f"    {', '.join(fold_keys(keys))} — {why}")
        if self.hyperparams:
            out.append(f"  hyper-parameters: {self.hyperparams}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "rule": self.rule, "mapped": [list(p) for p in self.mapped],
                "fresh": [list(p) for p in self.fresh], "dropped": [list(p) for p in self.dropped],
                "groups": list(self.groups), "hyperparams": self.hyperparams, "problems": list(self.problems),
                "ok": self.ok}


@dataclass(frozen=True)
class ResumeReport:
    """What :func:`resume` restored: the model (a :class:`LoadReport`), optimizer, scheduler, scaler, RNG, counters.

    Attributes:
        path: the checkpoint file or folder.
        layout: the training-checkpoint layout recognised (``"PyTorch tutorial dict"``, ``"timm"``,
            ``"Lightning"``, ``"Hugging Face Trainer folder"``, ``"training dict"``).
        model: the report of the model's load.
        optimizers: one :class:`OptimizerMapping` per optimizer restored.
        schedulers: one line per LR scheduler (restored, or why not).
        scaler: what happened to the AMP grad scaler, if one was passed or saved.
        rng: the random number generators restored (``"torch"``, ``"cuda"``, ``"numpy"``, ``"python"``).
        epoch: the epoch counter as saved, if any.
        step: the global step as saved, if any.
        loss: the loss as saved, if any.
        notes: anything else worth knowing (parts of the file not restored, and why).
    """

    path: str
    layout: str
    model: LoadReport
    optimizers: tuple[OptimizerMapping, ...] = ()
    schedulers: tuple[str, ...] = ()
    scaler: str | None = None
    rng: tuple[str, ...] = ()
    epoch: int | float | None = None
    step: int | None = None
    loss: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def optimizer(self) -> OptimizerMapping | None:
        """The first (usually only) optimizer's mapping."""
        return self.optimizers[0] if self.optimizers else None

    def to_text(self) -> str:
        """The human summary; ``str(report)`` is this."""
        lines = [f"Resumed from {os.path.basename(self.path.rstrip(os.sep)) or self.path} ({self.layout})"]
        counters = [f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step), ("loss", self.loss))
                    if v is not None]
        if counters:
            lines.append("  " + ", ".join(counters))
        lines += ["  " + ln for ln in ("model: " + self.model.to_text()).splitlines()]
        for o in self.optimizers:
            lines += ["  " + ln for ln in o.lines("restored")]
        lines += [f"  scheduler {s}" for s in self.schedulers]
        if self.scaler:
            lines.append(f"  grad scaler: {self.scaler}")
        if self.rng:
            lines.append(f"  rng restored: {', '.join(self.rng)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"path": self.path, "layout": self.layout, "model": self.model.to_dict(),
                "optimizers": [o.to_dict() for o in self.optimizers], "schedulers": list(self.schedulers),
                "scaler": self.scaler, "rng": list(self.rng), "epoch": self.epoch, "step": self.step,
                "loss": self.loss, "notes": list(self.notes)}


# ---------------------------------------------------------------------------------- reading the parts

@dataclass
class _Parts:
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


def _find_parts(tree: Any, parts: _Parts) -> None:
    """Fill ``parts`` from a training dict's top level."""
    if not isinstance(tree, dict):
        return
    for key, v in tree.items():
        if not isinstance(key, str):
            continue
        if isinstance(v, dict) and _is_optimizer_state(v):
            parts.optimizers.append((key, v))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, dict) and _is_optimizer_state(x) for x in v):
            parts.optimizers.extend((f"{key}.{i}", x) for i, x in enumerate(v))
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


def _layout_name(tree: Any) -> str:
    keys = set(tree) if isinstance(tree, dict) else set()
    if keys & {"optimizer_states", "lr_schedulers", "loops", "pytorch-lightning_version"}:
        return "Lightning"
    if "model_state_dict" in keys and "optimizer_state_dict" in keys:
        return "PyTorch tutorial dict"
    if "state_dict" in keys and "optimizer" in keys and keys & {"arch", "version"}:
        return "timm"
    return "training dict"


def _read_parts(path: str, trust: bool) -> _Parts:
    from .loading import open as open_checkpoint

    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in _HF_FILES):
        return _read_hf_folder(path, trust)
    ckpt = open_checkpoint(path, trust=trust)
    parts = _Parts(_layout_name(ckpt.tree), ckpt, opened=[ckpt])
    _find_parts(ckpt.tree, parts)
    return parts


def _read_hf_folder(path: str, trust: bool) -> _Parts:
    """A Hugging Face Trainer ``checkpoint-N/`` folder: one file per part."""
    from .loading import open as open_checkpoint

    model = open_checkpoint(path, trust=trust)
    parts = _Parts("Hugging Face Trainer folder", model, opened=[model])
    try:
        def part(name: str) -> Any:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                return None
            ck = open_checkpoint(file, trust=trust)
            parts.opened.append(ck)
            return ck.tree

        opt = part("optimizer.pt")
        if isinstance(opt, dict) and _is_optimizer_state(opt):
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


def _real(obj: Any, where: str) -> Any:
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
        items = [(k, _real(v, f"{where}.{k}")) for k, v in obj.items()]
        if type(obj) in (dict, collections.OrderedDict, collections.Counter):
            return type(obj)(items) if type(obj) is not collections.Counter else collections.Counter(dict(items))
        return dict(items)
    if isinstance(obj, list):
        return [_real(v, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_real(v, f"{where}.{i}") for i, v in enumerate(obj))
    return obj


# ---------------------------------------------------------------------------------- optimizer mapping

class _Model:
    """The model's parameter names, by identity, and the plan's source for each."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.names: dict[int, list[str]] = {}
        self.buffers: set[str] = set()
        self.order = [name for name, _p in model.named_parameters()]  # model.parameters() order
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
        self.params = {n for ns in self.names.values() for n in ns}
        for name, _b in model.named_buffers(remove_duplicate=False):
            self.buffers.add(name)
        self.decisions = {d.target: d for d in plan.decisions}
        self.to_targets: dict[str, list[str]] = {}
        for d in plan.decisions:
            if d.source is not None and d.action in ("load", "skip_shape"):
                self.to_targets.setdefault(d.source, []).append(d.target)

    def decision(self, p: torch.Tensor):
        """The plan's decision for parameter ``p`` (one that loads it, where a tie gives a choice)."""
        ds = [self.decisions[n] for n in self.names.get(id(p), []) if n in self.decisions]
        return next((d for d in ds if d.action == "load"), ds[0] if ds else None)


def _file_params(tensors: Mapping[str, LazyTensor], m: _Model) -> tuple[list[str], list[str]]:
    """``(parameters, maybe parameters)`` of the checkpoint's state dict, in file order.

    A tensor the plan puts into a model parameter is a parameter; into a buffer, a buffer;
    one the plan does not use is a buffer by its name (``running_mean``) or dtype (integer),
    otherwise it may be either. A tensor stored twice (tied weights) counts once, as
    ``model.parameters()`` counts it.
    """
    params: list[str] = []
    maybe: list[str] = []
    seen: set[tuple] = set()
    for key, t in tensors.items():
        if t.storage_key is not None:
            ident = (t.storage_key, t.storage_offset, t.shape, t.stride)
            if ident in seen:
                continue
            seen.add(ident)
        targets = m.to_targets.get(key, [])
        if any(t_ in m.params for t_ in targets):
            params.append(key)
        elif targets:
            continue  # a buffer
        elif key.rsplit(".", 1)[-1] in _BUFFER_NAMES or not (t.dtype.is_floating_point or t.dtype.is_complex):
            continue
        else:
            maybe.append(key)
    return params, maybe


def _fits(state: tuple[int, ...], param: tuple[int, ...]) -> bool:
    """A state tensor's shape that belongs to a parameter of shape ``param``.

    The same shape (momentum, Adam moments), a scalar (``step``), or a factored second moment
    (Adafactor: the parameter's shape without one of its last two dimensions).
    """
    if state == () or state == param:
        return True
    if len(param) >= 2:
        head, a, b = param[:-2], param[-2], param[-1]
        return state in (head + (a,), head + (b,), head + (a, 1), head + (1, b))
    return False


def _state_problems(ids: Mapping[Any, str], state: Mapping[Any, Any],
                    shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    out = []
    for sid, src in ids.items():
        s = state.get(sid)
        if not isinstance(s, dict):
            continue
        for k, v in s.items():
            if isinstance(v, LazyTensor) and not _fits(v.shape, shapes[src]):
                out.append(f"saved state {sid} ({k} {list(v.shape)}) does not fit {src} {list(shapes[src])}")
    return out


def _resolve_name(name: str, keys: Sequence[str]) -> str | None:
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


@dataclass
class _Assignment:
    rule: str
    ids: dict[Any, str]  # saved id -> checkpoint key
    problems: list[str]


def _in_model_order(tensors: Mapping[str, LazyTensor], m: _Model) -> dict[str, LazyTensor]:
    """The checkpoint's tensors reordered as the model orders the parameters they fill (the rest after)."""
    out: dict[str, LazyTensor] = {}
    for name in m.order:
        d = m.decisions.get(name)
        if d is not None and d.source in tensors and d.action in ("load", "skip_shape"):
            out.setdefault(d.source, tensors[d.source])
    for k, t in tensors.items():
        out.setdefault(k, t)
    return out


def _name_saved_ids(saved_groups: list[dict], state: Mapping[Any, Any], tensors: Mapping[str, LazyTensor],
                    m: _Model, new_groups: list[list[torch.Tensor]] | None,
                    file_order: bool = True) -> tuple[_Assignment | None, list[str]]:
    """Name every saved parameter id with its checkpoint key, or say why that cannot be done safely.

    ``file_order``: the file keeps the saved model's order (``torch.save`` does; safetensors
    sorts its keys, so there the model's own parameter order stands in for it).
    """
    flat = [sid for g in saved_groups for sid in g["params"]]
    group_of = {sid: i for i, g in enumerate(saved_groups) for sid in g["params"]}
    shapes = {k: t.shape for k, t in tensors.items()}
    keys = list(tensors)

    # the new optimizer's group of each checkpoint key (through the plan and parameter identity)
    new_group_of: dict[str, int] = {}
    new_sources: list[list[str]] = []
    if new_groups is not None:
        for gi, ps in enumerate(new_groups):
            srcs = []
            for p in ps:
                d = m.decision(p)
                if d is not None and d.source is not None and d.action in ("load", "skip_shape"):
                    new_group_of.setdefault(d.source, gi)
                    srcs.append(d.source)
            new_sources.append(srcs)

    def group_problems(ids: Mapping[Any, str]) -> list[str]:
        if new_groups is None:
            return []
        out = []
        for sid, src in ids.items():
            j = new_group_of.get(src)
            if j is not None and j != group_of[sid]:
                t = m.to_targets.get(src, [src])[0]
                out.append(f"{t} (checkpoint {src}) was in parameter group {group_of[sid]} of the saved optimizer "
                           f"and is in group {j} of yours")
        return out

    # names saved with the state (optimizers built from named_parameters, FSDP/DCP optimizer state dicts)
    names = [g.get("param_names") for g in saved_groups]
    if all(isinstance(n, list) and len(n) == len(g["params"]) for n, g in zip(names, saved_groups)) or \
            all(isinstance(sid, str) for sid in flat):
        given = [str(n) for ns, g in zip(names, saved_groups) for n in (ns if isinstance(ns, list) else g["params"])]
        resolved = {sid: _resolve_name(n, keys) for sid, n in zip(flat, given)}
        if all(k is not None for k in resolved.values()):
            ids = {sid: k for sid, k in resolved.items() if k is not None}
            return _Assignment("the names saved with it", ids,
                               _state_problems(ids, state, shapes) + group_problems(ids)), []

    params, maybe = _file_params(tensors, m)
    order_name = "parameter order"
    if not file_order:  # only parameters the model places can be put in order
        tensors = _in_model_order(tensors, m)
        params = [k for k in tensors if k in set(params)]
        maybe = []
        order_name = "the model's parameter order (the file keeps none)"
    tried: list[str] = []
    # A: ids follow the saved model's parameter order, across groups in order (model.parameters())
    order: list[str] | None = None
    if len(params) == len(flat):
        order = params
    elif len(params) + len(maybe) == len(flat):
        order = [k for k in tensors if k in set(params) | set(maybe)]
    if order is not None:
        ids = dict(zip(flat, order))
        shape_p = _state_problems(ids, state, shapes)
        group_p = group_problems(ids)
        if not shape_p and not group_p:
            return _Assignment(order_name, ids, []), []
        if not shape_p:  # names fit, only the grouping changed: never guess which grouping is right
            return _Assignment(order_name, ids, group_p), []
        tried.append(f"by {order_name}: " + shape_p[0]
                     + (f" (and {len(shape_p) - 1} more)" if len(shape_p) > 1 else ""))
    else:
        amb = f" and {len(maybe)} tensor(s) that may be parameters or buffers" if maybe else ""
        tried.append(f"the saved optimizer holds {len(flat)} parameters, the checkpoint's model "
                     f"{len(params)} parameters{amb}")

    # B: each group filtered from the parameters in order (weight decay / no decay, as HF Trainer
    # and timm build them): the new optimizer's groups say which parameters each group holds
    if new_groups is not None and len(new_groups) >= len(saved_groups):
        members = [list(s) for s in new_sources[: len(saved_groups)]]
        extra = [s for srcs in new_sources[len(saved_groups):] for s in srcs]
        used = {s for srcs in members for s in srcs}
        leftover = [k for k in tensors if (k in params or k in maybe) and k not in used and k not in extra]
        deficits = [len(g["params"]) - len(ms) for g, ms in zip(saved_groups, members)]
        formable = all(d >= 0 for d in deficits) and not extra
        if formable and sum(deficits):
            short = [i for i, d in enumerate(deficits) if d]
            real_left = [k for k in leftover if k in params]
            pick = real_left if len(real_left) == sum(deficits) else leftover
            if len(short) == 1 and len(pick) == deficits[short[0]]:
                members[short[0]] += pick
            else:
                formable = False
        if formable:
            rank = {k: i for i, k in enumerate(tensors)}
            ids = {}
            for g, ms in zip(saved_groups, members):
                ids.update(zip(g["params"], sorted(ms, key=rank.__getitem__)))
            shape_p = _state_problems(ids, state, shapes)
            if not shape_p:
                return _Assignment(order_name + " within each group", ids, []), []
            tried.append(f"by {order_name} within each group: " + shape_p[0])
    return None, tried


def _map_optimizer(where: str, saved: Any, tensors: Mapping[str, LazyTensor], m: _Model,
                   new_groups: list[list[torch.Tensor]] | None, *, keep_hyperparams: bool = False,
                   new_param_groups: list[dict] | None = None, file_order: bool = True
                   ) -> tuple[OptimizerMapping, dict | None]:
    """Map one saved optimizer state onto the new optimizer's groups.

    Returns the mapping and, when ``new_groups`` is given and nothing is refused, the
    state dict to hand to ``optimizer.load_state_dict`` (still lazy: tensors are read later).
    """
    groups = saved.get("param_groups")
    state = saved.get("state")
    n_new = len(new_groups) if new_groups is not None else None
    bad = OptimizerMapping(where, "", groups=(len(groups) if isinstance(groups, list) else 0, n_new))
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups) or not isinstance(state, dict):
        return _with(bad, problems=("the optimizer state is not laid out as Optimizer.state_dict() writes it "
                                    "(param_groups with params lists)",)), None
    assignment, tried = _name_saved_ids(groups, state, tensors, m, new_groups, file_order)
    if assignment is None:
        return _with(bad, problems=("cannot tell which saved state belongs to which parameter: "
                                    + "; ".join(tried),
                                    "build the optimizer as it was built for the saved run (same parameter "
                                    "groups), or pass optimizer=None to start it afresh")), None
    if assignment.problems:
        return _with(bad, rule=assignment.rule, problems=tuple(assignment.problems)), None
    ids = assignment.ids
    by_source = {src: sid for sid, src in ids.items()}
    mapped: list[tuple[str, str]] = []
    fresh: list[tuple[str, str]] = []
    problems: list[str] = []
    taken: set[Any] = set()
    new_state: dict[int, Any] = {}
    out_groups: list[dict] = []
    index = 0
    plan_groups = new_groups if new_groups is not None else [
        [None] * len(g["params"]) for g in groups]  # the saved grouping, to describe a plan
    for gi, ps in enumerate(plan_groups):
        params_ids = []
        for pi, p in enumerate(ps):
            params_ids.append(index)
            if p is None:  # describing: follow the saved ids
                sid = groups[gi]["params"][pi]
                src = ids[sid]
                targets = [t for t in m.to_targets.get(src, []) if t in m.params]
                ds = [m.decisions[t] for t in targets]
                d = next((d for d in ds if d.action == "load"), ds[0] if ds else None)
                if d is not None and d.action == "load":
                    mapped.append((d.target, src))
                    taken.add(sid)
                index += 1
                continue
            d = m.decision(p)
            name = m.names.get(id(p), ["<not a parameter of the model>"])[0]
            if d is None:
                fresh.append((name, "not a parameter of the model"))
            elif d.action == "load" and d.source in by_source:
                sid = by_source[d.source]
                if d.transform is not None:
                    problems.append(f"{d.target}: its weights are converted while loading ({d.transform.detail}); "
                                    f"optimizer state is not converted")
                taken.add(sid)
                mapped.append((d.target, d.source))
                if isinstance(state.get(sid), dict) and state[sid]:
                    new_state[index] = state[sid]
            elif d.action == "load":
                fresh.append((d.target, "its checkpoint tensor had no optimizer state"))
            elif d.action == "skip_shape":
                fresh.append((d.target, f"shape changed: checkpoint {list(d.source_shape or ())}, "
                                        f"model {list(d.target_shape)}"))
            else:
                fresh.append((d.target, "new: not in the checkpoint"))
            index += 1
        if new_param_groups is not None:
            own = {k: v for k, v in new_param_groups[gi].items() if k != "params"}
            if gi < len(groups) and not keep_hyperparams:
                own.update({k: v for k, v in groups[gi].items() if k not in ("params", "param_names")})
            own["params"] = params_ids
            out_groups.append(own)
    dropped: list[tuple[str, str]] = []
    for sid, src in ids.items():
        if sid in taken or not (isinstance(state.get(sid), dict) and state[sid]):
            continue
        targets = m.to_targets.get(src, [])
        ds = [m.decisions[t] for t in targets]
        if any(d.action == "skip_shape" for d in ds):
            d = next(d for d in ds if d.action == "skip_shape")
            why = f"shape changed: checkpoint {list(d.source_shape or ())}, model {list(d.target_shape)}"
        elif any(t in m.params for t in targets):
            why = f"its parameter {targets[0]} is not in the optimizer"
        elif targets:
            why = f"loaded into buffer {targets[0]}"
        else:
            why = "parameter no longer in the model"
        dropped.append((src, why))
    if keep_hyperparams:
        hyper = "kept as the optimizer has them (keep_hyperparams=True)"
    else:
        lrs = [f"{x:g}" for x in (g.get("lr") for g in groups) if isinstance(x, float | int)]
        hyper = "restored from the checkpoint" + (f" (lr {', '.join(lrs)})" if lrs else "")
        if new_groups is not None and len(new_groups) > len(groups):
            hyper += f"; groups {len(groups)}..{len(new_groups) - 1} are new and keep theirs"
    if new_groups is not None:
        extra_saved = len(groups) - len(new_groups)
        if extra_saved > 0:
            problems.append(f"the saved optimizer has {len(groups)} parameter groups, yours {len(new_groups)}")
    mapping = OptimizerMapping(where, assignment.rule, tuple(mapped), tuple(fresh), tuple(dropped),
                               (len(groups), n_new), hyper, tuple(problems))
    if problems or new_param_groups is None:
        return mapping, None
    return mapping, {"state": new_state, "param_groups": out_groups}


def _with(m: OptimizerMapping, **changes: Any) -> OptimizerMapping:
    from dataclasses import replace

    return replace(m, **changes)


# ---------------------------------------------------------------------------------- the verb

def _keeps_order(ckpt: Checkpoint) -> bool:
    """Whether the file lists tensors in the order they were saved (safetensors sorts them by name)."""
    if ckpt.format == "safetensors":
        return False
    if ckpt.format == "hf-folder" and os.path.isdir(ckpt.path):
        return not any(n.endswith(".safetensors") for n in os.listdir(ckpt.path))
    return True


def _plan_tensors(ckpt: Checkpoint, p: Plan) -> Mapping[str, LazyTensor]:
    """The checkpoint tensors the plan ``p`` was made from (its container), in file order."""
    try:
        return ckpt.state_dict(p.container).tensors if p.container is not None else ckpt.state_dict().tensors
    except CheckpointError as e:
        raise LoadError(f"cannot map optimizer state: the model's weights come from {p.container!r}, which ckptfit "
                        f"cannot list in file order ({e.detail})", path=ckpt.path,
                        hint="resume with use= naming the state dict itself") from e


def _as_list(x: Any, name: str, cls: type | tuple[type, ...] | None = None) -> list:
    if x is None:
        return []
    items = list(x) if isinstance(x, list | tuple) else [x]
    if cls is not None:
        for it in items:
            if not isinstance(it, cls):
                raise TypeError(f"{name}= must be a {getattr(cls, '__name__', cls)} (or a list of them), "
                                f"not {type(it).__name__}")
    return items


def _restore_rng(rng: Mapping[str, tuple[str, Any]], notes: list[str]) -> list[str]:
    """Set the generators the file saved; returns the names of those restored."""
    done = []
    for kind in ("torch", "cuda", "numpy", "python"):
        if kind not in rng:
            continue
        where, value = rng[kind]
        try:
            value = _real(value, where)
            if kind == "torch":
                torch.set_rng_state(value)
            elif kind == "cuda":
                states = list(value) if isinstance(value, list | tuple) else [value]
                if not torch.cuda.is_available():
                    notes.append(f"{where}: CUDA RNG state not restored (no GPU here)")
                    continue
                n = min(len(states), torch.cuda.device_count())
                for i in range(n):
                    torch.cuda.set_rng_state(states[i], i)
                if n != len(states):
                    notes.append(f"{where}: {len(states)} CUDA RNG states saved, {n} GPUs here; restored {n}")
            elif kind == "numpy":
                import numpy as np

                np.random.set_state(value)
            else:
                random.setstate(_tuples(value))
        except (TypeError, ValueError, RuntimeError, LoadError) as e:
            notes.append(f"{where}: {kind} RNG state not restored ({e})")
            continue
        done.append(kind)
    return done


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list | tuple) else v


def resume(path: str | os.PathLike[str], model: nn.Module, optimizer: Any = None, scheduler: Any = None,
           scaler: Any = None, *, partial: bool = False, use: str | None = None,
           rename: Sequence[tuple[str, str]] | None = None, include: Sequence[str] | None = None,
           exclude: Sequence[str] | None = None, keep_hyperparams: bool = False, restore_rng: bool = True,
           trust: bool = False) -> ResumeReport:
    """Continue a training run from a checkpoint, even after the model's code changed.

    The model is loaded through the same plan as :func:`ckptfit.load` (prefixes such as
    ``module.`` and ``_orig_mod.`` reconciled, renames, shapes checked). Each saved optimizer
    state is then named by the saved model's parameter order and put onto the parameter the
    plan filled from that tensor, by identity, never by position alone; a state whose shape
    does not fit is refused. New parameters (``partial=True``) start with fresh state; states
    of parameters that no longer exist are reported. Then the LR scheduler, the AMP grad
    scaler and the RNG states are restored, and the saved epoch and step are returned.
    Everything is checked before anything changes: on a refusal nothing was modified.

    Args:
        path: the checkpoint file (tutorial dict, timm, Lightning ``.ckpt`` ...) or a Hugging
            Face Trainer ``checkpoint-N`` folder.
        model: the model to fill, in place.
        optimizer: the new optimizer, built over ``model``'s parameters (or a list of them,
            matched in order with the saved ones, as Lightning saves several).
        scheduler: an LR scheduler (or a list) whose state to restore; built on ``optimizer``.
        scaler: a ``torch.amp.GradScaler`` whose state to restore.
        partial: allow model tensors to stay at init (a new head); their parameters start with
            fresh optimizer state.
        use: which state dict in the file holds the model (as for :func:`ckptfit.load`).
        rename: ``[(regex, replacement), ...]`` applied to checkpoint keys (as for :func:`ckptfit.load`).
        include: glob patterns; only matching tensors are loaded.
        exclude: glob patterns; matching tensors are not loaded.
        keep_hyperparams: keep the optimizer's own param-group hyper-parameters (lr, betas,
            weight decay ...) instead of the saved ones.
        restore_rng: restore the torch, CUDA, numpy and Python RNG states the file holds.
        trust: allow real unpickling (runs code from the file). Never needed.

    Returns:
        A :class:`ResumeReport`; ``report.epoch`` and ``report.step`` are the saved counters.

    Raises:
        LoadError: the model or the optimizer state cannot be restored exactly (every problem
            listed; the model, optimizer, scheduler and scaler were not changed).
        CheckpointError: the file cannot be read.

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters())                # doctest: +SKIP
        >>> report = ckptfit.resume("ckpt.pth", model, optimizer)            # doctest: +SKIP
        >>> start_epoch = report.epoch + 1                                   # doctest: +SKIP
    """
    from .loading import load, plan

    if isinstance(path, nn.Module) and isinstance(model, str | os.PathLike):
        raise TypeError("the arguments are the other way round: ckptfit.resume(path, model, optimizer)")
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a checkpoint file or folder, not {type(path).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module instance, not {type(model).__name__}")
    optimizers = _as_list(optimizer, "optimizer", torch.optim.Optimizer)
    schedulers = _as_list(scheduler, "scheduler")
    for s in schedulers:
        if not callable(getattr(s, "load_state_dict", None)):
            raise TypeError(f"scheduler= must be an LR scheduler, not {type(s).__name__}")
    if scaler is not None and not callable(getattr(scaler, "load_state_dict", None)):
        raise TypeError(f"scaler= must be a torch.amp.GradScaler, not {type(scaler).__name__}")
    for name, flag in (("keep_hyperparams", keep_hyperparams), ("restore_rng", restore_rng)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}= must be True or False, not {flag!r}")
    path = os.fspath(path)
    opts = dict(partial=partial, use=use, rename=rename, include=include, exclude=exclude, trust=trust)
    parts = _read_parts(path, trust)
    try:
        p = plan(model, parts.model, **opts)
        if not p.ok:
            load(model, parts.model, **opts)  # raises the load's own LoadError; the model is not changed
        tensors = _plan_tensors(parts.model, p) if optimizers else {}
        m = _Model(model, p)
        notes: list[str] = []

        # every check first: optimizers, schedulers, scaler
        mappings: list[OptimizerMapping] = []
        to_load: list[tuple[torch.optim.Optimizer, dict, str]] = []
        if len(optimizers) > len(parts.optimizers):
            if parts.optimizers:
                raise LoadError(f"{len(optimizers)} optimizers passed, the checkpoint holds "
                                f"{len(parts.optimizers)} optimizer state(s)", path=path)
            notes.append("the checkpoint holds no optimizer state; the optimizer was left as it was")
        elif len(parts.optimizers) > len(optimizers) and optimizers:
            notes.append(f"the checkpoint holds {len(parts.optimizers)} optimizer states; restored the first "
                         f"{len(optimizers)}")
        problems: list[str] = []
        for opt, (where, saved) in zip(optimizers, parts.optimizers):
            groups = [list(g["params"]) for g in opt.param_groups]
            mapping, sd = _map_optimizer(where, saved, tensors, m, groups, keep_hyperparams=keep_hyperparams,
                                         file_order=_keeps_order(parts.model),
                                         new_param_groups=opt.param_groups)
            mappings.append(mapping)
            if not mapping.ok or sd is None:
                problems += [f"optimizer {where!r}: {x}" for x in mapping.problems]
                continue
            to_load.append((opt, sd, where))
        if problems:
            raise LoadError(f"the optimizer state in {os.path.basename(path)} cannot be restored exactly: "
                            f"{len(problems)} problem(s); nothing was changed\n"
                            + "\n".join(f"  {x}" for x in problems), path=path, problems=problems, plan=p,
                            hint="build the optimizer over the same parameter groups as the saved run, or "
                                 "resume without optimizer= to start it afresh")
        real_sds = [(opt, _real(sd, where), where) for opt, sd, where in to_load]
        sched_states: list[tuple[Any, Any, str]] = []
        if schedulers and not parts.schedulers:
            notes.append("the checkpoint holds no LR scheduler state; the scheduler was left as it was")
        for sch, (where, st) in zip(schedulers, parts.schedulers):
            st = _real(st, where)
            base = st.get("base_lrs") if isinstance(st, dict) else None
            n = len(sch.optimizer.param_groups) if hasattr(sch, "optimizer") else None
            if isinstance(base, list) and n is not None and len(base) != n:
                raise LoadError(f"scheduler {where!r} was saved for {len(base)} parameter group(s); the optimizer "
                                f"now has {n}", path=path, hint="pass scheduler=None to start a fresh schedule")
            sched_states.append((sch, st, where))
        scaler_state = None
        if scaler is not None and parts.scaler is not None:
            scaler_state = _real(parts.scaler[1], parts.scaler[0])

        # then change things: model, optimizers, schedulers, scaler, RNG
        report = load(model, parts.model, **opts)
        for opt, sd, _where in real_sds:
            opt.load_state_dict(sd)
        sched_lines = []
        for sch, st, where in sched_states:
            sch.load_state_dict(st)
            last = st.get("last_epoch") if isinstance(st, dict) else None
            sched_lines.append(f"{where!r}: restored ({type(sch).__name__}"
                               + (f", last_epoch {last})" if last is not None else ")"))
        scaler_line = None
        if scaler is not None:
            if scaler_state is None:
                scaler_line = "the checkpoint holds no grad scaler state; left as it was"
            elif not scaler_state:
                scaler_line = f"{parts.scaler[0]!r} is empty (saved from a disabled scaler); left as it was"
            elif not getattr(scaler, "is_enabled", lambda: True)():
                scaler_line = f"{parts.scaler[0]!r} not restored: this scaler is disabled"
            else:
                scaler.load_state_dict(scaler_state)
                scaler_line = f"{parts.scaler[0]!r} restored (scale {scaler_state.get('scale')})"
        elif parts.scaler is not None and parts.scaler[1]:
            notes.append(f"the checkpoint holds a grad scaler state ({parts.scaler[0]!r}); pass scaler= to restore it")
        rng_done = _restore_rng(parts.rng, notes) if restore_rng else []
        return ResumeReport(path=path, layout=parts.layout, model=report, optimizers=tuple(mappings),
                            schedulers=tuple(sched_lines), scaler=scaler_line, rng=tuple(rng_done),
                            epoch=parts.epoch, step=int(parts.step) if isinstance(parts.step, int | float) else None,
                            loss=float(parts.loss) if isinstance(parts.loss, int | float) else None,
                            notes=tuple(notes))
    finally:
        parts.close()


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`resume` would do with a checkpoint's optimizer states (``ckptfit plan --resume``).

    Attributes:
        layout: the training-checkpoint layout recognised.
        optimizers: one :class:`OptimizerMapping` per saved optimizer state.
        restorable: other parts the file holds (schedulers, grad scaler, RNG states).
        epoch: the epoch counter as saved, if any.
        step: the global step as saved, if any.
    """

    layout: str
    optimizers: tuple[OptimizerMapping, ...] = ()
    restorable: tuple[str, ...] = ()
    epoch: int | float | None = None
    step: int | float | None = None

    @property
    def ok(self) -> bool:
        """True when every optimizer state can be mapped."""
        return all(o.ok for o in self.optimizers)

    def __str__(self) -> str:
        lines = [f"resume ({self.layout}):"]
        if not self.optimizers:
            lines.append("  the checkpoint holds no optimizer state")
        for o in self.optimizers:
            lines += ["  " + ln for ln in o.lines("would map")]
        if self.restorable:
            lines.append("  also restorable: " + ", ".join(self.restorable))
        counters = [f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step)) if v is not None]
        if counters:
            lines.append("  saved at " + ", ".join(counters))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"layout": self.layout, "ok": self.ok, "optimizers": [o.to_dict() for o in self.optimizers],
                "restorable": list(self.restorable), "epoch": self.epoch, "step": self.step}


def describe_resume(model: nn.Module, path: str | os.PathLike[str], p: Plan, *, trust: bool = False) -> ResumePlan:
    """How :func:`resume` would map the optimizer states in ``path`` onto ``model``, through the plan ``p``.

    The new optimizer is not known at plan time, so the saved optimizer's own groups stand for
    it: saved ids are named by the saved model's parameter order (or the names saved with
    them) and followed through ``p`` to the model's parameters. Reads no tensor data.
    """
    parts = _read_parts(os.fspath(path), trust)
    try:
        m = _Model(model, p)
        mappings = []
        if parts.optimizers:
            tensors = _plan_tensors(parts.model, p)
            mappings = [_map_optimizer(where, saved, tensors, m, None, file_order=_keeps_order(parts.model))[0]
                        for where, saved in parts.optimizers]
        extra = [w for w, _ in parts.schedulers] + ([parts.scaler[0]] if parts.scaler else []) + \
            [w for w, _ in parts.rng.values()]
        return ResumePlan(parts.layout, tuple(mappings), tuple(extra), parts.epoch, parts.step)
    finally:
        parts.close()
