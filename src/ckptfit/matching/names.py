"""Names as the matcher reads them: key segments, numbers, short dtype and shape text, and the
evidence module names give (tokens, synonyms, prefixes, abbreviations) for structural alignment."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..dtypes import dtype_kind as _dtype_kind
from ..dtypes import short_name

NBT = "num_batches_tracked"
# How many modules a structural suggestion names before folding the rest into a count.
MAX_LISTED = 3

def fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def dtype_name(dtype: object) -> str:
    """``fp16``, ``bf16``, ``fp32``, ``fp64``, else the dtype's name (a ``torch.dtype`` or a name alike: diff
    passes names and never imports torch)."""
    return short_name(dtype)  # type: ignore[arg-type]


def dtype_kind(dtype: object) -> str:
    """``bool``, ``complex``, ``float`` or ``int``: what casts into what (quantized dtypes count as ``int``)."""
    return _dtype_kind(dtype)  # type: ignore[arg-type]


def leaf(name: str) -> str:
    return name.rpartition(".")[2]


def describe(a: str, b: str) -> str:
    if not b:
        return f"strip '{a}'"
    if not a:
        return f"add '{b}'"
    return f"replace '{a}' with '{b}'"


# Words that mark a name as an EMA / averaged copy of the weights (the one table: the
# state-dict chooser in ckptfit.state_dicts reads it too).
EMA_WORDS = ("ema", "average", "swa", "shadow", "polyak")


def _is_ema_prefix(prefix: str) -> bool:
    return any(w in seg.lower() for seg in prefix.split(".") if seg for w in EMA_WORDS)


def model_over_ema(conflicting: list[tuple[str, str]]) -> tuple[str, str] | None:
    """Of transforms that fit equally well, the one stripping a plain prefix when every other strips
    an EMA-named one (``model.`` vs ``model_ema.``); None when that does not settle it."""
    plain = [c for c in conflicting if not _is_ema_prefix(c[0])]
    if len(conflicting) >= 2 and len(plain) == 1 and plain[0][1] == "":
        return plain[0]
    return None


def rule_for(a: str, b: str) -> str:
    return f"rename=[(r'^{re.escape(a)}', '{b}')]"


def natural_key(name: str) -> tuple:
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def numbers(name: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", name)]


def fold_names(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")



# --------------------------------------------------------------------------------------
# name evidence for the structural stage
#
# Module names are evidence, declaration order is evidence, roles and shapes are constraints.
# Two module paths are compared segment by segment (a monotone alignment, so that
# "layers.3.attn.q" and "blocks.3.q_proj" line up), each segment split into tokens on "_",
# digits and camelCase. Tokens count when they are equal, synonyms ({fc, head, classifier}),
# one the prefix of the other ("q"/"query", "enc"/"encoder", "down"/"downsample") or an
# abbreviation of it ("attn"/"attention"). Digits count only where both sides are numbered
# alike (see Evidence): "0", "2", "4" of an nn.Sequential are not "fc0", "fc1", "fc2".

_TOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_SYNONYMS = (
    {"fc", "head", "heads", "classifier", "cls", "logits", "classif"},
    {"fc", "linear", "lin", "dense"},
    {"down", "downsample", "downsampling", "downsampler"},
    {"up", "upsample", "upsampling", "upsampler"},
    {"q", "query", "queries", "wq"},
    {"k", "key", "keys", "wk"},
    {"v", "value", "values", "val", "wv"},
    {"o", "out", "output", "outputs", "wo"},
    {"enc", "encoder", "encode"},
    {"dec", "decoder", "decode"},
    {"attn", "attention", "att"},
    {"norm", "ln", "layernorm", "bn", "batchnorm", "gn", "groupnorm", "rmsnorm"},
    {"mlp", "ffn", "ff", "feedforward"},
    {"emb", "embed", "embedding", "embeddings", "embedder"},
    {"proj", "projection"},
    {"conv", "convolution"},
    {"shortcut", "skip"},
    {"pos", "position", "positional"},
    {"tok", "token", "tokens"},
    {"in", "input", "inp"},
)
_SYNONYM_OF: dict[str, frozenset[int]] = {}
for _i, _group in enumerate(_SYNONYMS):
    for _word in _group:
        _SYNONYM_OF[_word] = _SYNONYM_OF.get(_word, frozenset()) | {_i}
# Token pairs compared in one structural group before the names are treated as silent.
_MAX_NAME_PAIRS = 250_000


def _tokens(segment: str) -> tuple[str, ...]:
    return tuple(t.lower() for t in _TOKEN.findall(segment))


def _subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(ch in it for ch in short)


def _token_similarity(a: str, b: str) -> float:
    """How plausibly two name tokens mean the same thing: 1 equal, 0.9 synonyms, 0.8/0.7 a prefix
    ("enc"/"encoder", "q"/"query"), 0.6 an abbreviation ("attn"/"attention"), else 0."""
    if a == b:
        return 1.0
    if a.isdigit() or b.isdigit():
        return 0.0
    if _SYNONYM_OF.get(a, frozenset()) & _SYNONYM_OF.get(b, frozenset()):
        return 0.9
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    if long.startswith(short):
        return 0.7 if len(short) == 1 else 0.8
    if len(short) >= 2 and short[0] == long[0] and _subsequence(short, long):
        return 0.6
    return 0.0


def _segment_similarity(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """Greedy one-to-one matching of two segments' name tokens."""
    scored = []
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            v = _token_similarity(x, y)
            if v > 0:
                scored.append((-v, i, j))
    scored.sort()
    used_a, used_b, total = set(), set(), 0.0
    for v, i, j in scored:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            total -= v
    return total


def _path_similarity(a: tuple[tuple[str, ...], ...], b: tuple[tuple[str, ...], ...]) -> float:
    """Best monotone alignment of two module paths' segments (the sum of segment similarities)."""
    n, m = len(a), len(b)
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best[i][j] = max(best[i - 1][j], best[i][j - 1],
                             best[i - 1][j - 1] + _segment_similarity(a[i - 1], b[j - 1]))
    return best[n][m]


def numbered_in_order(modules: Sequence[str]) -> bool:
    """Every module carries numbers and they strictly increase in the given order."""
    nums = [tuple(numbers(m)) for m in modules]
    return all(nums) and all(x < y for x, y in zip(nums, nums[1:]))


class Evidence:
    """What the names say about one group of same-signature modules.

    ``determined`` holds the pairs the names settle directly: each the other's unique best by
    name among the whole group (never by elimination: a pair left over once the others are
    taken is only as sure as the order that places it). ``rest_s`` / ``rest_t`` are what the
    names leave open; ``silent`` tells whether the names say nothing about those (each source
    name equally like every open target name).
    """

    def __init__(self, s_mods: Sequence[str], t_mods: Sequence[str]):
        s_nums = {m: tuple(numbers(m)) for m in s_mods}
        t_nums = {m: tuple(numbers(m)) for m in t_mods}
        # Digits are names only where both sides are numbered alike (the same numbers,
        # perhaps in another order); an nn.Sequential counts its activations, named layers don't.
        digits = sorted(s_nums.values()) == sorted(t_nums.values()) and any(s_nums.values())
        self.all_s, self.all_t = list(s_mods), list(t_mods)
        self.determined: dict[str, str] = {}
        self.rest_s, self.rest_t = list(s_mods), list(t_mods)
        self.w: dict[tuple[str, str], float] = {}
        self.silent = True
        if len(s_mods) * len(t_mods) > _MAX_NAME_PAIRS:
            self.silent = False  # too many to compare: the names neither settle nor allow anything
            return
        s_alpha = {m: _alpha_path(m) for m in s_mods}
        t_alpha = {m: _alpha_path(m) for m in t_mods}
        cache: dict[tuple, float] = {}
        w = self.w
        for sm in s_mods:
            for tm in t_mods:
                key = (s_alpha[sm], t_alpha[tm])
                v = cache.get(key)
                if v is None:
                    v = cache[key] = round(_path_similarity(*key), 6)
                w[(sm, tm)] = v + (_common_prefix(s_nums[sm], t_nums[tm]) if digits else 0)
        row = {sm: _unique_best([(w[(sm, tm)], tm) for tm in t_mods]) for sm in s_mods}
        col = {tm: _unique_best([(w[(sm, tm)], sm) for sm in s_mods]) for tm in t_mods}
        self.determined = {sm: tm for sm, tm in row.items() if tm is not None and col.get(tm) == sm}
        taken = set(self.determined.values())
        self.rest_s = [m for m in s_mods if m not in self.determined]
        self.rest_t = [m for m in t_mods if m not in taken]
        self.silent = all(len({w[(sm, tm)] for tm in self.rest_t}) <= 1 for sm in self.rest_s)

    @property
    def complete(self) -> bool:
        """The names pair every module of the group, on both sides."""
        return not self.rest_s and not self.rest_t

    def guess(self, order: Mapping[str, str] | None) -> dict[str, str]:
        """The settled pairs, completed by ``order`` where the names do not prefer another, then by
        name (best first): a suggestion, not a load."""
        out = dict(self.determined)
        rest_s, rest_t = list(self.rest_s), list(self.rest_t)
        w = self.w
        if order:
            for sm in list(rest_s):
                tm = order.get(sm)
                if tm in rest_t and all(w.get((sm, x), 0) <= w.get((sm, tm), 0) for x in rest_t):
                    out[sm] = tm
                    rest_s.remove(sm)
                    rest_t.remove(tm)
        for sm in rest_s:
            if not rest_t:
                break
            tm = max(rest_t, key=lambda t: w.get((sm, t), 0))
            out[sm] = tm
            rest_t.remove(tm)
        return out


def _unique_best(scored: Sequence[tuple[float, str]]) -> str | None:
    """The one with the highest positive score, or None when it is shared or zero."""
    best, second, arg = -1.0, -1.0, None
    for v, x in scored:
        if v > best:
            best, second, arg = v, best, x
        elif v > second:
            second = v
    return arg if best > 0 and best > second else None


def _alpha_path(module: str) -> tuple[tuple[str, ...], ...]:
    """A module path's name tokens, segment by segment, without its numbers."""
    segs = (tuple(t for t in _tokens(seg) if not t.isdigit()) for seg in module.split("."))
    return tuple(seg for seg in segs if seg)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
