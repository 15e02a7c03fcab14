"""One :func:`match` call's state (:class:`Matcher`) and its first stages: the user's rules,
exact names and learned prefixes. Stage 4 is in :mod:`.alignment`, stages 5-7 in :mod:`.decisions`."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

from ..plans import Plan, Stage, TensorSpec
from .alignment import StructuralStages
from .decisions import PlanMaking
from .names import MAX_LISTED, NBT, describe, leaf, model_over_ema, rule_for

__all__ = ["match", "Matcher"]

# A suffix shared with more model keys than this identifies nothing ("weight", "0.bias").
_MAX_SUFFIX_FANOUT = 8
# Learned prefix transforms per plan; real checkpoints need one to three.
_MAX_PREFIX_ROUNDS = 64
# Tied candidates checked against each other in one round (the rest wait for the next).
_MAX_TIED_CANDIDATES = 1000

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
        A :class:`~ckptfit.plans.Plan` with exactly one decision per target key, in target
        order; ``plan.problems`` is non-empty when the load must fail.

    Raises:
        ValueError: a ``rename`` rule is not a valid regex or replacement, or a key occurs
            twice in ``target`` or ``source``.

    Example:
        >>> import torch
        >>> from ckptfit.plans import TensorSpec
        >>> model = [TensorSpec("fc.weight", (10, 4), torch.float32)]
        >>> ckpt = [TensorSpec("module.fc.weight", (10, 4), torch.float16)]
        >>> plan = match(model, ckpt)
        >>> plan.mapping(), plan.transforms
        ({'fc.weight': 'module.fc.weight'}, ("strip 'module.'",))
    """
    matcher = Matcher(target, source, partial=partial, include=include, exclude=exclude,
                       tied=tied, optional=optional)
    matcher.apply_rules(rename)
    matcher.stage_exact()
    matcher.stage_prefixes()
    matcher.stage_joined_digits()
    matcher.stage_structural()
    return matcher.build_plan()


class Matcher(StructuralStages, PlanMaking):
    """State of one :func:`match` call: who is paired with whom, and by which stage.

    Stage 4 comes from :class:`~.alignment.StructuralStages`, stages 5-7 and the plan from
    :class:`~.decisions.PlanMaking`; both work on the state set up here.
    """

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
        self.prefix_ambiguity = ""  # why the leading names are ambiguous, once a prefix stage found they are
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
                if not self.s_shape[si] or leaf(work) == NBT:
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
            preferred = model_over_ema([c for c in group if c in bad])
            if preferred is not None:  # one file holding the model and its EMA copy: the model's own
                for c in bad - {preferred}:
                    banned.add(c)
                    for si, _ti in maps[c]:
                        self.s_note[si] = f"EMA copy beside the model's own weights ({describe(*preferred)}); " \
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
                desc = describe(*c)
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
                if self.s2t[si] is None and si not in self.locked_s and leaf(self.work[si]) != NBT]
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
        descs = [describe(*c) for c in bad]
        for c in bad:
            for si, ti in maps[c]:
                self.locked_s.add(si)
                self.locked_t.add(ti)
                self.s_note[si] = f"ambiguous: {' or '.join(descs[:2])} fit equally well"
        shown = "; ".join(descs[:MAX_LISTED]) + (f" (and {len(descs) - MAX_LISTED} more)"
                                                  if len(descs) > MAX_LISTED else "")
        if len({b for _, b in bad}) == 1:
            # several copies in the file for one place in the model (two encoders, student and teacher):
            # choosing the copy settles every module under it, which module-by-module advice would only repeat
            self.prefix_ambiguity = f"{' or '.join(descs[:2])} fit equally well"
        a, b = bad[0]
        cli = f" (on the command line: --rename '^{re.escape(a)}=>{b}')" if "'" not in a + b else ""
        self.suggestions.append(f"ambiguous names, nothing loaded through them: {shown} fit equally well; "
                                f"to choose one, pass e.g. {rule_for(a, b)}{cli}")
