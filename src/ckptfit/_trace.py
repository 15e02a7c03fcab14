"""Which tensor of one implementation is which of another: the order a forward pass first uses them.

Two implementations of one network (torchvision's ResNet and transformers' ``ResNetModel``;
timm's, torchvision's and transformers' ViT) name their weights differently and may declare
their modules in another order, but a forward pass uses the weights in the order the data
flows through them. :func:`forward_order` runs a model once on the meta device (no memory, no
values; the model itself is not changed: ``torch.func.functional_call`` with meta stand-ins)
and records, through a thread-local ``TorchFunctionMode``, the order in which each state-dict
tensor is first passed to a torch function; tensors first seen by the same call (a batch norm's
weight, bias and running statistics) are ordered as the state dict orders them.

:func:`align` walks two such orders side by side. Each pair must have the same shape and the
same role (the kind of layer that owns it: convolution, linear, norm, embedding, other, and the
kind of tensor: weight, bias, running mean ...); a fused ``[3d, in]`` projection on one side
against ``q``, ``k``, ``v`` projections on the other is noted as such (the split or join is left
to :mod:`ckptfit.porting`, which needs the names to say it). Paired layers whose settings make
them compute something else (a norm's ``eps``, a convolution's stride, padding, dilation or
groups) are differences of function: the alignment is refused. Any other mismatch stops it too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["forward_order", "align", "Alignment", "example_inputs"]

_LEAVES = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var",
           "num_batches_tracked": "num_batches_tracked", "in_proj_weight": "weight", "in_proj_bias": "bias"}


class _FirstUse(TorchFunctionMode):
    """Records the state-dict keys of tensors in the order torch functions first receive them."""

    def __init__(self, keys: dict[int, str], rank: dict[str, int]):
        super().__init__()
        self.keys, self.rank = keys, rank
        self.order: list[str] = []
        self.seen: set[str] = set()

    def _visit(self, obj: Any, found: list[str], depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            k = self.keys.get(id(obj))
            if k is not None and k not in self.seen:
                self.seen.add(k)
                found.append(k)
        elif depth < 3 and isinstance(obj, list | tuple):
            for x in obj:
                self._visit(x, found, depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for x in obj.values():
                self._visit(x, found, depth + 1)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        found: list[str] = []
        self._visit(args, found)
        self._visit(kwargs, found)
        self.order.extend(sorted(found, key=self.rank.__getitem__))
        return func(*args, **kwargs)


def example_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Inputs worth trying on the meta device, most likely first (from the model's config or first layer)."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if main == "input_ids":
        return [torch.zeros(1, 8, dtype=torch.long, device="meta")]
    sizes: list[int] = []
    chans: list[int] = []
    for obj in (config, model, getattr(model, "patch_embed", None)):
        for name in ("image_size", "img_size"):
            v = getattr(obj, name, None) if obj is not None else None
            v = v[0] if isinstance(v, list | tuple) and v else v
            if isinstance(v, int) and 0 < v <= 1024:
                sizes.append(v)
        v = getattr(obj, "num_channels", None) if obj is not None else None
        if isinstance(v, int):
            chans.append(v)
    first = next((m for m in model.modules() if isinstance(m, nn.Embedding | nn.Linear | nn.modules.conv._ConvNd)),
                 None)
    if isinstance(first, nn.Embedding):
        return [torch.zeros(1, 8, dtype=torch.long, device="meta")]
    if isinstance(first, nn.Linear) and not chans and not sizes:  # the first declared need not be the first used
        ins = dict.fromkeys(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
        return [torch.zeros(1, n, device="meta") for n in list(ins)[:8]]
    if isinstance(first, nn.modules.conv._ConvNd):
        chans.append(first.in_channels)
        nd = len(first.kernel_size)
        c = chans[0]
        return [torch.zeros(1, c, *([s] * nd), device="meta") for s in dict.fromkeys(sizes + [32, 64, 224])]
    return []


def forward_order(model: nn.Module) -> tuple[list[str], str] | None:
    """The model's state-dict keys in the order a forward pass first uses them, and the input it
    ran on; None when no input it could take ran on the meta device. Tied tensors appear once."""
    sd = model.state_dict(keep_vars=True)
    rank = {k: i for i, k in enumerate(sd)}
    metas: dict[int, torch.Tensor] = {}
    stand_in: dict[str, torch.Tensor] = {}
    keys: dict[int, str] = {}
    for k, v in sd.items():
        if id(v) not in metas:
            metas[id(v)] = torch.empty_like(v, device="meta")
            keys[id(metas[id(v)])] = k
        stand_in[k] = metas[id(v)]
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, put back as it was
    for x in example_inputs(model):
        rec = _FirstUse(keys, rank)
        try:
            model.eval()
            with torch.no_grad(), rec:
                torch.func.functional_call(model, stand_in, (x,), strict=False)
        except Exception:  # noqa: BLE001 - any model code on any input: only whether it ran matters
            continue
        finally:
            for m, mode in modes:
                m.training = mode
        return _by_module(rec.order, rank), f"an input of shape {list(x.shape)}"
    return None


def _by_module(order: list[str], rank: dict[str, int]) -> list[str]:
    """Modules in the order of their first used tensor; each module's tensors in state-dict order
    (an attention module may touch its bias before its weight)."""
    groups: dict[str, list[str]] = {}
    for k in order:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    return [k for g in groups.values() for k in sorted(g, key=rank.__getitem__)]


def _family(mod: nn.Module | None, leaf: str) -> str:
    if mod is None:
        return "other"
    if leaf.startswith("in_proj") or isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
        return "linear"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return f"conv{len(mod.kernel_size)}d" + ("T" if mod.transposed else "")
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "Norm" in type(mod).__name__:
        return "norm"
    return "other"


@dataclass
class _Tensor:
    key: str
    shape: tuple[int, ...]
    module: str
    leaf: str
    family: str
    mod: nn.Module | None = field(default=None, repr=False)

    @property
    def role(self) -> tuple[str, str, tuple[int, ...]]:
        return self.family, _LEAVES.get(self.leaf, "other"), self.shape


def _describe(model: nn.Module, keys: Sequence[str]) -> list[_Tensor]:
    mods = dict(model.named_modules(remove_duplicate=False))
    sd = model.state_dict(keep_vars=True)
    out = []
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        m = mods.get(mod)
        out.append(_Tensor(k, tuple(sd[k].shape), mod, leaf, _family(m, leaf), m))
    return out


_SETTINGS = {"norm": ("eps",), "conv1d": ("stride", "padding", "dilation", "groups"),
             "conv2d": ("stride", "padding", "dilation", "groups"), "conv3d": ("stride", "padding", "dilation", "groups")}


@dataclass
class Alignment:
    """``{source key: target key}`` for tensors paired one to one; ``fused``: ``(source keys,
    target keys)`` of a fused projection against its parts (either side fused); ``problems``:
    why the alignment stopped or the functions differ (empty when it holds)."""

    pairs: dict[str, str] = field(default_factory=dict)
    fused: list[tuple[list[str], list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    settings: list[tuple[str, str, Any]] = field(default_factory=list)  # (model module, setting, source's value)


def _run(ts: list[_Tensor], i: int) -> list[_Tensor]:
    """A linear weight at ``i`` and its bias right after it, if any."""
    if i < len(ts) and ts[i].family == "linear" and _LEAVES.get(ts[i].leaf) == "weight":
        if i + 1 < len(ts) and ts[i + 1].module == ts[i].module and _LEAVES.get(ts[i + 1].leaf) == "bias":
            return ts[i:i + 2]
        return ts[i:i + 1]
    return []


def _fused_against(one: list[_Tensor], many: list[_Tensor], j: int) -> tuple[list[list[_Tensor]], int] | None:
    """``one`` (a fused linear weight [+ bias]) against 2 or 3 linear runs from ``many[j]`` whose
    output sizes add up to it (same input size, same bias presence)."""
    if len(one[0].shape) != 2:
        return None
    total, inn = one[0].shape
    runs: list[list[_Tensor]] = []
    k, acc = j, 0
    while len(runs) < 3 and acc < total:
        r = _run(many, k)
        if not r or len(r) != len(one) or len(r[0].shape) != 2 or r[0].shape[1] != inn:
            return None
        runs.append(r)
        acc += r[0].shape[0]
        k += len(r)
    return (runs, k) if acc == total and len(runs) >= 2 else None


def align(src_model: nn.Module, src_order: Sequence[str], tgt_model: nn.Module, tgt_order: Sequence[str]) -> Alignment:
    """Pair the source model's tensors with the target model's by forward order, role and shape."""
    s, t = _describe(src_model, src_order), _describe(tgt_model, tgt_order)
    out = Alignment()
    i = j = 0
    while i < len(s) and j < len(t):
        a, b = s[i], t[j]
        if a.role == b.role:
            out.pairs[a.key] = b.key
            i, j = i + 1, j + 1
            continue
        one = _run(s, i)
        hit = _fused_against(one, t, j) if one else None
        if hit:
            runs, j = hit
            out.fused.append(([x.key for x in one], [x.key for r in runs for x in r]))
            i += len(one)
            continue
        one = _run(t, j)
        hit = _fused_against(one, s, i) if one else None
        if hit:
            runs, i = hit
            out.fused.append(([x.key for r in runs for x in r], [x.key for x in one]))
            j += len(one)
            continue
        out.problems.append(f"the forward passes part at '{a.key}' ({a.family} {a.leaf} {list(a.shape)}) and "
                            f"'{b.key}' ({b.family} {b.leaf} {list(b.shape)})")
        return out
    if i < len(s) or j < len(t):
        rest = [x.key for x in s[i:]] or [x.key for x in t[j:]]
        side = "source model" if i < len(s) else "model"
        out.problems.append(f"the {side} uses {len(rest)} more tensors in its forward pass ('{rest[0]}' ...)")
        return out
    # the settings of paired layers: the same weights compute another function if they differ
    by_key = {x.key: x for x in s} | {("t", x.key): x for x in t}
    seen: set[tuple[str, str]] = set()
    for sk, tk in out.pairs.items():
        a, b = by_key[sk], by_key[("t", tk)]
        if (a.module, b.module) in seen or a.mod is None or b.mod is None:
            continue
        seen.add((a.module, b.module))
        for attr in _SETTINGS.get(a.family, ()):
            va, vb = getattr(a.mod, attr, None), getattr(b.mod, attr, None)
            if va is not None and vb is not None and va != vb:
                out.problems.append(f"'{b.module}' has {attr}={vb!r} where the source model's '{a.module}' has "
                                    f"{attr}={va!r}: the same weights would compute another function")
                out.settings.append((b.module, attr, va))
    # tensors no forward pass uses (num_batches_tracked): through the modules paired above
    s_sd, t_sd = src_model.state_dict(), tgt_model.state_dict()
    mod_pairs = {by_key[sk].module: by_key[("t", tk)].module for sk, tk in out.pairs.items()}
    for k in s_sd:
        if k in out.pairs or k in src_order:
            continue
        mod, _, leaf = k.rpartition(".")
        tk = f"{mod_pairs[mod]}.{leaf}" if mod in mod_pairs else None
        if tk in t_sd and tk not in tgt_order and tuple(t_sd[tk].shape) == tuple(s_sd[k].shape):
            out.pairs[k] = tk
    return out
