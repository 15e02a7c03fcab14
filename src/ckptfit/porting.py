"""Porting between implementations: weights stored in another layout, decided from evidence only.

Two implementations of one network often store the same weights differently:

- **transposed**: Hugging Face's GPT-2 ``Conv1D`` keeps its weight ``[in, out]``, ``nn.Linear``
  keeps ``[out, in]``;
- **fused or separate**: one ``qkv`` / ``c_attn`` / ``in_proj_weight`` of ``[3d, d]`` against
  three ``q``, ``k``, ``v`` of ``[d, d]`` (or a ``gate_up_proj`` against ``gate_proj`` and
  ``up_proj``).

:func:`port` runs after the matcher and adds a :class:`~ckptfit.plans.Transform` to the
decisions that need one. It never guesses:

- A **transpose** is decided for a *role*: every 2-D weight of one layer type in the model
  (all ``nn.Linear`` weights, all ``Conv1D`` weights). When some non-square weights of the
  role fit only transposed and none fits as stored, the file stores that role the other way
  round: every weight of the role is transposed, the square ones too, and the report says
  so. When some fit only transposed and others only as stored, the evidence conflicts and
  the load is refused. When every weight of a role is square the shapes cannot tell; for
  ``nn.Linear`` the file is taken to hold torch's own layout (what ``load_state_dict``
  assumes), for a transposed-layout type (``Conv1D``) the load is refused with the
  ``transforms=`` rule that would settle it. A whole model pickled with ``torch.save(model)``
  records each layer's class; that settles square weights too (:func:`recorded_layouts`).
- A **split** needs a checkpoint tensor whose name says it is fused and in which order
  (``qkv``, ``to_qkv``, ``Wqkv``, ``c_attn``, ``in_proj_weight``, ``kv``, ``gate_up``) and, beside
  where it would go, one unfilled model module per part whose names and declaration order
  say the same (``q``/``k``/``v``, ``query``/``key``/``value``, ``q_proj``..., ``to_q``...); the
  parts take those modules' sizes (smaller ``k``, ``v`` under grouped-query attention) and must
  add up exactly. A **concat** is the same the other way round. ``query_key_value`` is never split
  automatically: GPT-NeoX and BLOOM interleave it per head.

What evidence cannot settle, the user says with ``transforms={pattern: kind}``
(:func:`parse_rules`): a glob or a regex (matched against the model key or the checkpoint
key) and ``"transpose"``, ``"none"`` (as stored) or ``"split:N"``, combined with ``+``
(``"transpose+split:3"``). Rules override evidence for the keys they match.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .dtypes import dtype_kind
from .fused_names import fused_parts, last_segment, parent_module, part_of, split_key
from .layouts import OUT_IN, Layout, layouts_of, recorded_layouts, register_layout
from .matching.names import fmt_shape
from .plans import Decision, Plan, TensorSpec, Transform
from .transform_rules import Rule, parse_rules, rule_text_for
from .transforms import apply_transform

if TYPE_CHECKING:
    import torch

# Rule, parse_rules, the layouts and apply_transform live in their own modules; they stay importable
# from here, where the porting pass has always offered them.
__all__ = ["port", "parse_rules", "layouts_of", "recorded_layouts", "register_layout", "apply_transform", "Rule",
           "Layout"]


def _kind(dtype: torch.dtype | None) -> str:
    """The dtype's kind (:func:`ckptfit.dtypes.dtype_kind`), ``"?"`` for none."""
    return "?" if dtype is None else dtype_kind(dtype)


def _listed(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------- the pass

@dataclass
class _Item:
    """One unit of evidence and of change: a plain pair, or a split / concat group."""

    kind: str  # "pair", "split", "concat"
    role: str  # layout label of the model side ("nn.Linear", "Conv1D")
    layout: str
    targets: list[str]  # model keys of the weights (pair: one; split: one per part; concat: the fused one)
    sources: list[str]  # checkpoint keys of the weights (pair / split: one; concat: one per part)
    fit: str = "neither"  # "as-is", "transposed", "both" (square: shapes cannot tell), "neither"
    forced: bool | None = None  # a user rule: True transpose, False as stored
    declared: str | None = None  # the file records the source layer's class: "transposed" or "as-is"
    declared_label: str = ""  # that class ("Conv1D")
    rule: Any = None
    parts: tuple[str, ...] = ()  # split / concat: part names in order
    biases: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (targets, sources) of the biases
    sizes: tuple[int, ...] = ()  # split: the parts' sizes when they differ (else equal parts)


class _Porter:
    def __init__(self, plan: Plan, layouts: Mapping[str, Layout], source: Sequence[TensorSpec],
                 rules: Sequence[Rule], recorded: Mapping[str, Layout] | None = None):
        self.plan = plan
        self.layouts = layouts
        self.recorded = recorded or {}
        self.rules = list(rules)
        self.rule_hits = [0] * len(self.rules)
        self.decs = list(plan.decisions)
        self.pos = {d.target: i for i, d in enumerate(self.decs)}
        self.src = {s.name: s for s in source}
        self.src_order = {s.name: i for i, s in enumerate(source)}
        self.used = {d.source for d in self.decs if d.action == "load" and d.source}
        self.problems: list[str] = []
        self.suggestions: list[str] = []
        self.warnings: list[str] = []
        self.changed: set[str] = set()

    # -- rules --------------------------------------------------------------------------

    def rule_for(self, *keys: str | None, split: bool = False) -> Rule | None:
        for i, r in enumerate(self.rules):
            if (r.split is not None) == split and (split or r.transpose is not None) and r.hits(*keys):
                self.rule_hits[i] += 1
                return r
        return None

    def split_rule_for(self, key: str) -> Rule | None:
        return self.rule_for(key, split=True)

    # -- what could be paired -------------------------------------------------------------

    def unfilled(self, key: str) -> bool:
        i = self.pos.get(key)
        if i is None:
            return False
        d = self.decs[i]
        return d.source is None and d.tied_to is None and (d.action == "missing" or (d.action == "keep"
                                                                                       and d.stage == "none"))

    def free_source(self, key: str) -> bool:
        return key in self.src and key not in self.used

    def prefix_pairs(self) -> list[tuple[str, str]]:
        """``(checkpoint prefix, model prefix)`` learned from the loaded pairs: what is left of two
        keys once their longest common dotted suffix is cut off."""
        seen: dict[tuple[str, str], int] = {}
        for d in self.decs:
            if d.action != "load" or not d.source:
                continue
            t, s = d.target.split("."), d.source.split(".")
            n = 0
            while n < min(len(t), len(s)) and t[-1 - n] == s[-1 - n]:
                n += 1
            if n < 2:
                continue
            tp = ".".join(t[:len(t) - n])
            sp = ".".join(s[:len(s) - n])
            key = (sp + "." if sp else "", tp + "." if tp else "")
            seen[key] = seen.get(key, 0) + 1
        return sorted(seen, key=lambda c: -len(c[0]))

    def map_module(self, module: str, pairs: list[tuple[str, str]], reverse: bool = False) -> list[str]:
        """Where a module of one side sits on the other side (identity first, then learned prefixes)."""
        out = [module]
        for sp, tp in pairs:
            a, b = (tp, sp) if reverse else (sp, tp)
            if (module + ".").startswith(a):
                out.append((b + (module + ".")[len(a):]).rstrip("."))
        return list(dict.fromkeys(out))

    # -- collect ---------------------------------------------------------------------------

    def collect(self) -> list[_Item]:
        items: list[_Item] = []
        for d in self.decs:
            lay = self.layouts.get(d.target)
            unknown = lay is None  # a 2-D tensor of a layer type without a known layout: only a rule moves it
            if unknown and self.rules:
                lay = Layout(OUT_IN, "2-D")
            if lay is None or d.source is None or d.action not in ("load", "skip_shape") or len(d.target_shape) != 2:
                continue
            if d.transform is not None or d.source_shape is None or len(d.source_shape) != 2:
                continue
            item = _Item("pair", lay.label, lay.layout, [d.target], [d.source])
            t, s = tuple(d.target_shape), tuple(d.source_shape)
            if t == s:
                item.fit = "both" if t[0] == t[1] else "as-is"
            elif t == s[::-1]:
                item.fit = "transposed"
            rule = self.rule_for(d.target, d.source)
            if rule is not None:
                item.forced, item.rule = rule.transpose, rule
            elif unknown:
                continue
            rec = self.recorded.get(d.source)
            if rec is not None:
                item.declared = "as-is" if rec.layout == lay.layout else "transposed"
                item.declared_label = rec.label
            items.append(item)
        items.extend(self.collect_splits())
        items.extend(self.collect_concats())
        return items

    def _target_parts(self, parent: str, want: tuple[str, ...] | int, leaves: Sequence[str]) -> list[str] | None:
        """Unfilled model modules right under ``parent`` named for the parts ``want`` (in that
        declaration order), or, for a count, the same number of unfilled same-shaped ones."""
        leaves = list(leaves)
        children: dict[str, int] = {}
        for key, i in self.pos.items():
            mod, leaf = split_key(key)
            if parent_module(mod) == parent and mod and leaf == leaves[0]:
                children.setdefault(mod, i)
        ok = [m for m in sorted(children, key=children.get)
              if all(self.unfilled(f"{m}.{leaf}") for leaf in leaves)]
        if isinstance(want, int):
            shapes = {self.decs[self.pos[f"{m}.{leaves[0]}"]].target_shape for m in ok}
            return ok if len(ok) == want and len(shapes) == 1 else None
        named = [m for m in ok if part_of(last_segment(m)) in want]
        if sorted(part_of(last_segment(m)) for m in named) != sorted(want) or len(named) != len(want):
            return None
        if tuple(part_of(last_segment(m)) for m in named) != tuple(want):
            self.warnings.append(f"not split: the model declares {_listed(named)} in another order than "
                                 f"the fused tensor's ({', '.join(want)})")
            return None
        return named  # named parts may differ in size (grouped-query attention: k, v smaller than q)

    def collect_splits(self) -> list[_Item]:
        items = []
        pairs = None
        by_module: dict[str, dict[str, str]] = {}
        for key in self.src:
            if self.free_source(key):
                mod, leaf = split_key(key)
                by_module.setdefault(mod, {})[leaf] = key
        for smod, leaves in by_module.items():
            if "weight" not in leaves or len(self.src[leaves["weight"]].shape) != 2:
                continue
            rule = self.split_rule_for(leaves["weight"])
            parts: tuple[str, ...] | int | None = rule.split if rule is not None else fused_parts(last_segment(smod))
            if parts is None:
                continue
            if pairs is None:
                pairs = self.prefix_pairs()
            use_leaves = [lf for lf in ("weight", "bias") if lf in leaves]
            found = None
            for tparent in self.map_module(parent_module(smod), pairs):
                found = self._target_parts(tparent, parts, use_leaves)
                if found:
                    break
            if not found:
                if rule is not None:
                    self.problems.append(f"{rule.text} matched '{leaves['weight']}', but no {rule.split} unfilled "
                                         f"modules of one shape sit where it would go")
                continue
            tw = [f"{m}.weight" for m in found]
            lay = self.layouts.get(tw[0])
            if lay is None:
                continue
            tds = [self.decs[self.pos[w]] for w in tw]
            if any(len(d.target_shape) != 2 or _kind(d.target_dtype) != _kind(self.src[leaves["weight"]].dtype)
                   for d in tds):
                continue
            o = 0 if lay.layout == OUT_IN else 1  # the out dimension in the model's layout
            outs = [d.target_shape[o] for d in tds]
            ins = {d.target_shape[1 - o] for d in tds}
            if len(ins) != 1:
                continue
            inn, total = ins.pop(), sum(outs)
            sshape = tuple(self.src[leaves["weight"]].shape)
            asis = (total, inn) if o == 0 else (inn, total)
            trans = asis[::-1]
            fit = "both" if sshape == asis == trans else "as-is" if sshape == asis else \
                "transposed" if sshape == trans else "neither"
            if fit == "neither":
                if rule is not None:
                    self.problems.append(f"{rule.text}: '{leaves['weight']}' is {fmt_shape(sshape)}, which is not "
                                         f"{_listed(tw)} stacked (as stored or transposed)")
                continue
            names = tuple(part_of(last_segment(m)) or last_segment(m) for m in found)
            item = _Item("split", lay.label, lay.layout, tw, [leaves["weight"]], fit=fit, parts=names, rule=rule,
                         sizes=tuple(outs) if len(set(outs)) > 1 else ())
            if rule is not None and rule.transpose is not None:
                item.forced = rule.transpose
            elif rule is None:
                r2 = self.rule_for(leaves["weight"], *tw)
                if r2 is not None:
                    item.forced, item.rule = r2.transpose, r2
            if "bias" in leaves:
                tb = [f"{m}.bias" for m in found]
                bshape = tuple(self.src[leaves["bias"]].shape)
                if bshape != (total,) or [tuple(self.decs[self.pos[k]].target_shape) for k in tb] != [(x,) for x in outs]:
                    continue
                item.biases.append((tb, [leaves["bias"]]))
            items.append(item)
        return items

    def collect_concats(self) -> list[_Item]:
        items = []
        pairs = None
        for d in self.decs:
            mod, leaf = split_key(d.target)
            if leaf != "weight" or d.target not in self.layouts or not self.unfilled(d.target):
                continue
            parts = fused_parts(last_segment(mod))
            if parts is None:
                continue
            if pairs is None:
                pairs = self.prefix_pairs()
            bias_key = f"{mod}.bias" if not mod.endswith("in_proj") else f"{parent_module(mod)}.in_proj_bias".lstrip(".")
            want_bias = bias_key in self.pos and self.unfilled(bias_key)
            found = None
            for sparent in self.map_module(parent_module(mod), pairs, reverse=True):
                found = self._source_parts(sparent, parts, want_bias)
                if found:
                    break
            if not found:
                continue
            sw = [f"{m}.weight" for m in found]
            lay = self.layouts[d.target]
            shapes = [tuple(self.src[w].shape) for w in sw]
            if any(len(x) != 2 or _kind(self.src[w].dtype) != _kind(d.target_dtype) for x, w in zip(shapes, sw)):
                continue
            o = 0 if lay.layout == OUT_IN else 1
            t = tuple(d.target_shape)
            asis, trans = _stacked(shapes, o), _stacked([x[::-1] for x in shapes], o)
            fit = "both" if t == asis == trans else "as-is" if t == asis else "transposed" if t == trans else "neither"
            if fit == "neither":
                continue
            item = _Item("concat", lay.label, lay.layout, [d.target], sw, fit=fit, parts=parts)
            r = self.rule_for(d.target, *sw)
            if r is not None:
                item.forced, item.rule = r.transpose, r
            if want_bias:
                item.biases.append(([bias_key], [f"{m}.bias" for m in found]))
            items.append(item)
        return items

    def _source_parts(self, parent: str, want: tuple[str, ...], bias: bool) -> list[str] | None:
        mods: dict[str, str] = {}
        for key in self.src:
            mod, leaf = split_key(key)
            if leaf == "weight" and parent_module(mod) == parent and mod and self.free_source(key):
                p = part_of(last_segment(mod))
                if p in want:
                    if p in mods:
                        return None
                    mods[p] = mod
        if sorted(mods) != sorted(want):
            return None
        found = [mods[p] for p in want]
        if bias and not all(self.free_source(f"{m}.bias") for m in found):
            return None
        return found

    # -- decide ----------------------------------------------------------------------------

    def decide(self, items: list[_Item]) -> dict[int, tuple[bool, str]]:
        """``{id(item): (transpose, reason)}`` for the items to change; problems for the rest."""
        out: dict[int, tuple[bool, str]] = {}
        roles: dict[str, list[_Item]] = {}
        for it in items:
            if it.forced is not None:
                if it.forced and it.kind == "pair" and it.fit not in ("transposed", "both"):
                    self.problems.append(f"{it.targets[0]}: {it.rule.text} asks for a transpose, but checkpoint "
                                         f"'{it.sources[0]}' does not fit transposed")
                    continue
                if not it.forced and it.kind == "pair":
                    continue  # as stored: the matcher's own decision stands
                out[id(it)] = (bool(it.forced), f"your rule {it.rule.text}")
                continue
            roles.setdefault(it.role, []).append(it)
        for role, group in roles.items():
            layout = group[0].layout
            stored = "[in, out]" if layout == OUT_IN else "[out, in]"
            model = "[out, in]" if layout == OUT_IN else "[in, out]"
            lying = [it for it in group if it.declared and it.fit in ("as-is", "transposed") and it.fit != it.declared]
            if lying:
                keys = [it.targets[0] for it in lying]
                self.problems.append(f"{role} weights: the file records {_listed(keys)} as "
                                     f"{lying[0].declared_label} layers, but the shapes say otherwise; nothing is "
                                     f"transposed")
                continue
            declared = [it for it in group if it.declared and it.fit == "both"]
            for it in declared:  # square, but the file records the layer's class: that settles it
                it.fit = it.declared
            trans = [it for it in group if it.fit == "transposed"]
            asis = [it for it in group if it.fit == "as-is"]
            square = [it for it in group if it.fit == "both"]
            if trans and asis:
                t_keys = [k for it in trans for k in it.targets]
                a_keys = [k for it in asis for k in it.targets]
                self.problems.append(
                    f"{role} weights: evidence conflicts: {len(t_keys)} fit only transposed ({_listed(t_keys)}), "
                    f"{len(a_keys)} only as stored ({_listed(a_keys)}); nothing is transposed")
                self.suggestions.append(f"if the file mixes layouts, pass {self.advice(t_keys, 'transpose')}; if "
                                        f"those are other layers that only have the reversed shape, pass "
                                        f"{self.advice(t_keys, 'none')} (with partial=True to keep them at init)")
                for it in group:
                    if it.kind != "pair":
                        self.problems.append(f"{it.targets[0]}: not ported, the {role} layout evidence conflicts")
                continue
            if trans:
                rec_ids = {id(it) for it in declared}
                t_keys = [k for it in trans if id(it) not in rec_ids for k in it.targets]
                r_keys = [k for it in trans if id(it) in rec_ids for k in it.targets]
                n_all = sum(len(it.targets) for it in trans + square)
                n_sq = n_all - len(t_keys) - len(r_keys)
                why = []
                if t_keys:
                    why.append(f"{len(t_keys)} non-square fit only transposed ({_listed(t_keys, 2)}), none as stored")
                if r_keys:
                    why.append(f"the file records {len(r_keys)} square ones as {declared[0].declared_label} layers")
                reason = (f"the file stores {role} weights {stored}, the model {model}: {'; '.join(why)}; so all "
                          f"{n_all} are transposed" + (f", the {n_sq} square too" if n_sq else ""))
                for it in trans + square:
                    out[id(it)] = (True, reason)
                continue
            if asis:
                for it in group:
                    if it.kind != "pair" and it.fit in ("as-is", "both"):
                        out[id(it)] = (False, f"{role} weights fit as stored ({len(asis)} non-square)")
                continue
            # no shape evidence: only square weights
            if layout == OUT_IN:
                for it in group:
                    if it.kind != "pair":  # concat / split of square parts: torch's own layout assumed
                        out[id(it)] = (False, f"{role} weights taken as stored ({role}'s own layout; "
                                              f"no weight of the role tells otherwise)")
                continue
            keys = [k for it in square for k in it.targets]
            self.problems.append(
                f"{role} weights are {model} but all {len(keys)} of them are square ({_listed(keys)}): the shapes "
                f"cannot tell whether the file stores them {model} (from {role} layers) or {stored} "
                f"(from nn.Linear layers); nothing is guessed")
            self.suggestions.append(f"if the file comes from nn.Linear layers, pass {self.advice(keys, 'transpose')}; "
                                    f"if it comes from {role} layers, pass {self.advice(keys, 'none')}")
        return out

    def advice(self, keys: Sequence[str], kind: str) -> str:
        """A ``transforms=`` rule that matches exactly ``keys`` among every model and checkpoint key
        (and the checkpoint keys that feed them)."""
        feeding = {self.decs[self.pos[t]].source for t in keys} - {None}
        return rule_text_for(keys, kind, self.pos, list(self.pos) + list(self.src), feeding)

    # -- apply -----------------------------------------------------------------------------

    def set(self, target: str, **changes: Any) -> None:
        i = self.pos[target]
        self.decs[i] = replace(self.decs[i], **changes)
        self.changed.add(target)

    def apply(self, items: list[_Item], chosen: Mapping[int, tuple[bool, str]]) -> None:
        for it in items:
            if id(it) not in chosen:
                continue
            transpose, reason = chosen[id(it)]
            if it.kind == "pair":
                if not transpose:
                    continue
                d = self.decs[self.pos[it.targets[0]]]
                self.set(d.target, action="load", reason=f"{_base_reason(d)}; transposed "
                         f"{fmt_shape(d.source_shape or ())} -> {fmt_shape(d.target_shape)}",
                         transform=Transform("transpose", f"{fmt_shape(d.source_shape or ())} -> "
                                                          f"{fmt_shape(d.target_shape)}"
                                             + (" (square: transposed with its role)" if it.fit == "both" else ""),
                                             reason))
                self.used.add(d.source)
            elif it.kind == "split":
                self._apply_split(it, transpose, reason)
            else:
                self._apply_concat(it, transpose, reason)

    def _apply_split(self, it: _Item, transpose: bool, reason: str) -> None:
        n = len(it.targets)
        dim = 0 if it.layout == OUT_IN else 1
        skey = it.sources[0]
        fused = last_segment(split_key(skey)[0])
        order = ", ".join(it.parts)
        why = reason if it.rule is not None else (f"'{fused}' names a fused ({order}) tensor and the model has "
                                                  f"{_listed(it.targets)} in that order; {reason}")
        for j, t in enumerate(it.targets):
            s = self.src[skey]
            self.set(t, action="load", source=skey, stage="port", source_shape=tuple(s.shape), source_dtype=s.dtype,
                     reason=f"part {j + 1} of {n} ({it.parts[j]}) of '{skey}'" + ("; transposed" if transpose else ""),
                     transform=Transform("split", f"part {j + 1} of {n} ({it.parts[j]}) along dim {dim}"
                                         + (", after a transpose" if transpose else ""), why,
                                         part=j, parts=n, dim=dim, transpose=transpose, sizes=it.sizes))
        self.used.add(skey)
        for tb, sb in it.biases:
            s = self.src[sb[0]]
            for j, t in enumerate(tb):
                self.set(t, action="load", source=sb[0], stage="port", source_shape=tuple(s.shape),
                         source_dtype=s.dtype, reason=f"part {j + 1} of {n} ({it.parts[j]}) of '{sb[0]}'",
                         transform=Transform("split", f"part {j + 1} of {n} ({it.parts[j]}) along dim 0", why,
                                             part=j, parts=n, dim=0, sizes=it.sizes))
            self.used.add(sb[0])

    def _apply_concat(self, it: _Item, transpose: bool, reason: str) -> None:
        n = len(it.sources)
        dim = 0 if it.layout == OUT_IN else 1
        t = it.targets[0]
        fused = last_segment(split_key(t)[0])
        why = reason if it.rule is not None else (f"'{fused}' names a fused ({', '.join(it.parts)}) tensor and the "
                                                  f"checkpoint has {_listed(it.sources)}; {reason}")
        s = self.src[it.sources[0]]
        self.set(t, action="load", source=it.sources[0], stage="port", source_shape=tuple(s.shape),
                 source_dtype=s.dtype, reason=f"{n} checkpoint tensors joined" + ("; transposed" if transpose else ""),
                 transform=Transform("concat", f"{n} tensors ({', '.join(it.parts)}) joined along dim {dim}"
                                     + (", each transposed" if transpose else ""), why, sources=tuple(it.sources),
                                     parts=n, dim=dim, transpose=transpose))
        self.used.update(it.sources)
        for tb, sb in it.biases:
            s = self.src[sb[0]]
            self.set(tb[0], action="load", source=sb[0], stage="port", source_shape=tuple(s.shape),
                     source_dtype=s.dtype, reason=f"{n} checkpoint tensors joined",
                     transform=Transform("concat", f"{n} tensors ({', '.join(it.parts)}) joined along dim 0", why,
                                         sources=tuple(sb), parts=n, dim=0))
            self.used.update(sb)

    # -- the new plan ----------------------------------------------------------------------

    def finish(self) -> Plan:
        from .matching.decisions import PARTIAL_MISSING, PARTIAL_SHAPES

        for i, r in enumerate(self.rules):
            if not self.rule_hits[i]:
                self.warnings.append(f"{r.text} matched no key that could take it")
        if not self.changed and not self.problems and not self.warnings:
            return self.plan
        loaded = {d.target for d in self.decs if d.action == "load"}
        for i, d in enumerate(self.decs):  # a tie whose canonical key is now loaded is filled through it
            if d.action == "missing" and d.tied_to in loaded:
                self.decs[i] = replace(d, action="tied", reason=f"shares storage with '{d.tied_to}', which is loaded")
                self.changed.add(d.target)
        problems = [p for p in self.plan.problems if not any(p.startswith(f"{t}: ") for t in self.changed)]
        suggestions = list(self.plan.suggestions)
        if not any(d.action == "skip_shape" for d in self.decs) and PARTIAL_SHAPES in suggestions:
            suggestions.remove(PARTIAL_SHAPES)
        if not any(d.action == "missing" for d in self.decs) and PARTIAL_MISSING in suggestions:
            suggestions.remove(PARTIAL_MISSING)
        sources = set()
        for d in self.decs:
            if d.action == "load" and d.source:
                sources.add(d.source)
                if d.transform is not None:
                    sources.update(d.transform.sources)
        unused = tuple(u for u in self.plan.unused if u.source not in sources)
        return replace(self.plan, decisions=tuple(self.decs), unused=unused,
                       problems=tuple(dict.fromkeys(problems + self.problems)),
                       suggestions=tuple(dict.fromkeys(suggestions + self.suggestions)),
                       warnings=tuple(dict.fromkeys(list(self.plan.warnings) + self.warnings)))


def _stacked(shapes: Sequence[tuple[int, ...]], dim: int) -> tuple[int, ...] | None:
    """The shape of 2-D ``shapes`` joined along ``dim``, or None when their other sizes differ."""
    other = {s[1 - dim] for s in shapes}
    if len(other) != 1:
        return None
    total = sum(s[dim] for s in shapes)
    return (total, other.pop()) if dim == 0 else (other.pop(), total)


def _base_reason(d: Decision) -> str:
    """The matcher's reason without its shape verdict (``...; not loaded`` / ``...; same shape``)."""
    r = d.reason
    for cut in (", but checkpoint has", "; same shape", "same name and shape"):
        if cut in r:
            r = r.split(cut)[0]
    return r or "same name"


def port(plan: Plan, layouts: Mapping[str, Layout], source: Sequence[TensorSpec],
         rules: Sequence[Rule] = (), recorded: Mapping[str, Layout] | None = None) -> Plan:
    """Add the transforms the evidence (or the user's rules) call for to a matcher's plan.

    Args:
        plan: the matcher's plan.
        layouts: :func:`layouts_of` the model.
        source: the checkpoint's tensors (names, shapes, dtypes), in file order.
        rules: :func:`parse_rules` of ``transforms=``.
        recorded: ``{checkpoint key: Layout}`` of weights whose layer class the file records
            (a pickled whole model, :func:`recorded_layouts`).

    Returns:
        The plan with transposed / split / joined decisions, the problems they solve removed,
        and a problem (with the rule that would settle it) where the evidence conflicts or
        cannot tell. The same plan when nothing applies.

    Example:
        >>> import torch
        >>> from ckptfit.matching import match
        >>> from ckptfit.plans import TensorSpec
        >>> model = [TensorSpec("fc.weight", (8, 4), torch.float32)]
        >>> ckpt = [TensorSpec("fc.weight", (4, 8), torch.float32)]
        >>> p = port(match(model, ckpt), {"fc.weight": Layout(OUT_IN, "nn.Linear")}, ckpt)
        >>> p.ok, p.decisions[0].transform.kind
        (True, 'transpose')
    """
    from ._adapt import adapt_plan
    from ._class_map import class_map_plan

    adapt = next((r.adapt for r in rules if r.adapt), None)
    class_map = next((r.class_map for r in rules if r.class_map is not None), None)
    rules = tuple(r for r in rules if r.adapt is None and r.class_map is None)
    plan = adapt_plan(plan, adapt)  # an RGB first convolution into other input channels, only when asked
    plan = class_map_plan(plan, class_map)  # a classifier head's rows by the user's class map, only when asked
    if not layouts and not rules:
        return plan
    if not rules and not recorded and not _could_change(plan, layouts):
        return plan  # the common case: every weight fits as stored and nothing is left over
    porter = _Porter(plan, layouts, source, rules, recorded)
    items = porter.collect()
    chosen = porter.decide(items)
    porter.apply(items, chosen)
    return porter.finish()


def _could_change(plan: Plan, layouts: Mapping[str, Layout]) -> bool:
    """Whether the evidence could call for any transform: a weight of a transposed-layout type, a
    weight whose shape differs, a model tensor nothing fills, or a checkpoint tensor left over."""
    if any(lay.layout != OUT_IN for lay in layouts.values()):
        return True
    for d in plan.decisions:
        if d.action == "skip_shape" and d.target in layouts:
            return True
        if d.source is None and (d.action == "missing" or (d.action == "keep" and d.stage == "none")):
            return True
    return bool(plan.unused)
