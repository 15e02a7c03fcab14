"""A refused plan, rendered: the headline, each problem once, the suggestions last; and the error it raises.

Nothing was loaded, so a refused plan has no :class:`~ckptfit.report.LoadReport`; it is rendered
from the same pieces (:mod:`ckptfit.rendering`) so that it reads like one. :func:`refusal_error`
is what every entry point raises for it; ``ckptfit plan`` prints it (:func:`ckptfit.report.render_plan`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from .errors import LoadError
from .keyfolding import fold_keys
from .plans import Decision, Plan
from .rendering import cap, count_text, fold_sections, how_lines, list_lines, printable, section_lines, source_text

__all__ = ["refusal_lines", "refusal_error"]


# A dotted key inside a message: two or more name segments, not a number like 1.5.
_KEY_IN_TEXT = re.compile(r"(?<![\w.])(?:[A-Za-z_][\w\-]*|\d+)(?:\.[\w\-]+)+(?![\w.])")


def _fold_messages(messages: Sequence[str]) -> list[str]:
    """Fold messages that differ only in one dotted key: ``'a.0.w' missing`` x3 -> ``'a.{0..2}.w' missing``."""
    groups: dict[str, list[str]] = {}
    order: list[tuple[str, str | None]] = []
    for message in messages:
        keys = {m.group(0) for m in _KEY_IN_TEXT.finditer(message) if not re.fullmatch(r"[\d.]+", m.group(0))}
        if len(keys) != 1:
            order.append((message, None))
            continue
        key = keys.pop()
        template = message.replace(key, "\x00")
        if template not in groups:
            order.append((template, key))
            groups[template] = []
        groups[template].append(key)
    out: list[str] = []
    for text, key in order:
        if key is None:
            out.append(text)
            continue
        keys = groups[text]
        folded = fold_keys(keys) if len(keys) > 1 else keys
        out.append(text.replace("\x00", ", ".join(folded)))
    return out


def refusal_lines(plan: Plan, max_lines: int, max_keys: int, tail: str = "") -> list[str]:
    """A refused plan, suggestions aside: the headline, the sections, the problems no section shows."""
    n = len(plan.problems)
    loads, tied = plan.by_action("load"), plan.by_action("tied")
    # a refusal says so first: the count that follows is what would have loaded, not what did
    head = count_text("Refused: would load", len(loads), len(tied), len(plan.decisions))
    lines = [f"{head}{source_text(plan)} — {n} problem{'s' if n != 1 else ''}{tail}", *how_lines(plan, loads)]
    advice = " ".join(plan.suggestions)
    missing = tuple(_see_suggestion(d, advice) for d in plan.by_action("missing"))
    kept = tuple(d for d in plan.by_action("keep") if d.stage != "harmless")  # harmless ones are no news here
    # checkpoint tensors an ambiguity leaves unused are the other side of a problem the sections show
    # (and those a missing tensor's reason names already: another dtype kind)
    named = {d.source for d in missing if d.source}
    unused = tuple(u for u in plan.unused if not u.reason.startswith("ambiguous") and u.source not in named)
    for section in fold_sections(loads, tied, kept, plan.by_action("skip_shape"), missing, unused,
                                 refused=not plan.partial):
        lines.extend(section_lines(section, max_lines, max_keys))
    shown = {d.target for d in plan.decisions if d.action in ("skip_shape", "missing")}
    rest = [p for p in plan.problems if p.split(": ", 1)[0] not in shown]
    lines.extend(list_lines("problem", cap(_fold_messages(rest), max_lines, "problems")))
    lines.extend(list_lines("warning", plan.warnings))
    return lines


def _see_suggestion(d: Decision, advice: str) -> Decision:
    """A missing tensor whose reason a suggestion repeats in full says so instead (each problem once)."""
    reason = d.reason.removeprefix("ambiguous: ").removesuffix("; nothing loaded through them")
    if reason != d.reason and reason in advice:
        return replace(d, reason="ambiguous: which checkpoint module fills it is not settled (see the suggestion)")
    return d


def refusal_error(plan: Plan, *, max_lines: int = 12, max_keys: int = 8) -> LoadError:
    """The :class:`~ckptfit.errors.LoadError` of a refused plan: the refusal once, the suggestions last.

    Its ``hint`` holds the suggestions (one per line); a plan with none gets a hint that points
    further (``ckptfit plan``, ``ckptfit identify``), so every refusal says what to do next.
    """
    lines = refusal_lines(plan, max_lines, max_keys, tail="; the model was not changed")
    hint = "\n".join(plan.suggestions) if plan.suggestions else _fallback_hint(plan)
    return LoadError(printable("\n".join(lines)), path=plan.path, hint=printable(hint), problems=plan.problems,
                     plan=plan)


def _fallback_hint(plan: Plan) -> str:
    where = plan.path or "PATH"
    if not plan.by_action("load"):
        return (f"check that this is the right file for this model: `ckptfit identify {where}` says which "
                f"architecture the file holds, `ckptfit inspect {where}` lists its tensors")
    return f"run `ckptfit plan {where} --model SPEC` to see every decision and its reason"
