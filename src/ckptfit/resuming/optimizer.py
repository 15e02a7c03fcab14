"""Saved optimizer states named by the saved model's parameters (the names saved with them, or
its parameter order) and followed through the plan to the parameters that now hold those
weights: by identity, never by position alone."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..lazy import LazyTensor
from ..plans import Plan
from .reports import OptimizerMapping

__all__ = ["ModelParams", "map_optimizer"]

# buffers a model keeps beside its parameters, recognised by name when the model does not say
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked", "position_ids", "inv_freq")


class ModelParams:
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


def _file_params(tensors: Mapping[str, LazyTensor], m: ModelParams) -> tuple[list[str], list[str]]:
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


def _in_model_order(tensors: Mapping[str, LazyTensor], m: ModelParams) -> dict[str, LazyTensor]:
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
                    m: ModelParams, new_groups: list[list[torch.Tensor]] | None,
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


def map_optimizer(where: str, saved: Any, tensors: Mapping[str, LazyTensor], m: ModelParams,
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
    return replace(m, **changes)
