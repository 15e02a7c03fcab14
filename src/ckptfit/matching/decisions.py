"""Stages 5-7 of :func:`~.matcher.match`: shapes and dtypes, harmless differences, strictness;
then the :class:`~ckptfit.plans.Plan`, with one decision per model tensor and a reason for every
checkpoint tensor left unused."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase

from ..plans import Decision, Plan, Stage, Unused
from .names import NBT, dtype_kind, dtype_name, fmt_shape, leaf

__all__ = ["PlanMaking", "PARTIAL_MISSING", "PARTIAL_SHAPES"]

# First segments and segments that mark a checkpoint tensor as training state, not weights.
_EMA_HEADS = frozenset({"ema", "model_ema", "ema_model", "module_ema", "averaged_model", "swa_model"})
_OPTIM_HEADS = frozenset({"optimizer", "optim", "optimizer_states", "scheduler", "lr_scheduler"})
_OPTIM_SEGMENTS = frozenset({"exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq"})

PARTIAL_SHAPES = "pass partial=True (on the command line: --partial) to keep these layers at their init"
PARTIAL_MISSING = "pass partial=True (on the command line: --partial) to keep the missing tensors at their init"
_GLOB_FREE = re.compile(r"[\w.\-]+")  # a key that is its own exclude= pattern (no glob or shell characters)
_MAX_EXCLUDED = 3  # more tensors of another dtype kind than this: partial=True, not a list of names


def _short(reason: str) -> str:
    """A decision's reason without its ending ("...; kept at init"), to quote inside another."""
    for end in ("; kept at init (partial=True)", "; kept at init", "; not loaded, kept at init (partial=True)"):
        if reason.endswith(end):
            return reason[: -len(end)]
    return reason


class PlanMaking:
    """Stages 5-7 of a :class:`~.matcher.Matcher` and the plan (a mixin: it works on the matcher's state)."""

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
        not_a_cast: list[str] = []  # model keys whose checkpoint tensor is of another dtype kind
        excluded_by_name = self._excluded_sources()

        def decide(ti: int, action, stage: Stage, reason: str, si: int | None = None, tied_to: str | None = None):
            decisions[ti] = Decision(
                target=self.t_name[ti], action=action, source=None if si is None else self.s_name[si],
                stage=stage, reason=reason, target_shape=self.t_shape[ti],
                source_shape=None if si is None else self.s_shape[si], target_dtype=self.t_dtype[ti],
                source_dtype=None if si is None else self.s_dtype[si], tied_to=tied_to,
                evidence=self.evidence[ti] if si is not None and si == self.t2s[ti] else None)

        def harmless(ti: int) -> str | None:
            if leaf(self.t_name[ti]) == NBT:
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
                unused_reason[si] = f"shape differs from '{t}' ({fmt_shape(sshape)} vs {fmt_shape(tshape)})"
                diff = f"{how}, but checkpoint has {fmt_shape(sshape)}, model has {fmt_shape(tshape)}"
                kind = harmless(ti)
                if kind:
                    decide(ti, "keep", "harmless", f"{diff}; {kind}, kept at init", si)
                elif self.partial:
                    decide(ti, "skip_shape", stage, f"{diff}; not loaded, kept at init (partial=True)", si)
                else:
                    decide(ti, "skip_shape", stage, f"{diff}; not loaded", si)
                    where = f" (as '{s}')" if s != t else ""
                    problems.append(f"{t}: checkpoint has {fmt_shape(sshape)}{where}, model has {fmt_shape(tshape)}")
                    shape_problem = True
                continue
            if dtype_kind(tdt) != dtype_kind(sdt):
                unused_reason[si] = f"dtype differs from '{t}' ({dtype_name(sdt)} vs {dtype_name(tdt)})"
                diff = (f"{how}, but checkpoint has {dtype_name(sdt)}, model has {dtype_name(tdt)} "
                        f"({dtype_kind(sdt)} to {dtype_kind(tdt)} is not a cast)")
                kind = harmless(ti)
                if kind or self.partial:
                    self.warnings.append(f"{t}: checkpoint '{s}' is {dtype_name(sdt)}, model has "
                                         f"{dtype_name(tdt)}; kept at init")
                    if kind:
                        decide(ti, "keep", "harmless", f"{diff}; {kind}, kept at init", si)
                    else:
                        decide(ti, "keep", "none", f"{diff}; kept at init (partial=True)", si)
                else:
                    decide(ti, "missing", stage, f"{diff}; not loaded", si)
                    problems.append(f"{t}: checkpoint has {dtype_name(sdt)} (as '{s}'), model has "
                                    f"{dtype_name(tdt)}; {dtype_kind(sdt)} to {dtype_kind(tdt)} is not a cast")
                    not_a_cast.append(t)
                continue
            reason = "same name and shape" if stage == "exact" else f"{how}; same shape"
            if tdt != sdt:
                reason += f"; cast {dtype_name(sdt)} -> {dtype_name(tdt)}"
                casts[(dtype_name(sdt), dtype_name(tdt))] += 1
            decide(ti, "load", stage, reason, si)

        # Pass 2: ties: the model's tied tensors are one tensor, filled once. A tied key is filled
        # through its canonical key; if only the tied key has a loadable checkpoint tensor (the
        # canonical one is absent, excluded or unloadable), that tensor fills the canonical key.
        # A file that holds a tensor of its own for a tied key, other than the one loaded, may
        # disagree with the tie: the decision names it (``source``) and the loader compares both
        # tensors' values before the model changes (ckptfit.loading.ties), refusing if they differ.
        for ti, ci in self.tied.items():
            d, c = decisions[ti], decisions[ci]
            t_name, c_name = self.t_name[ti], self.t_name[ci]
            own = self.t2s[ti]
            takes_tied = c is None or c.action == "keep" or (c.action == "skip_shape" and self.partial)
            if takes_tied and d is not None and d.action == "load" and self.t_shape[ti] == self.t_shape[ci]:
                not_own = "" if c is None else f"; its own checkpoint tensor is not used ({_short(c.reason)})"
                decide(ci, "load", "tie", f"{d.reason}; the model ties '{t_name}' to this tensor{not_own}", own)
                c = decisions[ci]
                d = None
            c_loads = c is not None and c.action == "load"
            if d is not None and d.action != "load":
                if c_loads and (d.action == "keep" or (d.action == "skip_shape" and self.partial)):
                    # the tied key cannot stay at its init: it is the loaded tensor
                    why = f"; its own checkpoint tensor is not used ({_short(d.reason)})"
                    decide(ti, "tied", "tie", f"shares storage with '{c_name}', which is loaded{why}", tied_to=c_name)
                elif d.action in ("keep", "skip_shape") and d.tied_to is None:  # its tie, for a later pass that
                    decisions[ti] = replace(d, tied_to=c_name)  # may load c_name after all (ckptfit._class_map)
                continue  # otherwise the tied key has a decision of its own (a problem, or kept with its canonical key)
            if c_loads:
                if own is not None and c.source != self.s_name[own]:
                    s_own = self.s_name[own]
                    decide(ti, "tied", "tie", f"shares storage with '{c_name}', which is loaded; the checkpoint "
                           f"holds its own tensor '{s_own}' for this tied weight: checked equal to "
                           f"'{c.source}' at load", own, tied_to=c_name)
                    unused_reason[own] = (f"the model ties '{t_name}' to '{c_name}'; checked equal to "
                                          f"'{c.source}' at load, filled through the tie")
                else:
                    decide(ti, "tied", "tie", f"shares storage with '{c_name}', which is loaded", tied_to=c_name)
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

        if not_a_cast and len(not_a_cast) <= _MAX_EXCLUDED and all(_GLOB_FREE.fullmatch(t) for t in not_a_cast):
            one = len(not_a_cast) == 1
            self.suggestions.append(f"pass exclude={not_a_cast!r} (on the command line: "
                                    + " ".join(f"--exclude {t}" for t in not_a_cast)
                                    + f") to keep {'it at its' if one else 'them at their'} init")
        elif not_a_cast:
            missing_problem = True
        if shape_problem:
            self.suggestions.append(PARTIAL_SHAPES)
        if missing_problem:
            self.suggestions.append(PARTIAL_MISSING)
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
