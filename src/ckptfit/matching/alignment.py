"""Stage 4 of :func:`~.matcher.match`: old key styles (``norm.1`` vs ``norm1``) and structural
alignment of modules whose names differ, by roles and shapes (constraints) and by names and
declaration order (evidence, see :mod:`.names`); refused with ``rename=`` rules where the evidence
does not settle it."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from .names import MAX_LISTED, NBT, Evidence, dtype_kind, fold_names, natural_key, numbered_in_order, numbers

__all__ = ["StructuralStages"]

# Distinct-signature pairs compared in the structural stage before it gives up.
_MAX_SIGNATURE_PAIRS = 4_000_000

# A dot between a segment that ends in a non-digit and an all-digit segment: the dot that
# old key styles have and new ones dropped ("norm.1.weight" vs "norm1.weight").
_JOIN_DOT = re.compile(r"(?<=[^\d.])\.(?=\d+(?:\.|$))")


def _compatible(x: tuple, y: tuple) -> bool:
    """Whether two module signatures could describe the same module, one possibly damaged.

    True when one role set contains the other and every shared role has the same shape and
    dtype kind.
    """
    dx = {role: rest for role, *rest in x}
    dy = {role: rest for role, *rest in y}
    small, big = (dx, dy) if len(dx) <= len(dy) else (dy, dx)
    return bool(small) and all(role in big and big[role] == rest for role, rest in small.items())


class StructuralStages:
    """Stage 4 of a :class:`~.matcher.Matcher` (a mixin: it works on the matcher's state)."""

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
            if self.s_shape[si] != self.t_shape[ti] or dtype_kind(self.s_dtype[si]) != dtype_kind(self.t_dtype[ti]):
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
        return tuple(sorted((role, shapes[i], dtype_kind(dtypes[i])) for role, i in members.items() if role != NBT))

    def stage_structural(self) -> None:
        """Align leftover modules whose names differ, by roles and shapes (constraints) and by
        their names and declaration order (evidence), only where the evidence agrees.

        Each group of modules with the same roles and shapes is paired by what the names say
        (:class:`Evidence`). Declaration order is accepted only where the names do not
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
            s_list.sort(key=natural_key)
            positional_ok = (t_list == sorted(t_list, key=natural_key) and len(s_list) == len(t_list)
                             and all(numbers(a) == numbers(b) for a, b in zip(s_list, t_list)))
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
        ev = Evidence(s_group, t_group)
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
        elif ev.silent and numbered_in_order(ev.rest_s) and numbered_in_order(rest_t):
            out += [(sm, order[sm], "order", ", numbered alike") for sm in ev.rest_s]
        elif ev.silent:
            self._refuse_group(ev, order, s_mods, "only their declaration order tells them apart, "
                                                  "and their names do not confirm it")
        else:
            self._refuse_group(ev, order, s_mods, "their names do not settle which is which")
        return out

    def _refuse_group(self, ev: Evidence, order: Mapping[str, str] | None,
                      s_mods: Mapping[str, Mapping[str, int]], why: str, whole: bool = False) -> None:
        """Load nothing through the modules the evidence leaves open (``whole``: the whole group);
        suggest the rename that would."""
        rest_s, rest_t = (ev.all_s, ev.all_t) if whole else (ev.rest_s, ev.rest_t)
        guess = {sm: tm for sm, tm in ev.guess(order).items() if sm in rest_s}
        self.explained_s.update(rest_s)
        if self.prefix_ambiguity and all(si in self.locked_s for sm in rest_s for si in s_mods[sm].values()):
            # an ambiguous prefix (two encoders, student and teacher ...) already explains these keys, and
            # its suggestion settles them all; a rename per module would repeat it module by module
            for tm in rest_t:
                self.t_note[tm] = (f"ambiguous: {self.prefix_ambiguity}", f"ambiguous: {self.prefix_ambiguity} "
                                   "(see the suggestion)")
            return
        what = (f"checkpoint module{'s' if len(rest_s) > 1 else ''} {fold_names(rest_s)} and model "
                f"module{'s' if len(rest_t) > 1 else ''} {fold_names(rest_t)} have the same roles and shapes, but {why}")
        for sm in rest_s:
            for si in s_mods[sm].values():
                self.s_note[si] = f"ambiguous: {what}"
        for tm in rest_t:
            self.t_note[tm] = (f"ambiguous: {what}; nothing loaded through them",
                               f"ambiguous: checkpoint module{'s' if len(rest_s) > 1 else ''} {fold_names(rest_s)} "
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
            told = ", ".join(f"'{sm}' is '{tm}'" for sm, tm in pairs[:MAX_LISTED])
            told += f" and {len(pairs) - MAX_LISTED} more" if len(pairs) > MAX_LISTED else ""
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
            if numbers(sm) and numbers(sm) == numbers(tm):
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
        taken: set[str] = set()  # never advise renaming two checkpoint modules onto one model module
        for sm, members in s_mods.items():
            if sm in self.explained_s or all(si in self.locked_s for si in members.values()):
                continue  # already explained by an ambiguous prefix or structural suggestion
            fits = by_sig.get(self._signature(members, self.s_shape, self.s_dtype))
            free = [tm for tm in fits or () if tm not in taken]
            if sm and free:
                taken.add(free[0])
                found.append((sm, fits, free[0]))
        for sm, fits, tm in found[:MAX_LISTED]:
            self.suggestions.append(
                f"checkpoint module '{sm}' has the roles and shapes of model "
                f"module{'s' if len(fits) > 1 else ''} {fold_names(fits)} but could "
                f"not be aligned without guessing; if it is '{tm}', pass "
                f"rename=[(r'^{re.escape(sm)}\\.', '{tm}.')]")
        if len(found) > MAX_LISTED:
            self.suggestions.append(f"{len(found) - MAX_LISTED} more checkpoint modules fit model modules "
                                    "by shape but were not aligned without a rename rule")
