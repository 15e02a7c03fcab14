"""The matcher: which checkpoint tensor goes into which model tensor, and why.

:func:`match` is pure: it sees names, shapes and dtypes (:class:`~ckptfit.plan.TensorSpec`),
never tensor data, and returns a :class:`~ckptfit.plan.Plan` with one decision per model
tensor. It runs in stages, each of which only looks at what the earlier ones left:

1. **rule**: the user's ``rename=`` regexes rewrite checkpoint keys; ``include=`` /
   ``exclude=`` globs restrict what is loaded.
2. **exact**: same name.
3. **prefix**: leading segments stripped, added or replaced (``module.``, ``_orig_mod.``,
   ``backbone.body.`` ...), learned from the two key sets, never taken from a fixed list.
4. **structural**: old key styles (``norm.1`` vs ``norm1``) and modules whose names differ
   entirely. Roles and shapes are constraints; names (``q`` ~ ``query``, ``down`` ~
   ``downsample``) and declaration order are evidence. Look-alike modules are paired by name
   where the names settle it, by order only where the names do not contradict it, and
   otherwise refused with the ``rename=`` that would load them; each decision says which
   evidence carried it (``Decision.evidence``).
5. **shapes / dtypes**: a tensor of another shape or another dtype kind is never loaded.
6. **harmless**: ``num_batches_tracked``, tied weights, optional keys.
7. **strictness**: whatever is left is ``missing`` (a problem) or, under ``partial=True``,
   kept at its init.

The guiding rule is that a wrong mapping is worse than none: where two explanations fit
equally well, nothing is loaded through either and a ``rename=`` suggestion is given.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch

from .plan import Decision, Plan, Stage, TensorSpec, Unused

__all__ = ["match"]

_NBT = "num_batches_tracked"

# A suffix shared with more model keys than this identifies nothing ("weight", "0.bias").
_MAX_SUFFIX_FANOUT = 8
# Learned prefix transforms per plan; real checkpoints need one to three.
_MAX_PREFIX_ROUNDS = 64
# Tied candidates checked against each other in one round (the rest wait for the next).
_MAX_TIED_CANDIDATES = 1000
# Distinct-signature pairs compared in the structural stage before it gives up.
_MAX_SIGNATURE_PAIRS = 4_000_000
# How many modules a structural suggestion names before folding the rest into a count.
_MAX_LISTED = 3

# A dot between a segment that ends in a non-digit and an all-digit segment: the dot that
# old key styles have and new ones dropped ("norm.1.weight" vs "norm1.weight").
_JOIN_DOT = re.compile(r"(?<=[^\d.])\.(?=\d+(?:\.|$))")

# First segments and segments that mark a checkpoint tensor as training state, not weights.
_EMA_HEADS = frozenset({"ema", "model_ema", "ema_model", "module_ema", "averaged_model", "swa_model"})
_OPTIM_HEADS = frozenset({"optimizer", "optim", "optimizer_states", "scheduler", "lr_scheduler"})
_OPTIM_SEGMENTS = frozenset({"exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq"})

_SHORT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

_PARTIAL_SHAPES = "pass partial=True to keep these layers at their init"
_PARTIAL_MISSING = "pass partial=True to keep the missing tensors at their init"

Pair = tuple[int, int]


def match(
    target: Sequence[TensorSpec],
    source: Sequence[TensorSpec],
    *,
    partial: bool = False,
    rename: Sequence[tuple[str, str]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    tied: Mapping[str, str] | None = None,
    optional: Collection[str] = (),
) -> Plan:
    """Decide, from names, shapes and dtypes alone, which checkpoint tensor fills which model tensor.

    Args:
        target: the model's state-dict entries, in state-dict order.
        source: the checkpoint's entries, in file order.
        partial: keep model tensors the checkpoint lacks (or has in another shape) at
            their init instead of failing.
        rename: ``(regex, replacement)`` rules applied in order to every checkpoint key,
            each at most once per key (``re.sub(regex, replacement, key, count=1)``).
        include: glob patterns (``fnmatch``); when given and non-empty, only model tensors
            whose key, or whose checkpoint key, matches one of them are loaded.
        exclude: glob patterns; model tensors whose key or checkpoint key matches one are
            kept at their init, and checkpoint keys matching one take no part in matching.
        tied: ``{tied_key: canonical_key}`` for model tensors that share storage; only the
            non-canonical keys appear as keys.
        optional: model keys that may stay at their init harmlessly (e.g. non-essential
            buffers). ``*.num_batches_tracked`` is always treated so.

    Returns:
        A :class:`~ckptfit.plan.Plan` with exactly one decision per target key, in target
        order; ``plan.problems`` is non-empty when the load must fail.

    Raises:
        ValueError: a ``rename`` rule is not a valid regex or replacement, or a key occurs
            twice in ``target`` or ``source``.

    Example:
        >>> import torch
        >>> from ckptfit.plan import TensorSpec
        >>> model = [TensorSpec("fc.weight", (10, 4), torch.float32)]
        >>> ckpt = [TensorSpec("module.fc.weight", (10, 4), torch.float16)]
        >>> plan = match(model, ckpt)
        >>> plan.mapping(), plan.transforms
        ({'fc.weight': 'module.fc.weight'}, ("strip 'module.'",))
    """
    matcher = _Matcher(target, source, partial=partial, include=include, exclude=exclude,
                       tied=tied, optional=optional)
    matcher.apply_rules(rename)
    matcher.stage_exact()
    matcher.stage_prefixes()
    matcher.stage_joined_digits()
    matcher.stage_structural()
    return matcher.build_plan()


# --------------------------------------------------------------------------------------
# small helpers


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return _SHORT_DTYPES.get(dtype) or str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _describe(a: str, b: str) -> str:
    if not b:
        return f"strip '{a}'"
    if not a:
        return f"add '{b}'"
    return f"replace '{a}' with '{b}'"


_EMA_WORDS = ("ema", "shadow", "average", "swa", "polyak")


def _is_ema_prefix(prefix: str) -> bool:
    return any(w in seg.lower() for seg in prefix.split(".") if seg for w in _EMA_WORDS)


def _model_over_ema(conflicting: list[tuple[str, str]]) -> tuple[str, str] | None:
    """Of transforms that fit equally well, the one stripping a plain prefix when every other strips
    an EMA-named one (``model.`` vs ``model_ema.``); None when that does not settle it."""
    plain = [c for c in conflicting if not _is_ema_prefix(c[0])]
    if len(conflicting) >= 2 and len(plain) == 1 and plain[0][1] == "":
        return plain[0]
    return None


def _rule_for(a: str, b: str) -> str:
    return f"rename=[(r'^{re.escape(a)}', '{b}')]"


def _natural_key(name: str) -> tuple:
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _numbers(name: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", name)]


def _fold(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _compatible(x: tuple, y: tuple) -> bool:
    """Whether two module signatures could describe the same module, one possibly damaged.

    True when one role set contains the other and every shared role has the same shape and
    dtype kind.
    """
    dx = {role: rest for role, *rest in x}
    dy = {role: rest for role, *rest in y}
    small, big = (dx, dy) if len(dx) <= len(dy) else (dy, dx)
    return bool(small) and all(role in big and big[role] == rest for role, rest in small.items())


# --------------------------------------------------------------------------------------
# name evidence for the structural stage
#
# Module names are evidence, declaration order is evidence, roles and shapes are constraints.
# Two module paths are compared segment by segment (a monotone alignment, so that
# "layers.3.attn.q" and "blocks.3.q_proj" line up), each segment split into tokens on "_",
# digits and camelCase. Tokens count when they are equal, synonyms ({fc, head, classifier}),
# one the prefix of the other ("q"/"query", "enc"/"encoder", "down"/"downsample") or an
# abbreviation of it ("attn"/"attention"). Digits count only where both sides are numbered
# alike (see _Evidence): "0", "2", "4" of an nn.Sequential are not "fc0", "fc1", "fc2".

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


def _numbered_in_order(modules: Sequence[str]) -> bool:
    """Every module carries numbers and they strictly increase in the given order."""
    nums = [tuple(_numbers(m)) for m in modules]
    return all(nums) and all(x < y for x, y in zip(nums, nums[1:]))


class _Evidence:
    """What the names say about one group of same-signature modules.

    ``determined`` holds the pairs the names settle directly: each the other's unique best by
    name among the whole group (never by elimination: a pair left over once the others are
    taken is only as sure as the order that places it). ``rest_s`` / ``rest_t`` are what the
    names leave open; ``silent`` tells whether the names say nothing about those (each source
    name equally like every open target name).
    """

    def __init__(self, s_mods: Sequence[str], t_mods: Sequence[str]):
        s_nums = {m: tuple(_numbers(m)) for m in s_mods}
        t_nums = {m: tuple(_numbers(m)) for m in t_mods}
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


# --------------------------------------------------------------------------------------
# the matcher


class _Matcher:
    """State of one :func:`match` call: who is paired with whom, and by which stage."""

    def __init__(self, target: Sequence[TensorSpec], source: Sequence[TensorSpec], *, partial: bool,
                 include: Sequence[str] | None, exclude: Sequence[str] | None,
                 tied: Mapping[str, str] | None, optional: Collection[str]):
        self.t_name = [t.name for t in target]
        self.t_shape = [t.shape for t in target]
        self.t_dtype = [t.dtype for t in target]
        self.s_name = [s.name for s in source]
        self.s_shape = [s.shape for s in source]
        self.s_dtype = [s.dtype for s in source]
        self.t_index = self._index(self.t_name, "model")
        self.s_index = self._index(self.s_name, "checkpoint")
        self.partial = bool(partial)
        self.include = [str(p) for p in include] if include else None
        self.exclude = [str(p) for p in exclude] if exclude else []
        self.optional = frozenset(optional)

        nt, ns = len(self.t_name), len(self.s_name)
        self.t2s: list[int | None] = [None] * nt
        self.s2t: list[int | None] = [None] * ns
        self.how: list[tuple[Stage, str] | None] = [None] * nt
        self.evidence: list[str | None] = [None] * nt  # what carried a structural decision
        self.work = list(self.s_name)  # checkpoint key after the user's rename rules
        self.rule: list[str | None] = [None] * ns
        self.s_excluded = [False] * ns
        self.locked_s: set[int] = set()  # left out of the prefix stage as ambiguous
        self.locked_t: set[int] = set()
        self.s_note: dict[int, str] = {}
        self.t_note: dict[str, tuple[str, str]] = {}  # model module -> why nothing was aligned (reason, problem)
        self.explained_s: set[str] = set()  # checkpoint modules a structural suggestion already names
        self.applied: list[tuple[str, str]] = []  # learned prefix transforms, in order
        self.transforms: list[str] = []
        self.suggestions: list[str] = []
        self.warnings: list[str] = []

        self.tied: dict[int, int] = {}  # tied target index -> canonical target index
        for key, canonical in (tied or {}).items():
            ti, ci = self.t_index.get(key), self.t_index.get(canonical)
            if ti is None or ci is None or ti == ci:
                self.warnings.append(f"tie '{key}' -> '{canonical}' ignored: not two distinct model keys")
            else:
                self.tied[ti] = ci

        # A file whose keys are sorted (safetensors does that) has lost its module order.
        self.source_sorted = ns >= 3 and all(a <= b for a, b in zip(self.s_name, self.s_name[1:]))

    @staticmethod
    def _index(names: list[str], what: str) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in index:
                raise ValueError(f"{what} key '{name}' occurs twice; keys must be unique")
            index[name] = i
        return index

    # -- bookkeeping -------------------------------------------------------------------

    def assign(self, ti: int, si: int, stage: Stage, how: str, evidence: str | None = None) -> None:
        self.t2s[ti] = si
        self.s2t[si] = ti
        self.how[ti] = (stage, how)
        self.evidence[ti] = evidence

    def in_pool(self, si: int) -> bool:
        return self.s2t[si] is None and not self.s_excluded[si]

    def stage_of(self, si: int, stage: Stage) -> Stage:
        return "rule" if self.rule[si] is not None else stage

    def via(self, si: int, what: str) -> str:
        steps = [self.rule[si]] if self.rule[si] else []
        if what:
            steps.append(what)
        return f"from '{self.s_name[si]}'" + (f" ({', then '.join(steps)})" if steps else "")

    @staticmethod
    def matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
        return any(fnmatchcase(n, p) for p in patterns for n in names)

    # -- stage 1: user rules -----------------------------------------------------------

    def apply_rules(self, rename: Sequence[tuple[str, str]] | None) -> None:
        rules = []
        for item in rename or ():
            try:
                pattern, replacement = item
                rules.append((re.compile(pattern), replacement, f"rename r'{pattern}' -> '{replacement}'"))
            except (TypeError, ValueError, re.error) as e:
                raise ValueError(f"rename rule {item!r} is not a (regex, replacement) pair: {e}") from e
        hits = [0] * len(rules)
        for si, name in enumerate(self.s_name):
            work, used = name, []
            for k, (rx, replacement, desc) in enumerate(rules):
                try:
                    new = rx.sub(replacement, work, count=1)
                except (re.error, IndexError) as e:
                    raise ValueError(f"{desc}: invalid replacement: {e}") from e
                if new != work:
                    hits[k] += 1
                    used.append(desc)
                    work = new
            if used:
                self.work[si] = work
                self.rule[si] = ", then ".join(used)
        for (_, _, desc), n in zip(rules, hits):
            if n:
                self.transforms.append(desc)
            else:
                self.warnings.append(f"{desc} matched no checkpoint key")
        if self.exclude:
            for si in range(len(self.s_name)):
                self.s_excluded[si] = self.matches(self.exclude, (self.s_name[si], self.work[si]))

    # -- stage 2: exact ----------------------------------------------------------------

    def stage_exact(self) -> None:
        best: dict[str, int] = {}
        collided = 0
        for si, work in enumerate(self.work):
            if self.s_excluded[si]:
                continue
            cur = best.get(work)
            if cur is None:
                best[work] = si
            else:
                collided += 1
                if self.rule[cur] is None and self.rule[si] is not None:
                    best[work] = si  # the user asked for this one (e.g. EMA weights over raw ones)
        if collided:
            self.warnings.append(f"{collided} checkpoint keys share a name with another after the rename rules; "
                                 "the renamed ones were used")
        for ti, name in enumerate(self.t_name):
            si = best.get(name)
            if si is not None:
                if self.rule[si] is None:
                    self.assign(ti, si, "exact", "same name")
                else:
                    self.assign(ti, si, "rule", self.via(si, ""))

    # -- stage 3: learned prefixes -----------------------------------------------------

    def stage_prefixes(self) -> None:
        banned: set[tuple[str, str]] = set()
        for _ in range(_MAX_PREFIX_ROUNDS):
            free_t = {self.t_name[ti]: ti for ti in range(len(self.t_name))
                      if self.t2s[ti] is None and ti not in self.locked_t}
            pool = [si for si in range(len(self.s_name)) if self.in_pool(si) and si not in self.locked_s]
            if not free_t or not pool:
                return
            # every free model key under each of its segment suffixes: suffix -> [(prefix, index)]
            by_suffix: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for name, ti in free_t.items():
                by_suffix[name].append(("", ti))
                pos = name.find(".")
                while pos != -1:
                    by_suffix[name[pos + 1:]].append((name[:pos + 1], ti))
                    pos = name.find(".", pos + 1)
            under: dict[str, list[int]] = defaultdict(list)
            # (A, B) -> [same-shape pairs, name-only pairs, first seen]
            support: dict[tuple[str, str], list[int]] = {}
            for si in pool:
                work = self.work[si]
                splits = [("", work)]
                under[""].append(si)
                pos = work.find(".")
                while pos != -1:
                    prefix = work[:pos + 1]
                    splits.append((prefix, work[pos + 1:]))
                    under[prefix].append(si)
                    pos = work.find(".", pos + 1)
                if not self.s_shape[si] or _leaf(work) == _NBT:
                    continue  # a scalar has the shape of every other scalar: no evidence
                # Only the longest suffix this key shares with some model key is evidence.
                for a, rest in splits:
                    cands = by_suffix.get(rest)
                    if not cands:
                        continue
                    if len(cands) > _MAX_SUFFIX_FANOUT:
                        break
                    multi = "." in rest
                    for b, ti in cands:
                        # a replace needs a shared suffix of two segments or more ("1." -> "bn1."
                        # sharing only "weight" proves nothing)
                        if a == b or (a and b and not multi) or (a, b) in banned:
                            continue
                        same = self.t_shape[ti] == self.s_shape[si]
                        if not same and (a and b):
                            continue  # a replace is only ever supported by equal shapes
                        entry = support.get((a, b))
                        if entry is None:
                            entry = support[(a, b)] = [0, 0, len(support)]
                        entry[0 if same else 1] += 1
                    break
            if not support:
                return
            ranked = sorted(support.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[1][2]))
            if ranked[0][1][0] == 0:
                # Equal shapes are the evidence. Without any, a strip/add still explains the
                # names when every key under it hits (a checkpoint holding only a resized head).
                ranked = [(c, v) for c, v in ranked if v[1] >= 2 and self._covers(c, under, free_t)]
                if not ranked:
                    return
            top = tuple(ranked[0][1][:2])
            group = [c for c, (n, m, _) in ranked if (n, m) == top][:_MAX_TIED_CANDIDATES]
            maps = {c: self._prefix_pairs(c, under, free_t) for c in group}
            bad = self._conflicting(group, maps)
            preferred = _model_over_ema([c for c in group if c in bad])
            if preferred is not None:  # one file holding the model and its EMA copy: the model's own
                for c in bad - {preferred}:
                    banned.add(c)
                    for si, _ti in maps[c]:
                        self.s_note[si] = f"EMA copy beside the model's own weights ({_describe(*preferred)}); " \
                                          f"pick it with use='ema'"
                group = [c for c in group if c == preferred or c not in bad]
                bad = set()
            for c in group:
                if c in bad:
                    banned.add(c)
                    continue
                pairs = self._prefix_pairs(c, under, free_t)
                if not pairs:
                    continue
                desc = _describe(*c)
                for si, ti in pairs:
                    self.assign(ti, si, self.stage_of(si, "prefix"), self.via(si, desc))
                self.applied.append(c)
                self.transforms.append(desc)
            if bad:
                self._refuse_prefixes([c for c in group if c in bad], maps)

    def _prefix_pairs(self, c: tuple[str, str], under: Mapping[str, list[int]],
                      free_t: Mapping[str, int]) -> list[Pair]:
        """What transform ``c`` would do: (source, target) for every free key it names."""
        a, b = c
        pairs = []
        for si in under.get(a, ()):
            if self.s2t[si] is None and si not in self.locked_s:
                ti = free_t.get(b + self.work[si][len(a):])
                if ti is not None and self.t2s[ti] is None:
                    pairs.append((si, ti))
        return pairs

    def _covers(self, c: tuple[str, str], under: Mapping[str, list[int]], free_t: Mapping[str, int]) -> bool:
        """Whether transform ``c`` names a free model key for every checkpoint key under it."""
        keys = [si for si in under.get(c[0], ())
                if self.s2t[si] is None and si not in self.locked_s and _leaf(self.work[si]) != _NBT]
        hit = {si for si, _ in self._prefix_pairs(c, under, free_t)}
        return bool(keys) and all(si in hit for si in keys)

    @staticmethod
    def _conflicting(group: list[tuple[str, str]], maps: Mapping[tuple[str, str], list[Pair]]) -> set:
        """Equally supported transforms that send one key two ways, or two keys one way."""
        by_s: dict[int, tuple[int, tuple[str, str]]] = {}
        by_t: dict[int, tuple[int, tuple[str, str]]] = {}
        bad = set()
        for c in group:
            for si, ti in maps[c]:
                other_t, c2 = by_s.setdefault(si, (ti, c))
                if other_t != ti:
                    bad.update((c, c2))
                other_s, c2 = by_t.setdefault(ti, (si, c))
                if other_s != si:
                    bad.update((c, c2))
        return bad

    def _refuse_prefixes(self, bad: list[tuple[str, str]], maps: Mapping[tuple[str, str], list[Pair]]) -> None:
        descs = [_describe(*c) for c in bad]
        for c in bad:
            for si, ti in maps[c]:
                self.locked_s.add(si)
                self.locked_t.add(ti)
                self.s_note[si] = f"ambiguous: {' or '.join(descs[:2])} fit equally well"
        shown = "; ".join(descs[:_MAX_LISTED]) + (f" (and {len(descs) - _MAX_LISTED} more)"
                                                  if len(descs) > _MAX_LISTED else "")
        self.suggestions.append(f"ambiguous names, nothing loaded through them: {shown} fit equally well; "
                                f"to choose one, pass e.g. {_rule_for(*bad[0])}")

    # -- stage 4a: old key styles ------------------------------------------------------

    def stage_joined_digits(self) -> None:
        t_by: dict[str, list[int]] = defaultdict(list)
        for ti, name in enumerate(self.t_name):
            if self.t2s[ti] is None:
                t_by[_JOIN_DOT.sub("", name)].append(ti)
        s_by: dict[str, list[int]] = defaultdict(list)
        for si, work in enumerate(self.work):
            if self.in_pool(si):
                s_by[_JOIN_DOT.sub("", work)].append(si)
        first, n = None, 0
        for key, sis in s_by.items():
            tis = t_by.get(key, ())
            if len(sis) != 1 or len(tis) != 1:
                continue
            si, ti = sis[0], tis[0]
            if self.s_shape[si] != self.t_shape[ti] or _kind(self.s_dtype[si]) != _kind(self.t_dtype[ti]):
                continue
            first = first or (self.work[si], self.t_name[ti])
            n += 1
            self.assign(ti, si, self.stage_of(si, "structural"), self.via(si, "old key style, digit segment joined"),
                        "name")
        if first:
            self.transforms.append(f"join digit segments of old key styles ('{first[0]}' -> '{first[1]}'"
                                   + (f" and {n - 1} more)" if n > 1 else ")"))

    # -- stage 4b: structural alignment ------------------------------------------------

    def _modules(self, indices: list[int], names: list[str]) -> dict[str, dict[str, int]]:
        mods: dict[str, dict[str, int]] = {}
        for i in indices:
            module, _, role = names[i].rpartition(".")
            mods.setdefault(module, {})[role] = i
        return mods

    def _signature(self, members: Mapping[str, int], shapes: list, dtypes: list) -> tuple:
        return tuple(sorted((role, shapes[i], _kind(dtypes[i])) for role, i in members.items() if role != _NBT))

    def stage_structural(self) -> None:
        """Align leftover modules whose names differ, by roles and shapes (constraints) and by
        their names and declaration order (evidence), only where the evidence agrees.

        Each group of modules with the same roles and shapes is paired by what the names say
        (:class:`_Evidence`). Declaration order is accepted only where the names do not
        contradict it, and among look-alike siblings with names that say nothing only where
        both sides are numbered in that order. What the evidence leaves open is refused with
        the ``rename=`` that would load it.
        """
        t_free = [ti for ti in range(len(self.t_name)) if self.t2s[ti] is None and ti not in self.tied]
        s_free = [si for si in range(len(self.s_name)) if self.in_pool(si)]
        if not t_free or not s_free:
            return
        t_mods = self._modules(t_free, self.t_name)
        s_mods = self._modules(s_free, self.work)
        t_sig = {m: self._signature(v, self.t_shape, self.t_dtype) for m, v in t_mods.items()}
        s_sig = {m: self._signature(v, self.s_shape, self.s_dtype) for m, v in s_mods.items()}
        t_count = Counter(sig for sig in t_sig.values() if sig)
        s_count = Counter(sig for sig in s_sig.values() if sig)
        if len(t_count) * len(s_count) > _MAX_SIGNATURE_PAIRS:
            self.warnings.append("too many distinct leftover modules for a structural alignment; skipped")
            return
        compat_t = {x: [y for y in t_count if _compatible(x, y)] for x in s_count}
        compat_s = {y: [x for x in s_count if _compatible(x, y)] for y in t_count}
        s_list = [m for m, sig in s_sig.items() if sig and compat_t[sig]]
        t_list = [m for m, sig in t_sig.items() if sig and compat_s[sig]]
        if not s_list or not t_list:
            return

        positional_ok = True
        if self.source_sorted:
            # The file's order is alphabetical, not the module order ("10" before "2"). Natural
            # order recovers it only for numbered modules, so both sides must be in natural order
            # and every pair must carry the same numbers ("layers.3.fc" with "blocks.3.proj").
            s_list.sort(key=_natural_key)
            positional_ok = (t_list == sorted(t_list, key=_natural_key) and len(s_list) == len(t_list)
                             and all(_numbers(a) == _numbers(b) for a, b in zip(s_list, t_list)))
        by_order = positional_ok and [s_sig[m] for m in s_list] == [t_sig[m] for m in t_list]
        order = dict(zip(s_list, t_list)) if by_order else None
        groups: dict[tuple, tuple[list[str], list[str]]] = {}
        for m in s_list:
            groups.setdefault(s_sig[m], ([], []))[0].append(m)
        for m in t_list:
            groups.setdefault(t_sig[m], ([], []))[1].append(m)

        pairs: list[tuple[str, str, str, str]] = []  # (checkpoint module, model module, evidence, note)
        if not by_order:
            s_only = {s_sig[m]: m for m in s_list if s_count[s_sig[m]] == 1}
            unique = []
            for tm in t_list:
                sig = t_sig[tm]
                sm = s_only.get(sig)
                if (sm is not None and t_count[sig] == 1
                        and sum(t_count[y] for y in compat_t[sig]) == 1
                        and sum(s_count[x] for x in compat_s[sig]) == 1):
                    unique.append((sm, tm))
            if unique and not self.source_sorted:
                unique = self._monotone(unique, {m: i for i, m in enumerate(s_mods)})
            pairs += [(sm, tm, "unique signature", "") for sm, tm in unique]
        for s_group, t_group in groups.values():
            if not s_group or not t_group:
                continue
            if len(s_group) == 1 and len(t_group) == 1:
                if by_order:
                    pairs.append((s_group[0], t_group[0], "unique signature", ""))
                continue  # otherwise settled (or not) above, with the roles that may be missing
            pairs += self._resolve_group(s_group, t_group, order, s_mods)

        for sm, tm, evidence, note in pairs:
            why = f"module '{sm}' aligned with '{tm}' by {evidence}{note} (same roles and shapes)"
            for role, ti in t_mods[tm].items():
                si = s_mods[sm].get(role)
                if si is not None:
                    self.assign(ti, si, self.stage_of(si, "structural"), self.via(si, why), evidence)
        if pairs:
            counts = Counter(evidence for _, _, evidence, _ in pairs)
            if len(counts) == 1:
                self.transforms.append(f"structural alignment of {len(pairs)} modules by {next(iter(counts))}")
            else:
                parts = ", ".join(f"{n} by {evidence}" for evidence, n in counts.items())
                self.transforms.append(f"structural alignment of {len(pairs)} modules ({parts})")
        self._suggest_structural()

    def _resolve_group(self, s_group: list[str], t_group: list[str], order: Mapping[str, str] | None,
                       s_mods: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str, str, str]]:
        """Pairs for modules that share roles and shapes with siblings: what names and order agree on.

        Names that pair the whole group are followed, against the declaration order if need be.
        Otherwise order is taken where the names do not contradict it: for the one module left
        once the names placed the others, or for siblings whose names say nothing and which both
        sides number in that order. Whatever is left is refused, with the rename that loads it.
        """
        ev = _Evidence(s_group, t_group)
        settled = ev.determined
        if order is None:
            if ev.complete:
                return [(sm, tm, "name", "") for sm, tm in settled.items()]
            self._refuse_group(ev, None, s_mods, "their names do not settle which is which" if not ev.silent
                               else "neither their names nor their order tell them apart", whole=True)
            return []
        agree = all(order[sm] == tm for sm, tm in settled.items())
        if not agree:
            if ev.complete:
                return [(sm, tm, "name", ", not declaration order") for sm, tm in settled.items()]
            self._refuse_group(ev, order, s_mods, "their names and their declaration order disagree, "
                                                  "and the names do not settle it", whole=True)
            return []
        out = [(sm, tm, "name and order", "") for sm, tm in settled.items()]
        if ev.complete:
            return out
        rest_t = [order[sm] for sm in ev.rest_s]
        if len(ev.rest_s) == 1 and settled:
            out.append((ev.rest_s[0], rest_t[0], "order", ", the one left once the names placed the others"))
        elif ev.silent and _numbered_in_order(ev.rest_s) and _numbered_in_order(rest_t):
            out += [(sm, order[sm], "order", ", numbered alike") for sm in ev.rest_s]
        elif ev.silent:
            self._refuse_group(ev, order, s_mods, "only their declaration order tells them apart, "
                                                  "and their names do not confirm it")
        else:
            self._refuse_group(ev, order, s_mods, "their names do not settle which is which")
        return out

    def _refuse_group(self, ev: _Evidence, order: Mapping[str, str] | None,
                      s_mods: Mapping[str, Mapping[str, int]], why: str, whole: bool = False) -> None:
        """Load nothing through the modules the evidence leaves open (``whole``: the whole group);
        suggest the rename that would."""
        rest_s, rest_t = (ev.all_s, ev.all_t) if whole else (ev.rest_s, ev.rest_t)
        guess = {sm: tm for sm, tm in ev.guess(order).items() if sm in rest_s}
        self.explained_s.update(rest_s)
        what = (f"checkpoint module{'s' if len(rest_s) > 1 else ''} {_fold(rest_s)} and model "
                f"module{'s' if len(rest_t) > 1 else ''} {_fold(rest_t)} have the same roles and shapes, but {why}")
        for sm in rest_s:
            for si in s_mods[sm].values():
                self.s_note[si] = f"ambiguous: {what}"
        for tm in rest_t:
            self.t_note[tm] = (f"ambiguous: {what}; nothing loaded through them",
                               f"ambiguous: checkpoint module{'s' if len(rest_s) > 1 else ''} {_fold(rest_s)} "
                               f"could fill it, but nothing tells which (see the suggestion)")
        options = [guess]
        by_order = {sm: order[sm] for sm in rest_s} if order else {}
        if by_order and set(by_order.values()) == set(rest_t) and by_order != guess:
            options.append(by_order)  # the names lean one way, the order the other: offer both
        offers: list[str] = []
        cli_offers: list[str] = []  # the same rules as the CLI takes them
        for option, label in zip(options, ("", "by declaration order: ")):
            rules = self._rename_rules(option, s_mods)
            if rules is None:
                continue
            pairs = sorted(option.items(), key=lambda p: rest_s.index(p[0]))
            told = ", ".join(f"'{sm}' is '{tm}'" for sm, tm in pairs[:_MAX_LISTED])
            told += f" and {len(pairs) - _MAX_LISTED} more" if len(pairs) > _MAX_LISTED else ""
            listed = ", ".join(f"(r'{pattern}', {'r' if chr(92) in replacement else ''}'{replacement}')"
                               for pattern, replacement in rules)
            offers.append(f"{'or, ' if label else 'if '}{label}{'if ' if label else ''}{told}, pass rename=[{listed}]")
            if all("'" not in part for rule in rules for part in rule):
                cli_offers.append(f"{label}" + " ".join(f"--rename '{pattern}=>{replacement}'"
                                                          for pattern, replacement in rules))
        if not offers:
            self.suggestions.append(f"{what}; nothing was loaded through them; rename the checkpoint's "
                                    f"modules to the model's with rename=")
            return
        self.suggestions.append(f"{what}; nothing was loaded through them; " + "; ".join(offers))
        if cli_offers:
            self.suggestions.append("on the command line: " + "; or ".join(cli_offers))

    def _rename_rules(self, guess: Mapping[str, str],
                      s_mods: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str]] | None:
        """``rename=`` rules that send each checkpoint module of ``guess`` to its model module, or None.

        Numbered modules renamed alike become one rule (``layers.(\\d+).wq`` -> ``layers.\\1.q_proj``)
        where it names no other module; a rule names the module's own tensors only when other keys
        start with the same path; and the rules are ordered so that none rewrites what another
        produced (None for a cycle, which rules applied in turn cannot express).
        """
        modules = {w.rpartition(".")[0] for w in self.work}
        parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}

        def pattern(body: str, mods: Sequence[str]) -> str:
            nested = any(m in parents for m in mods)
            return "^" + body + r"\." + (r"(?=[^.]+$)" if nested else "")

        by_template: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        single: list[tuple[str, str]] = []
        for sm, tm in guess.items():
            if _numbers(sm) and _numbers(sm) == _numbers(tm):
                by_template[(re.sub(r"\d+", "#", sm), re.sub(r"\d+", "#", tm))].append((sm, tm))
            else:
                single.append((sm, tm))
        rules: list[tuple[str, str, list[str]]] = []  # (pattern, replacement, outputs)
        for (s_tmpl, t_tmpl), pairs in by_template.items():
            parts = [re.escape(x) for x in s_tmpl.split("#")]
            body = r"(\d+)".join(parts)
            rx = re.compile("^" + body + "$")
            covered = {sm for sm, _ in pairs}
            if len(pairs) < 2 or any(rx.match(m) and m not in covered for m in modules):
                single += pairs
                continue
            t_parts = t_tmpl.split("#")
            replacement = "".join(p + (f"\\g<{i + 1}>" if i < len(t_parts) - 1 else "")
                                  for i, p in enumerate(t_parts)) + "."
            rules.append((pattern(body, list(covered)), replacement, [tm for _, tm in pairs]))
        for sm, tm in single:
            rules.append((pattern(re.escape(sm), [sm]), tm + ".", [tm]))
        # a rule whose output another rule's pattern matches must run after that one
        compiled = [re.compile(r[0]) for r in rules]
        after = {i: {j for j in range(len(rules)) if j != i
                     and any(compiled[j].match(out + ".weight") for out in rules[i][2])} for i in range(len(rules))}
        ordered: list[int] = []
        while after:
            ready = [i for i, deps in after.items() if not deps - set(ordered)]
            if not ready:
                return None
            for i in ready:
                ordered.append(i)
                del after[i]
        return [(rules[i][0], rules[i][1]) for i in ordered]

    @staticmethod
    def _monotone(pairs: list[tuple[str, str]], s_pos: Mapping[str, int]) -> list[tuple[str, str]]:
        """Keep the pairs (in target order) that no other pair crosses in checkpoint order."""
        pos = [s_pos[sm] for sm, _ in pairs]
        prefix_max, best = [], -1
        for p in pos:
            prefix_max.append(best)
            best = max(best, p)
        suffix_min, best = [0] * len(pos), len(s_pos)
        for i in range(len(pos) - 1, -1, -1):
            suffix_min[i] = best
            best = min(best, pos[i])
        return [pair for pair, p, lo, hi in zip(pairs, pos, prefix_max, suffix_min) if lo < p < hi]

    def _suggest_structural(self) -> None:
        t_free = [ti for ti in range(len(self.t_name)) if self.t2s[ti] is None and ti not in self.tied]
        s_free = [si for si in range(len(self.s_name)) if self.in_pool(si)]
        t_mods = self._modules(t_free, self.t_name)
        s_mods = self._modules(s_free, self.work)
        by_sig: dict[tuple, list[str]] = defaultdict(list)
        for tm, members in t_mods.items():
            sig = self._signature(members, self.t_shape, self.t_dtype)
            if sig:
                by_sig[sig].append(tm)
        found = []
        for sm, members in s_mods.items():
            if sm in self.explained_s or all(si in self.locked_s for si in members.values()):
                continue  # already explained by an ambiguous prefix or structural suggestion
            fits = by_sig.get(self._signature(members, self.s_shape, self.s_dtype))
            if sm and fits:
                found.append((sm, fits))
        for sm, fits in found[:_MAX_LISTED]:
            self.suggestions.append(
                f"checkpoint module '{sm}' has the roles and shapes of model "
                f"module{'s' if len(fits) > 1 else ''} {_fold(fits)} but could "
                f"not be aligned without guessing; if it is '{fits[0]}', pass "
                f"rename=[(r'^{re.escape(sm)}\\.', '{fits[0]}.')]")
        if len(found) > _MAX_LISTED:
            self.suggestions.append(f"{len(found) - _MAX_LISTED} more checkpoint modules fit model modules "
                                    "by shape but were not aligned without a rename rule")

    # -- stages 5-7: decisions ---------------------------------------------------------

    def _excluded(self, ti: int, si: int | None) -> str | None:
        if not self.exclude and self.include is None:
            return None
        names = [self.t_name[ti]]
        if si is not None:
            names += [self.s_name[si], self.work[si]]
        if self.exclude and self.matches(self.exclude, names):
            return f"excluded by exclude={self.exclude!r}"
        if self.include is not None and not self.matches(self.include, names):
            return f"not matched by include={self.include!r}"
        return None

    def _excluded_sources(self) -> dict[str, int]:
        """Names the excluded checkpoint keys would have filled: model key -> checkpoint index."""
        names: dict[str, int] = {}
        for si in range(len(self.s_name)):
            if not self.s_excluded[si]:
                continue
            work = self.work[si]
            names.setdefault(work, si)
            for a, b in self.applied:
                if work.startswith(a) and len(work) > len(a):
                    names.setdefault(b + work[len(a):], si)
        return names

    def build_plan(self) -> Plan:
        nt = len(self.t_name)
        decisions: list[Decision | None] = [None] * nt
        problems: list[str] = []
        unused_reason: dict[int, str] = {}
        casts: Counter[tuple[str, str]] = Counter()
        shape_problem = missing_problem = False
        excluded_by_name = self._excluded_sources()

        def decide(ti: int, action, stage: Stage, reason: str, si: int | None = None, tied_to: str | None = None):
            decisions[ti] = Decision(
                target=self.t_name[ti], action=action, source=None if si is None else self.s_name[si],
                stage=stage, reason=reason, target_shape=self.t_shape[ti],
                source_shape=None if si is None else self.s_shape[si], target_dtype=self.t_dtype[ti],
                source_dtype=None if si is None else self.s_dtype[si], tied_to=tied_to,
                evidence=self.evidence[ti] if si is not None and si == self.t2s[ti] else None)

        def harmless(ti: int) -> str | None:
            if _leaf(self.t_name[ti]) == _NBT:
                return "num_batches_tracked"
            if self.t_name[ti] in self.optional:
                return "optional"
            return None

        # Pass 1: everything a checkpoint tensor was paired with, plus user exclusions.
        for ti in range(nt):
            si = self.t2s[ti]
            excluded = self._excluded(ti, si)
            if excluded is None and si is None and self.t_name[ti] in excluded_by_name:
                si_ex = excluded_by_name[self.t_name[ti]]
                excluded = f"checkpoint key '{self.s_name[si_ex]}' excluded by exclude={self.exclude!r}"
            if excluded is not None:
                decide(ti, "keep", "user", f"{excluded}; kept at init", si)
                if si is not None:
                    unused_reason[si] = "excluded by rule"
                continue
            if si is None:
                continue
            stage, how = self.how[ti]
            t, s = self.t_name[ti], self.s_name[si]
            tshape, sshape = self.t_shape[ti], self.s_shape[si]
            tdt, sdt = self.t_dtype[ti], self.s_dtype[si]
            if tshape != sshape:
                unused_reason[si] = f"shape differs from '{t}' ({_fmt_shape(sshape)} vs {_fmt_shape(tshape)})"
                diff = f"{how}, but checkpoint has {_fmt_shape(sshape)}, model has {_fmt_shape(tshape)}"
                kind = harmless(ti)
                if kind:
                    decide(ti, "keep", "harmless", f"{diff}; {kind}, kept at init", si)
                elif self.partial:
                    decide(ti, "skip_shape", stage, f"{diff}; not loaded, kept at init (partial=True)", si)
                else:
                    decide(ti, "skip_shape", stage, f"{diff}; not loaded", si)
                    where = f" (as '{s}')" if s != t else ""
                    problems.append(f"{t}: checkpoint has {_fmt_shape(sshape)}{where}, model has {_fmt_shape(tshape)}")
                    shape_problem = True
                continue
            if _kind(tdt) != _kind(sdt):
                unused_reason[si] = f"dtype differs from '{t}' ({_dtype_name(sdt)} vs {_dtype_name(tdt)})"
                diff = (f"{how}, but checkpoint has {_dtype_name(sdt)}, model has {_dtype_name(tdt)} "
                        f"({_kind(sdt)} to {_kind(tdt)} is not a cast)")
                kind = harmless(ti)
                if kind or self.partial:
                    self.warnings.append(f"{t}: checkpoint '{s}' is {_dtype_name(sdt)}, model has "
                                         f"{_dtype_name(tdt)}; kept at init")
                    if kind:
                        decide(ti, "keep", "harmless", f"{diff}; {kind}, kept at init", si)
                    else:
                        decide(ti, "keep", "none", f"{diff}; kept at init (partial=True)", si)
                else:
                    decide(ti, "missing", stage, f"{diff}; not loaded", si)
                    problems.append(f"{t}: checkpoint has {_dtype_name(sdt)} (as '{s}'), model has "
                                    f"{_dtype_name(tdt)}; {_kind(sdt)} to {_kind(tdt)} is not a cast")
                continue
            reason = "same name and shape" if stage == "exact" else f"{how}; same shape"
            if tdt != sdt:
                reason += f"; cast {_dtype_name(sdt)} -> {_dtype_name(tdt)}"
                casts[(_dtype_name(sdt), _dtype_name(tdt))] += 1
            decide(ti, "load", stage, reason, si)

        # Pass 2: ties. A tied key is filled through its canonical key; if only the tied key
        # is in the checkpoint, it fills the canonical one.
        for ti, ci in self.tied.items():
            d, c = decisions[ti], decisions[ci]
            t_name, c_name = self.t_name[ti], self.t_name[ci]
            if c is None and d is not None and d.action == "load" and self.t_shape[ti] == self.t_shape[ci]:
                si = self.t2s[ti]
                decide(ci, "load", "tie", f"{d.reason}; the model ties '{t_name}' to this tensor", si)
                c = decisions[ci]
                d = None
            if d is not None and d.action != "load":
                continue  # the tied key has a decision of its own (excluded, wrong shape ...)
            own = self.t2s[ti]
            if c is not None and c.action == "load":
                decide(ti, "tied", "tie", f"shares storage with '{c_name}', which is loaded", tied_to=c_name)
                if own is not None and c.source != self.s_name[own]:
                    unused_reason[own] = f"the model ties '{t_name}' to '{c_name}'; filled through the tie"
            elif c is not None and c.action == "keep":
                decide(ti, "keep", c.stage, f"shares storage with '{c_name}', which is kept at init",
                       tied_to=c_name)
            # otherwise: left for pass 3 (the canonical key is missing, or has another problem)

        # Pass 3: what nothing filled.
        for ti in range(nt):
            if decisions[ti] is not None:
                continue
            t = self.t_name[ti]
            kind = harmless(ti)
            if ti in self.tied:
                c_name = self.t_name[self.tied[ti]]
                if self.partial:
                    decide(ti, "keep", "none", f"shares storage with '{c_name}', which is not loaded; "
                           "kept at init (partial=True)", tied_to=c_name)
                else:
                    decide(ti, "missing", "tie", f"shares storage with '{c_name}', which is not loaded",
                           tied_to=c_name)
                    problems.append(f"{t}: tied to '{c_name}', which is not loaded")
            elif kind == "num_batches_tracked":
                decide(ti, "keep", "harmless", "not in the checkpoint; num_batches_tracked is harmless at its init")
            elif kind == "optional":
                decide(ti, "keep", "harmless", "not in the checkpoint; optional, kept at init")
            elif (note := self.t_note.get(t.rpartition(".")[0])) is not None:
                if self.partial:
                    decide(ti, "keep", "none", f"{note[0]}; kept at init (partial=True)")
                else:
                    decide(ti, "missing", "structural", note[0])
                    problems.append(f"{t}: {note[1]}")
                    missing_problem = True
            elif self.partial:
                decide(ti, "keep", "none", "not in the checkpoint; kept at init (partial=True)")
            else:
                decide(ti, "missing", "none", "not in the checkpoint")
                problems.append(f"{t}: not in the checkpoint")
                missing_problem = True

        if shape_problem:
            self.suggestions.append(_PARTIAL_SHAPES)
        if missing_problem:
            self.suggestions.append(_PARTIAL_MISSING)
        for (a, b), n in casts.items():
            self.warnings.append(f"cast {a} -> {b}: {n} tensor{'s' if n > 1 else ''} (the checkpoint's dtype differs from the model's)")
        self._warn_unused_patterns()

        loaded = {self.s_index[d.source] for d in decisions if d is not None and d.action == "load" and d.source}
        unused = tuple(Unused(self.s_name[si], self._unused_reason(si, unused_reason, decisions), self.s_shape[si])
                       for si in range(len(self.s_name)) if si not in loaded)
        return Plan(decisions=tuple(d for d in decisions if d is not None), unused=unused,
                    transforms=tuple(self.transforms), problems=tuple(problems),
                    suggestions=tuple(dict.fromkeys(self.suggestions)), warnings=tuple(dict.fromkeys(self.warnings)),
                    partial=self.partial)

    def _unused_reason(self, si: int, known: Mapping[int, str], decisions: list[Decision | None]) -> str:
        if si in known:
            return known[si]
        if self.s_excluded[si]:
            return "excluded by rule"
        work = self.work[si]
        segments = self.s_name[si].split(".")
        if segments[0] in _EMA_HEADS:
            return "an EMA copy of the weights, not loaded"
        if segments[0] in _OPTIM_HEADS or _OPTIM_SEGMENTS.intersection(segments):
            return "optimizer state, not model weights"
        names = [work] + [b + work[len(a):] for a, b in self.applied if work.startswith(a) and len(work) > len(a)]
        for name in names:
            ti = self.t_index.get(name)
            if ti is not None:
                d = decisions[ti]
                if d is not None and d.source and d.source != self.s_name[si]:
                    return f"another tensor chosen for '{name}' ('{d.source}')"
        if si in self.s_note:
            return self.s_note[si]
        if self.include is not None and not self.matches(self.include, (self.s_name[si], work)):
            return "excluded by rule (not in include)"
        return "not in the model"

    def _warn_unused_patterns(self) -> None:
        names = self.t_name + self.s_name + [w for w, n in zip(self.work, self.s_name) if w != n]
        for label, patterns in (("include", self.include or []), ("exclude", self.exclude)):
            for p in patterns:
                if not any(fnmatchcase(n, p) for n in names):
                    self.warnings.append(f"{label} pattern '{p}' matched no key")
