"""What names say to the porting pass: which tensor is fused and of which parts, which module is a part.

``qkv`` / ``to_qkv`` / ``Wqkv`` / ``c_attn`` / ``in_proj`` name a fused ``(q, k, v)`` tensor,
``gate_up_proj`` a fused ``(gate, up)``; ``q_proj`` / ``query`` / ``to_q`` name the part ``q``.
``query_key_value`` is never read as fused parts: GPT-NeoX and BLOOM interleave it per head.
"""
from __future__ import annotations

import re

__all__ = ["part_of", "fused_parts", "split_key", "parent_module", "last_segment"]

_PART_WORDS = {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v", "gate": "gate", "up": "up"}
_TOKENS = ("query", "value", "gate", "key", "up", "q", "k", "v")
# Fused tensors whose name does not spell the parts but whose layout is documented [q; k; v].
_FUSED_BY_CONVENTION = {"c_attn": ("q", "k", "v"), "in_proj": ("q", "k", "v")}
# Fused names whose layout is NOT parts one after the other (GPT-NeoX, BLOOM: per head).
_INTERLEAVED = {"query_key_value"}


def _core(seg: str) -> str:
    s = seg.lower()
    s = re.sub(r"^(to_|w_|w(?=q|k|v))", "", s)
    return re.sub(r"(_?proj|_lin|_linear|_layer)$", "", s)


def part_of(seg: str) -> str | None:
    """``'q_proj'`` -> ``'q'``; ``'value'`` -> ``'v'``; ``'up_proj'`` -> ``'up'``; else None."""
    return _PART_WORDS.get(_core(seg))


def fused_parts(seg: str) -> tuple[str, ...] | None:
    """``'qkv'`` / ``'to_qkv'`` / ``'Wqkv'`` / ``'c_attn'`` -> ``('q', 'k', 'v')``; ``'gate_up_proj'`` -> ``('gate', 'up')``."""
    low = seg.lower()
    if low in _FUSED_BY_CONVENTION:
        return _FUSED_BY_CONVENTION[low]
    core = _core(seg)
    if core in _INTERLEAVED:
        return None
    out: list[str] = []
    i = 0
    while i < len(core):
        if core[i] == "_":
            i += 1
            continue
        for tok in _TOKENS:
            if core.startswith(tok, i):
                out.append(_PART_WORDS[tok])
                i += len(tok)
                break
        else:
            return None
    return tuple(out) if len(out) >= 2 and len(set(out)) == len(out) else None


def split_key(key: str) -> tuple[str, str]:
    """``(module, leaf)``; ``attn.in_proj_weight`` is ``('attn.in_proj', 'weight')``."""
    mod, _, leaf = key.rpartition(".")
    if leaf in ("in_proj_weight", "in_proj_bias"):
        return (f"{mod}.in_proj" if mod else "in_proj"), leaf[len("in_proj_"):]
    return mod, leaf


def parent_module(module: str) -> str:
    return module.rpartition(".")[0]


def last_segment(module: str) -> str:
    return module.rpartition(".")[2]
