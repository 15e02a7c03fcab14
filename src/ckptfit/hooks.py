"""Modules' own load-time logic: load-state-dict pre-hooks, ``_load_from_state_dict`` overrides, post-hooks.

``model.load_state_dict(sd)`` lets every module rewrite the state dict on the way in: the
``parametrizations.weight_norm`` compat hook renames old ``weight_g``/``weight_v`` to
``parametrizations.weight.original0``/``original1``, a class may override
``_load_from_state_dict`` to convert a legacy layout, a post-hook may fix things up after.
ckptfit plans from names and shapes, so before matching it finds out what each such module
would do with *this* file: it runs the module's pre-hooks and its own ``_load_from_state_dict``
on placeholders (meta tensors carrying the file's keys, shapes and dtypes; no byte is read)
and watches what happens:

- a placeholder moved to another key is a **rename**: the matcher sees the new name, the plan
  loads from the file's key and says which hook renamed it;
- a key holding a new tensor computed by the module is **derived**: the module's own
  ``_load_from_state_dict`` is run again, on the real tensors, after ckptfit's copy, so the
  values come out exactly as ``load_state_dict`` makes them.

Known renames no hook performs are added here: a file saved under
``parametrizations.weight_norm`` (``parametrizations.weight.original0/1``) into a module under
the old ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``) holds the same two tensors.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .plans import Plan, TensorSpec

__all__ = ["ModuleHooks", "custom_modules", "discover", "metadata_of", "run_after_load"]

_BASE_LOAD = nn.Module._load_from_state_dict


def _benign_classes() -> tuple[type, ...]:
    """Classes whose ``_load_from_state_dict`` only does what the matcher already does.

    BatchNorm fills a missing ``num_batches_tracked`` of a file older than its version 2 (the
    matcher keeps it at the model's own value, as torch does); InstanceNorm drops running
    stats it does not track (the matcher leaves them unused).
    """
    out: list[type] = []
    from torch.nn.modules import batchnorm, instancenorm

    for mod, name in ((batchnorm, "_NormBase"), (instancenorm, "_InstanceNorm")):
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


_BENIGN = _benign_classes()


def _overrides_load(mod: nn.Module) -> bool:
    fn = type(mod)._load_from_state_dict
    if fn is _BASE_LOAD:
        return False
    return not any(getattr(c, "_load_from_state_dict", None) is fn for c in _BENIGN)


def _old_weight_norms(mod: nn.Module) -> list[str]:
    """Names reparametrised by the old ``torch.nn.utils.weight_norm`` on ``mod`` (a forward pre-hook)."""
    import sys

    wn = getattr(sys.modules.get("torch.nn.utils.weight_norm"), "WeightNorm", None)
    if wn is None:
        return []
    return [h.name for h in mod._forward_pre_hooks.values() if isinstance(h, wn)]


def custom_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module with load-time logic of its own (in ``named_modules`` order)."""
    out = []
    for name, mod in model.named_modules():
        if (mod._load_state_dict_pre_hooks or mod._load_state_dict_post_hooks or _overrides_load(mod)
                or _old_weight_norms(mod)):
            out.append((name, mod))
    return out


def _hook_name(hook: Any) -> str:
    fn = getattr(hook, "hook", hook)  # torch's _WrappedHook
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    if mod.startswith("torch.nn.utils.parametrizations") and "weight_norm" in name:
        return "parametrizations.weight_norm's compat hook for old weight_g/weight_v keys"
    short = name.replace(".<locals>.", ".")
    return f"{mod}.{short}" if mod and not mod.startswith("torch.") else short


@dataclass
class _OwnLoad:
    """A module whose own ``_load_from_state_dict`` must run on the real tensors after the copy."""

    path: str
    module: nn.Module
    prefix: str  # the module's prefix in the file's names
    keys: tuple[str, ...]  # the file keys it reads
    why: str


@dataclass
class ModuleHooks:
    """What the model's modules would do to one checkpoint's names when it is loaded.

    Attributes:
        renames: ``{file key: (name the matcher sees, why)}``.
        derived: ``{name: (spec, why)}`` for tensors a module computes from the file's.
        consumed: ``{file key: why}`` for the file tensors those are computed from.
        own_loads: modules run again on the real tensors after the copy.
        warnings: hooks that could not be run on placeholders.
    """

    renames: dict[str, tuple[str, str]] = field(default_factory=dict)
    derived: dict[str, tuple[TensorSpec, str]] = field(default_factory=dict)
    consumed: dict[str, str] = field(default_factory=dict)
    own_loads: list[_OwnLoad] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.renames or self.derived or self.own_loads or self.warnings)

    def specs(self, specs: Sequence[TensorSpec]) -> list[TensorSpec]:
        """The file's specs as the matcher should see them: renamed, plus the derived ones."""
        out = [replace(s, name=self.renames[s.name][0]) if s.name in self.renames else s for s in specs]
        taken = {s.name for s in out}
        out += [spec for name, (spec, _why) in self.derived.items() if name not in taken]
        return out

    def name(self, key: str) -> str:
        """The name the matcher sees for the file's ``key``."""
        return self.renames[key][0] if key in self.renames else key

    def restore(self, p: Plan) -> Plan:
        """The plan in the file's own names, each hook's work named in the reasons and transforms."""
        back = {new: (old, why) for old, (new, why) in self.renames.items()}
        decisions = []
        for d in p.decisions:
            if d.source in self.derived and d.source not in back:
                why = self.derived[d.source][1]
                froms = [k for k, w in self.consumed.items() if w == why]
                made = f"made from {', '.join(repr(k) for k in froms)} " if froms else "made "
                d = replace(d, source=None, stage="rule", transform=None,
                            reason=f"{made}by the module's own load logic ({why})")
            elif d.source in back:
                old, why = back[d.source]
                d = replace(d, source=old, stage="rule" if d.stage in ("exact", "prefix") else d.stage,
                            reason=f"module's own load hook ({why}): '{old}' is read as '{d.source}'"
                                   + (f"; {d.reason}" if d.stage not in ("exact",) else ""))
            decisions.append(d)
        unused = tuple(replace(u, source=back[u.source][0]) if u.source in back else u for u in p.unused
                       if u.source not in self.derived and u.source not in self.consumed)
        lines: dict[str, list[str]] = {}
        for old, (new, why) in self.renames.items():
            lines.setdefault(why, []).append(f"'{old}' -> '{new}'")
        transforms = tuple(f"module's own load hook ({why}): {', '.join(pairs[:2])}"
                           + (f" and {len(pairs) - 2} more" if len(pairs) > 2 else "")
                           for why, pairs in lines.items())
        transforms += tuple(f"loaded through {o.why}" for o in self.own_loads)
        return replace(p, decisions=tuple(decisions), unused=unused, transforms=p.transforms + transforms,
                       warnings=p.warnings + tuple(self.warnings))


class _Recorder(TorchFunctionMode):
    """Records ``dst.copy_(src)`` into the shadow module's tensors, without doing it."""

    def __init__(self, targets: Mapping[int, str]) -> None:
        super().__init__()
        self.targets = targets
        self.copies: dict[str, Any] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "copy_" and args and id(args[0]) in self.targets:
            self.copies[self.targets[id(args[0])]] = args[1] if len(args) > 1 else kwargs.get("src")
            return args[0]
        return func(*args, **kwargs)


class _Reads(dict):
    """A state dict that remembers which keys were looked at."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k: str) -> Any:
        self.read.add(k)
        return super().__getitem__(k)

    def __contains__(self, k: object) -> bool:
        if isinstance(k, str):
            self.read.add(k)
        return super().__contains__(k)

    def get(self, k: str, default: Any = None) -> Any:
        self.read.add(k)
        return super().get(k, default)

    def pop(self, k: str, *default: Any) -> Any:
        self.read.add(k)
        return super().pop(k, *default)


def _index(keys: Sequence[str]) -> dict[str, list[str]]:
    """``{prefix ending in '.': keys under it}`` for every dotted prefix of the file's keys ('' = all)."""
    index: dict[str, list[str]] = {"": list(keys)}
    for k in keys:
        i = k.find(".")
        while i >= 0:
            index.setdefault(k[: i + 1], []).append(k)
            i = k.find(".", i + 1)
    return index


def _prefixes(path: str, index: Mapping[str, list[str]]) -> list[str]:
    """Where the module at ``path`` sits in the file's names (``path.`` itself when the file has it)."""
    if not path:
        return [""]
    head = path + "."
    if head in index:
        return [head]
    return [p for p in index if p.endswith("." + head)]  # under a wrapper's prefix ('module.' ...)


def _shadow(mod: nn.Module) -> tuple[nn.Module, dict[int, str]]:
    """A shallow copy of ``mod`` whose own tensors are meta twins (copying into them changes nothing)."""
    shadow = copy.copy(mod)
    params: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    ids: dict[int, str] = {}
    for store, out in ((mod._parameters, params), (mod._buffers, buffers)):
        for name, t in store.items():
            if t is None:
                out[name] = None
                continue
            m = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            if isinstance(t, nn.Parameter):
                m = nn.Parameter(m, requires_grad=t.requires_grad)
            out[name] = m
            ids[id(m)] = name
    object.__setattr__(shadow, "_parameters", params)
    object.__setattr__(shadow, "_buffers", buffers)
    object.__setattr__(shadow, "_load_state_dict_pre_hooks", type(mod._load_state_dict_pre_hooks)())
    return shadow, ids


def discover(custom: Sequence[tuple[str, nn.Module]], specs: Sequence[TensorSpec],
             metadata: Mapping[str, Any] | None = None) -> ModuleHooks:
    """Run each custom module's load logic on placeholders of the file's tensors and see what it does.

    Args:
        custom: :func:`custom_modules` of the model.
        specs: the checkpoint's tensors (names, shapes, dtypes).
        metadata: the file's ``_metadata`` (module path -> version record), when it has one.

    Returns:
        The renames, derived tensors and modules to run again after the copy.
    """
    out = ModuleHooks()
    if not custom:
        return out
    by_name = {s.name: s for s in specs}
    index = _index(list(by_name))
    for path, mod in custom:
        for prefix in _prefixes(path, index):
            _discover_one(out, path, mod, prefix, by_name, index[prefix], metadata or {})
    return out


def _discover_one(out: ModuleHooks, path: str, mod: nn.Module, prefix: str, by_name: Mapping[str, TensorSpec],
                  keys: Sequence[str], metadata: Mapping[str, Any]) -> None:
    under = [k for k in keys if k not in out.renames]
    if not under:
        return
    origin: dict[int, str] = {}
    sd = _Reads()
    with torch._C.DisableTorchFunction():
        for k in under:
            s = by_name[k]
            t = torch.empty(s.shape, dtype=s.dtype, device="meta")
            origin[id(t)] = k
            dict.__setitem__(sd, k, t)
    local_meta = dict(metadata.get(prefix[:-1], {})) if prefix else dict(metadata.get("", {}))
    where = path or type(mod).__name__
    derived_any = False
    steps: list[tuple[str, Any]] = [(_hook_name(h), h) for h in mod._load_state_dict_pre_hooks.values()]
    if _overrides_load(mod):
        steps.append((f"{type(mod).__name__}._load_from_state_dict", None))
    for why, hook in steps:
        before = dict(sd)
        try:
            if hook is not None:
                hook(sd, prefix, local_meta, True, [], [], [])
                copies: dict[str, Any] = {}
            else:
                shadow, ids = _shadow(mod)
                rec = _Recorder(ids)
                with rec, torch.no_grad():
                    shadow._load_from_state_dict(sd, prefix, local_meta, True, [], [], [])
                copies = rec.copies
        except Exception as e:  # noqa: BLE001 - a hook that needs real values: it runs on them after the copy
            out.warnings.append(f"{why} of {where!r} could not be run on the file's names ({type(e).__name__}: "
                                f"{e}); it is run on the real tensors after the copy")
            derived_any = True
            continue
        placed = {id(v) for v in dict.values(sd)}
        gone = [origin[id(v)] for k, v in before.items() if id(v) in origin and id(v) not in placed]
        made = False
        for k, v in dict.items(sd):
            if before.get(k) is v:
                continue
            if id(v) in origin:  # a file tensor under a new name
                old = origin[id(v)]
                if old != k:
                    out.renames[old] = (k, why)
            elif isinstance(v, torch.Tensor):
                out.derived[k] = (TensorSpec(k, tuple(v.shape), v.dtype), f"{why} of {where!r}")
                if id(before.get(k)) in origin:
                    out.consumed[origin[id(before[k])]] = f"{why} of {where!r}"
                derived_any = made = True
        if made:
            out.consumed.update({k: f"{why} of {where!r}" for k in gone})
        for name, src in copies.items():
            k = prefix + name
            if id(src) in origin:
                old = origin[id(src)]
                if old != k and out.renames.get(old, (old,))[0] != k:
                    out.renames[old] = (k, why)
            elif isinstance(src, torch.Tensor):
                out.derived[k] = (TensorSpec(k, tuple(src.shape), src.dtype), f"{why} of {where!r}")
                derived_any = True
    for name in _old_weight_norms(mod):  # a parametrizations.weight_norm file into the old weight_norm API
        g, v = f"{prefix}parametrizations.{name}.original0", f"{prefix}parametrizations.{name}.original1"
        if g in by_name and v in by_name and f"{prefix}{name}_g" not in by_name:
            why = "old torch.nn.utils.weight_norm reads parametrizations.weight_norm's original0/original1 as g/v"
            out.renames[g] = (f"{prefix}{name}_g", why)
            out.renames[v] = (f"{prefix}{name}_v", why)
    if derived_any:
        why = f"{type(mod).__name__}'s own load logic, run on the real tensors ({path or 'the model'})"
        out.own_loads.append(_OwnLoad(path, mod, prefix, tuple(k for k in under if k in sd.read or k in sd), why))


def metadata_of(tree: Any, container: str | None) -> dict[str, Any]:
    """The ``_metadata`` version record ``torch.save`` kept on the state dict, if the reader kept it."""
    node = tree
    if container:
        for part in container.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return {}
            node = node[part]
    meta = getattr(node, "_metadata", None)
    return dict(meta) if isinstance(meta, Mapping) else {}


def run_after_load(model: nn.Module, hooks: ModuleHooks | None, tensors: Mapping[str, Any], p: Plan,
                   metadata: Mapping[str, Any] | None = None) -> None:
    """After the copy: run the modules' own loads on the real tensors, then their load post-hooks.

    Raises:
        LoadError: a module's own ``_load_from_state_dict`` reported errors.
    """
    from torch.nn.modules.module import _IncompatibleKeys

    from .errors import LoadError

    errors: list[str] = []
    metadata = metadata or {}
    if hooks is not None:
        for own in hooks.own_loads:
            sd = {k: tensors[k].load() for k in own.keys if k in tensors}
            msgs: list[str] = []
            with torch.no_grad():
                _load_subtree(own.module, sd, own.prefix, metadata, msgs)
            errors += [f"{own.why}: {m}" for m in msgs]
    if errors:
        raise LoadError("Error(s) in loading the checkpoint: " + "; ".join(errors),
                        hint="the module's own _load_from_state_dict refused these tensors")
    post = [m for m in model.modules() if m._load_state_dict_post_hooks]
    if post:
        missing = [d.target for d in p.decisions if d.action in ("missing", "skip_shape")]
        unexpected = [u.source for u in p.unused]
        for m in post:
            for hook in m._load_state_dict_post_hooks.values():
                hook(m, _IncompatibleKeys(missing, unexpected))


def _load_subtree(mod: nn.Module, sd: dict[str, Any], prefix: str, metadata: Mapping[str, Any],
                  msgs: list[str]) -> None:
    """``load_state_dict``'s recursion over one module and its children (their hooks included)."""
    mod._load_from_state_dict(sd, prefix, dict(metadata.get(prefix[:-1], {})), True, [], [], msgs)
    for name, child in mod._modules.items():
        if child is not None:
            child_prefix = f"{prefix}{name}."
            _load_subtree(child, {k: v for k, v in sd.items() if k.startswith(child_prefix)}, child_prefix,
                          metadata, msgs)
