"""Source-aware matching: build the model that wrote the file, and let its forward pass say which tensor is which.

When names do not settle a port (torchvision's ``layer1.0.conv1`` against transformers'
``resnet.encoder.stages.0.layers.0.layer.0.convolution``; timm's ``blocks.0.attn.qkv`` against
transformers' ``vit.layers.0.attention.q_proj``), the implementation that wrote the file can:

- **which source model**: the file's own record (a Hugging Face folder's ``config.json`` with
  ``architectures``: that transformers class is built from the config), or the one the user
  names with ``source_model=`` (a model SPEC such as ``"torchvision:resnet18"``, a zero-argument
  factory, an ``nn.Module``, or ``"identify"`` to take :func:`ckptfit.identify.identify`'s clear
  best candidate). It is built on the meta device from installed libraries only; no code from
  the file runs, and a name the file gives must be a transformers model class.
- **its keys must be the file's**: every tensor of the chosen state dict is a tensor of the source
  model with the same shape (one common prefix such as ``module.`` aside); otherwise it is not used.
- **what it says**: both models run once on the meta device (:mod:`ckptfit._trace`); tensors are
  paired in the order the forward passes first use them, each pair of the same layer type and
  shape, and layers whose settings differ (a norm's ``eps``, a convolution's stride) make it a
  refusal, since the same weights would compute another function. A fused projection against
  separate ones is left to :mod:`ckptfit.porting` (names must say ``qkv`` and ``q``/``k``/``v``).

It is tried only when the plan by names is refused, and the result must itself be a complete
plan; the report says which source model was built and from what record. A plan by names that
holds is never changed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from torch import nn

from .checkpoint import Checkpoint, StateDictCandidate
from .plans import Plan

__all__ = ["source_model_option", "source_aware", "check_source_model"]

_OPTION: ContextVar[Any] = ContextVar("ckptfit_source_model", default=None)


def check_source_model(value: Any) -> Any:
    """Validate ``source_model=`` early: None, a SPEC string, ``"identify"``, a factory or a module."""
    if value is None or isinstance(value, nn.Module) or (callable(value) and not isinstance(value, str)):
        return value
    if isinstance(value, str) and (value == "identify" or ":" in value):
        return value
    raise ValueError(f"source_model={value!r}: pass the implementation that wrote the file as a model SPEC "
                     f"('torchvision:resnet18', 'timm:vit_tiny_patch16_224'), a zero-argument factory, an "
                     f"nn.Module, or 'identify'")


@contextlib.contextmanager
def source_model_option(value: Any) -> Iterator[None]:
    """``source_model=`` for the load or plan running in this context (thread- and task-local)."""
    token = _OPTION.set(check_source_model(value))
    try:
        yield
    finally:
        _OPTION.reset(token)


def _source_factory(ckpt: Checkpoint) -> tuple[Callable[[], nn.Module] | nn.Module, str] | None:
    value = _OPTION.get()
    if isinstance(value, nn.Module):
        return value, f"{type(value).__name__} (source_model=)"
    if callable(value) and not isinstance(value, str):
        if isinstance(getattr(value, "ckptfit_label", None), str):  # the CLI's --source-model SPEC
            return value, value.ckptfit_label
        name = getattr(value, "__qualname__", type(value).__name__)
        return value, (f"{name} (source_model=)" if "<lambda>" not in name else "the source_model= factory")
    if value == "identify":
        from .auto import identified_factory

        factory, chosen = identified_factory(ckpt, None, None)
        return factory, chosen
    if isinstance(value, str):
        from .specs import model_factory

        return model_factory(value), f"{value} (source_model=)"
    config = ckpt.metadata.get("config") if ckpt.format == "hf-folder" else None
    if isinstance(config, dict) and isinstance(config.get("architectures"), list) and config.get("model_type"):
        from .auto import hf_factory

        factory, chosen = hf_factory(ckpt.path, config)
        return factory, chosen
    return None


def _transformers_names(src: nn.Module, keys: list[str]) -> dict[str, str] | None:
    """``{checkpoint key: module key}`` by transformers' own checkpoint renames (its files keep older
    names than its modules, e.g. ``attention.attention.query`` for ``attention.q_proj``); None when
    this transformers has none, or a key needs more than a rename (a fused or permuted weight)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return None
    try:
        mapping = get_model_conversion_mapping(src)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if not isinstance(t, WeightRenaming)]
        meta = src.state_dict()
        out = {}
        for k in keys:
            new, converted = rename_source_key(k, renamings, converters, getattr(src, "base_model_prefix", None), meta)
            if converted is not None:
                return None
            out[k] = new
        return out
    except Exception:  # noqa: BLE001 - a private API of one transformers version: absent means unknown
        return None


def _keys_of_file(src: nn.Module, cand: StateDictCandidate) -> dict[str, str] | None:
    """``{source model key: checkpoint key}`` when every checkpoint tensor is one of the source
    model's, same shape (after one common prefix on either side, or transformers' own renames of
    its checkpoint keys); else None."""
    ssd = src.state_dict()
    ckeys = list(cand.tensors)
    if not all(k in ssd for k in ckeys) and type(src).__module__.startswith("transformers."):
        names = _transformers_names(src, ckeys)
        if names is not None and len(set(names.values())) == len(names) and all(
                n in ssd and tuple(ssd[n].shape) == tuple(cand.tensors[k].shape) for k, n in names.items()):
            return {n: k for k, n in names.items()}
    prefixes = [("", "")]
    first = ckeys[0] if ckeys else ""
    if "." in first:
        p = first.split(".", 1)[0] + "."
        prefixes += [(p, ""), ("", p)]  # 'module.' on the file's side, or on the model's
    for cp, sp in prefixes:
        if not all(k.startswith(cp) for k in ckeys):
            continue
        out = {}
        for k in ckeys:
            sk = sp + k[len(cp):]
            if sk not in ssd or tuple(ssd[sk].shape) != tuple(cand.tensors[k].shape):
                break
            out[sk] = k
        else:
            return out
    return None


def _renamed(pairs: dict[str, str], fused: list[tuple[list[str], list[str]]], to_ckpt: dict[str, str]
             ) -> dict[str, str] | None:
    """``{checkpoint key: model-side name}``: paired tensors under the model's key; a fused
    projection (or the parts of one) under a name beside the other side's parts (or fused
    tensor) that :mod:`ckptfit.porting` splits (or joins) by its name."""
    out = {to_ckpt[s]: t for s, t in pairs.items() if s in to_ckpt}
    for srcs, tgts in fused:
        if any(s not in to_ckpt for s in srcs):
            return None
        if len(srcs) <= 2:  # the file's side is fused: put it beside the model's parts
            parents = {t.rpartition(".")[0].rpartition(".")[0] for t in tgts}
            if len(parents) != 1:
                return None
            parent = parents.pop()
            for s in srcs:
                mod, _, leaf = s.rpartition(".")
                out[to_ckpt[s]] = (f"{parent}.{leaf}" if leaf.startswith("in_proj_")
                                   else f"{parent}.{mod.rpartition('.')[2]}.{leaf}")
        else:  # the model's side is fused: put the file's parts beside it
            t0 = tgts[0]
            mod, _, leaf = t0.rpartition(".")
            parent = mod if leaf.startswith("in_proj_") else mod.rpartition(".")[0]
            for s in srcs:
                smod, _, sleaf = s.rpartition(".")
                out[to_ckpt[s]] = f"{parent}.{smod.rpartition('.')[2]}.{sleaf}"
    return out


def source_aware(model: nn.Module, ckpt: Checkpoint, cand: StateDictCandidate, plan: Plan,
                 plan_with: Callable[[StateDictCandidate, dict], Plan]) -> Plan:
    """The plan the source model settles: when ``plan`` (by names) is refused, or holds only
    through structural alignment (which the source model's forward order then checks).

    For a refused plan, first the source model's layer types alone (which weights are ``Conv1D``,
    stored ``[in, out]``) are given to the porting pass as evidence (``plan_with(cand, {id(tensor):
    Layout})``); if that does not settle it, the forward order pairs the tensors. For a plan that
    holds by structure, the forward order must pair the same tensors; where it disagrees with
    declaration order alone it is used (data flow is the stronger evidence), where it disagrees
    with names the load is refused. The returned plan names the file's own keys (its decisions
    load ``cand``'s tensors), and its ``transforms`` say which source model was built.
    """
    structural = any(d.stage == "structural" and d.action == "load" for d in plan.decisions)
    if plan.ok and not structural:
        return plan
    from .loading.meta import MAX_INIT_BYTES, MIN_PARAMETERS, bounded_build, parameters_on_meta

    try:
        found = _source_factory(ckpt)
    except Exception as e:  # noqa: BLE001 - identify / config.json of any file: explained, not raised
        return replace(plan, warnings=plan.warnings + (f"no source model: {str(e).splitlines()[0][:200]}",))
    if found is None:
        if not plan.ok and any(": ambiguous: " in x for x in plan.problems):  # names cannot tell look-alikes apart
            # followed literally it runs: 'identify' (a SPEC of the user's own is named in words only)
            hint = ("the implementation that wrote the file can tell them apart by its forward pass: pass "
                    "source_model='identify' (CLI: --source-model identify) to have ckptfit find it from the "
                    "file, or source_model= with its model SPEC or a zero-argument factory if you know it")
            return replace(plan, suggestions=plan.suggestions + (hint,))
        return plan
    factory, label = found

    def note(why: str, fix: str | None = None) -> Plan:
        if plan.ok and fix is None:  # the plan by structure stands; the source model could not check it
            return replace(plan, warnings=plan.warnings + (f"source model {label}: {why}",))
        return replace(plan, problems=plan.problems + (f"source model {label}: {why}",),
                       suggestions=((fix,) if fix else ()) + plan.suggestions)

    if isinstance(factory, nn.Module):
        src = factory
    else:
        try:  # sizes come from the file (config.json): bounded, so a hostile one is refused, not run out of memory
            with parameters_on_meta(), bounded_build(max_parameters=max(4 * len(cand.tensors), MIN_PARAMETERS),
                                                     max_bytes=MAX_INIT_BYTES, what="it"):
                src = factory()
        except Exception as e:  # noqa: BLE001 - building a library model from the file's record
            return note(f"could not be built: {type(e).__name__}: {str(e)[:200]}")
    if not isinstance(src, nn.Module):
        return note(f"the factory returned {type(src).__name__}, not an nn.Module")
    to_ckpt = _keys_of_file(src, cand)
    if to_ckpt is None:
        return note("its tensors are not the file's (names or shapes differ), so it cannot say which is which")
    settled = _settle(model, src, cand, to_ckpt, label, plan_with, layer_types=not plan.ok)
    if not isinstance(settled, Plan):
        return note(*settled)
    return settled if not plan.ok else _checked(plan, settled, label)


def _settle(model: nn.Module, src: nn.Module, cand: StateDictCandidate, to_ckpt: dict[str, str], label: str,
            plan_with: Callable[[StateDictCandidate, dict], Plan], layer_types: bool) -> Plan | tuple[str, str | None]:
    """The complete plan the source model gives, or ``(why not, what would settle it)``."""
    from ._trace import align, forward_order
    from .layouts import layouts_of

    # the source model's layer types (which weights are Conv1D [in, out]): evidence for the porting pass
    recorded = {id(cand.tensors[to_ckpt[k]]): lay for k, lay in layouts_of(src).items() if k in to_ckpt}
    if recorded and layer_types:
        p1 = plan_with(cand, recorded)
        if p1.ok:
            return replace(p1, transforms=p1.transforms + (
                f"layer types from the source model {label}: {_layer_types(layouts_of(src), to_ckpt)}",))
    so, to = forward_order(src), forward_order(model)
    if so is None or to is None:
        which = "the source model" if so is None else "the model"
        return f"{which} did not run on the meta device on any input tried, so the forward order is unknown", None
    al = align(src, so[0], model, to[0])
    if al.settings:
        (module, attr, want), n = al.settings[0], len(al.settings)
        more = f" ({n} layers differ)" if n > 1 else ""
        return al.problems[0] + more, (f"build the model with {attr}={want!r} in those layers, as the source model "
                                       f"has them (e.g. for '{module}'); then the same weights compute the same "
                                       f"function")
    if al.problems:  # another network: no pairing of these weights computes the source's function
        return f"not aligned by forward order: {al.problems[0]}", (
            f"check that the model is the network the source model {label} is (same layers, used in the same "
            f"order); the load is refused rather than made into another function")
    names = _renamed(al.pairs, al.fused, to_ckpt)
    if names is None:
        return "a fused projection could not be placed beside its parts", None
    tensors = {names.get(k, k): v for k, v in cand.tensors.items()}
    if len(tensors) != len(cand.tensors):
        return "two of the file's tensors would take one name", None
    p2 = plan_with(StateDictCandidate(cand.name, tensors, cand.kind, cand.default, cand.reason), recorded)
    if not p2.ok:
        return f"aligned by forward order, but the plan still fails: {p2.problems[0]}", None
    return _back(p2, {v: k for k, v in names.items()}, label, so[1])


_WEAK = ("order", "unique signature")  # structural evidence that data flow outweighs


def _checked(plan: Plan, by_source: Plan, label: str) -> Plan:
    """A plan that holds by structure, checked against the source model's forward order."""
    a, b = plan.mapping(), by_source.mapping()
    if a == b:
        return replace(plan, transforms=plan.transforms + (
            f"the structural pairs agree with the forward order of the source model {label}",))
    dec = {d.target: d for d in plan.decisions}
    differ = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
    t = differ[0]
    example = f"'{t}': '{a.get(t)}' by {dec[t].evidence or dec[t].stage}, '{b.get(t)}' by forward order"
    if all(dec[t].stage == "structural" and dec[t].evidence in _WEAK for t in differ):
        return replace(by_source, warnings=by_source.warnings + (
            f"declaration order and the forward order of the source model {label} disagree on {len(differ)} "
            f"tensors ({example}); the forward order is used",))
    return replace(plan, problems=plan.problems + (
        f"the names and the forward order of the source model {label} disagree on {len(differ)} tensors "
        f"({example}); nothing is guessed",),
        suggestions=plan.suggestions + ("check which implementation wrote the file; rename= rules name the pairs "
                                        "explicitly",))


def _layer_types(layouts: dict, to_ckpt: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for k, lay in layouts.items():
        if k in to_ckpt:
            counts[lay.label] = counts.get(lay.label, 0) + 1
    return ", ".join(f"{n} {label} weight{'s' if n > 1 else ''}" for label, n in counts.items())


def _back(p: Plan, back: dict[str, str], label: str, ran_on: str) -> Plan:
    """The plan made on the renamed tensors, naming the file's own keys again."""
    evidence = f"the source model's forward order ({label})"

    def named(text: str) -> str:  # the porting pass wrote the names it saw; the file's are these
        for new, old in back.items():
            text = text.replace(f"'{new}'", f"'{old}'")
        return text

    decisions = []
    for d in p.decisions:
        if d.source in back:
            src = back[d.source]
            changes: dict[str, Any] = {"source": src}
            if d.transform is not None:
                changes["transform"] = replace(d.transform, sources=tuple(back.get(s, s) for s in d.transform.sources),
                                               reason=named(d.transform.reason))
                changes["reason"] = f"{named(d.reason)}; placed by {evidence}"
            elif d.action == "load":
                changes.update(stage="structural", evidence=evidence,
                               reason=f"same place in the forward pass, layer type and shape as '{src}' in {label}")
            d = replace(d, **changes)
        decisions.append(d)
    unused = tuple(replace(u, source=back.get(u.source, u.source)) for u in p.unused)
    transforms = tuple(t for t in p.transforms) + (
        f"aligned through the source model {label}: both forward passes run on the meta device ({ran_on} for "
        f"the source), tensors paired in the order they are first used, same layer type and shape",)
    return replace(p, decisions=tuple(decisions), unused=unused, transforms=transforms)
