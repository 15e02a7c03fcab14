"""The ``transforms=`` option: rules the user writes, and rules ckptfit prints as advice.

A rule is a pattern (a glob or a regex, matched in full against model keys and checkpoint keys)
and what to do with the tensors it matches: ``"transpose"``, ``"none"`` (as stored),
``"split:N"``, or several joined by ``+``. :func:`parse_rules` checks what the user wrote;
:func:`rule_text_for` writes the rule that matches exactly some keys, for a suggestion.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

__all__ = ["Rule", "parse_rules", "rule_text_for"]

_KINDS = ("transpose", "none")
_SPLIT = re.compile(r"^split:(\d+)$")


@dataclass(frozen=True)
class Rule:
    """One ``transforms=`` entry: a pattern and what to do with the tensors it matches."""

    pattern: str
    kind: str  # as written
    transpose: bool | None  # True: transpose, False: as stored ("none"), None: evidence decides
    split: int | None = None
    _regex: Any = field(default=None, compare=False, repr=False)
    adapt: str | None = None  # "in_chans": adapt= rather than a transforms= entry (see :func:`parse_adapt`)
    class_map: Any = None  # class_map= (a ckptfit._class_map.ClassMap) rather than a transforms= entry

    def hits(self, *keys: str | None) -> bool:
        for k in keys:
            if k is None:
                continue
            if fnmatchcase(k, self.pattern) or (self._regex is not None and self._regex.fullmatch(k)):
                return True
        return False

    @property
    def text(self) -> str:
        if self.adapt is not None:
            return f"adapt={self.adapt!r}"
        if self.class_map is not None:
            return self.class_map.text
        return f"transforms={{{self.pattern!r}: {self.kind!r}}}"


def parse_rules(value: Any, adapt: Any = None, class_map: Any = None, class_map_head: Any = None) -> tuple[Rule, ...]:
    """Check ``transforms=`` and turn it into :class:`Rule` objects; raise at once on anything wrong.

    Args:
        value: ``{pattern: kind}`` (or a list of ``(pattern, kind)`` pairs); a pattern is a glob
            or a regex matched in full against model keys and checkpoint keys; a kind is
            ``"transpose"``, ``"none"``, ``"split:N"`` or several joined by ``+``.

        adapt: ``adapt=`` (``"in_chans"``), carried as a last rule (:mod:`ckptfit._adapt`).
        class_map: ``class_map=`` (and ``class_map_head``), carried as a last rule (:mod:`ckptfit._class_map`).

    Returns:
        The rules, in order.

    Raises:
        TypeError: not a mapping of strings.
        ValueError: an unknown kind, a contradiction (``"transpose+none"``) or an empty pattern.

    Example:
        >>> parse_rules({"*.c_attn.weight": "transpose"})[0].transpose
        True
    """
    from ._adapt import parse_adapt
    from ._class_map import parse_class_map

    tail = (Rule("", f"adapt:{a}", None, adapt=a),) if (a := parse_adapt(adapt)) else ()
    if (cm := parse_class_map(class_map, class_map_head)) is not None:
        tail += (Rule("", "class_map", None, class_map=cm),)
    if value is None:
        return tail
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        try:
            items = [tuple(x) for x in value]
        except TypeError:
            raise TypeError("transforms= must be a dict {pattern: kind}, e.g. "
                            "transforms={'*.c_attn.weight': 'transpose'}") from None
    rules = []
    for item in items:
        if len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise TypeError(f"transforms= entry {item!r} is not a pattern: kind pair of strings, "
                            "e.g. {'*.c_attn.weight': 'transpose'}")
        pattern, kind = item
        if not pattern:
            raise ValueError("transforms= pattern is empty; write a glob such as '*.c_attn.weight'")
        transpose: bool | None = None
        split = None
        for part in kind.replace(" ", "").lower().split("+"):
            m = _SPLIT.match(part)
            if m:
                split = int(m.group(1))
                if split < 2:
                    raise ValueError(f"transforms={{{pattern!r}: {kind!r}}}: split:N needs N >= 2")
            elif part in _KINDS:
                want = part == "transpose"
                if transpose is not None and transpose != want:
                    raise ValueError(f"transforms={{{pattern!r}: {kind!r}}}: 'transpose' and 'none' contradict")
                transpose = want
            else:
                raise ValueError(f"transforms={{{pattern!r}: {kind!r}}}: unknown transform {part!r}; use "
                                 f"'transpose', 'none' (load as stored), 'split:N' or e.g. 'transpose+split:3'")
        try:
            regex = re.compile(pattern)
        except re.error:
            regex = None  # a glob such as '*.weight' is not a regex; it is matched as a glob
        rules.append(Rule(pattern, kind, transpose, split, regex))
    return tuple(rules) + tail


def rule_text_for(keys: Collection[str], kind: str, model_keys: Collection[str], everything: Sequence[str],
                  feeding: Collection[str | None]) -> str:
    """A ``transforms=`` rule that matches exactly ``keys`` among ``everything`` (every model and
    checkpoint key), besides the checkpoint keys ``feeding`` them: one glob, a glob per layer form,
    else a regex.

    Example:
        >>> rule_text_for(["h.0.w", "h.1.w"], "transpose", ["h.0.w", "h.1.w", "h.0.b"], ["h.0.w", "h.1.w", "h.0.b"], ())
        "transforms={'*.w': 'transpose'}"
    """
    want = set(keys)

    def exact(pat: str) -> bool:
        hit = [k for k in everything if fnmatchcase(k, pat)]
        return {k for k in hit if k in model_keys} <= want and all(k in want or k in feeding for k in hit)

    leaves = {k.rpartition(".")[2] for k in keys}
    forms = sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", k) for k in keys})
    if len(leaves) == 1 and exact(f"*.{next(iter(leaves))}"):
        rules = [f"*.{next(iter(leaves))}"]
    elif len(forms) <= 4 and all(exact(f) for f in forms):
        rules = forms
    else:
        rx = "|".join(re.escape(f).replace(r"\*", r"\d+") for f in forms)
        return f"transforms={{r'{rx}': {kind!r}}}"
    return "transforms={" + ", ".join(f"{r!r}: {kind!r}" for r in rules) + "}"
