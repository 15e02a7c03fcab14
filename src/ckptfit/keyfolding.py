"""Fold dotted tensor names into short brace patterns that a person can read.

``layer1.0.conv1.weight`` … ``layer4.1.conv1.weight`` (eight keys) become the one pattern
``layer{1..4}.{0,1}.conv1.weight``. Folding is lossless: :func:`expand_pattern` applied to
every pattern that :func:`fold_keys` returns gives back exactly the input keys, never one
more. A pattern is a product: each ``{…}`` is an independent choice.

The algorithm works on keys split into dot segments. Keys of the same length that differ
in exactly one segment are merged into one pattern whose segment is the set of both
values; this is repeated position by position, from the last segment to the first, until
nothing changes. Because two products that agree on every other segment unite into a
product, no merge can ever claim a key that was not in the input.

Rendering a segment set: integers become sorted ranges (``{0..11}``, ``{0,1}``,
``{0..3,7}``), names that differ only in one embedded number fold around it
(``layer{1..4}``), anything else is listed in order of first appearance (``{weight,bias}``).
Literal ``{``, ``}``, ``,`` and ``\\`` in names are escaped with a backslash.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

__all__ = ["fold_keys", "expand_pattern", "fold_pairs", "group_by_module"]

_SPECIAL = re.compile(r"[\\{},]")
_MAX_DIGITS = 1000  # a longer number is listed as text (int() of 4,300+ digits is refused by Python)


def _num_tail(v: str) -> tuple[str, str, str] | None:
    """``(head, number, tail)``: the last canonical integer of a segment (no leading zero), what
    precedes it and the non-digits after it; None if there is none.

    What ``re.match(r"^(.*?)(0|[1-9]\d*)(\D*)$", v)`` gives, in one linear pass: that regex
    backtracks quadratically on a long run of digits followed by non-digits and another digit.
    """
    k = len(v)
    while k and not v[k - 1].isdecimal():  # the non-digit tail (\D*)
        k -= 1
    r = k
    while r and v[r - 1].isdecimal():  # the last run of digits
        r -= 1
    if r == k:
        return None
    s = next((i for i in range(r, k) if v[i] in "123456789"), None)  # the earliest canonical start (lazy head)
    if s is None:
        if v[k - 1] != "0":
            return None
        s = k - 1
    if "\n" in v[:s] or k - s > _MAX_DIGITS:  # (.*?) does not cross a newline
        return None
    return v[:s], v[s:k], v[k:]
_INT = re.compile(r"^(?:0|[1-9]\d*)$")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")

_Row = tuple[str, ...]
_Slots = tuple[tuple[str, ...], ...]


def _escape(text: str) -> str:
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``0..3,7,9,10``: runs of three or more become ``a..b``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        if prev - start >= 2:
            parts.append(f"{start}..{prev}")
        else:
            parts.extend(str(i) for i in range(start, prev + 1))
        if n is not None:
            start = prev = n
    return ",".join(parts)


def _render_slot(values: tuple[str, ...]) -> str:
    """One segment's set of values as pattern text."""
    if len(values) == 1:
        return _escape(values[0])
    matches = [_num_tail(v) for v in values]
    if all(matches) and len({(m[0], m[2]) for m in matches}) == 1:  # type: ignore[index]
        head, tail = matches[0][0], matches[0][2]  # type: ignore[index]
        numbers = sorted(int(m[1]) for m in matches)  # type: ignore[index]
        return f"{_escape(head)}{{{_ranges(numbers)}}}{_escape(tail)}"
    return "{" + ",".join(_escape(v) for v in values) + "}"


def _fold_rows(rows: Iterable[_Row]) -> list[_Slots]:
    """Fold rows of segments into products of segment sets, losslessly, in input order.

    Returns one tuple of segment sets per product; the union of their cross products is
    exactly the set of input rows. Each set lists its values in order of first appearance.
    """
    unique = list(dict.fromkeys(rows))
    rank: dict[str, int] = {}
    for row in unique:
        for seg in row:
            rank.setdefault(seg, len(rank))

    # Segment sets are interned to ints so that grouping hashes small tuples of ints.
    slots: list[tuple[str, ...]] = []
    slot_ids: dict[tuple[str, ...], int] = {}

    def intern(values: tuple[str, ...]) -> int:
        sid = slot_ids.get(values)
        if sid is None:
            sid = slot_ids[values] = len(slots)
            slots.append(values)
        return sid

    by_length: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for order, row in enumerate(unique):
        by_length.setdefault(len(row), []).append((order, tuple(intern((seg,)) for seg in row)))

    folded: list[tuple[int, tuple[int, ...]]] = []
    for length, patterns in by_length.items():
        changed = True
        while changed and len(patterns) > 1:
            changed = False
            for pos in reversed(range(length)):
                groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
                for item in patterns:
                    pat = item[1]
                    groups.setdefault(pat[:pos] + pat[pos + 1 :], []).append(item)
                if len(groups) == len(patterns):
                    continue
                changed = True
                merged: list[tuple[int, tuple[int, ...]]] = []
                for rest, members in groups.items():
                    if len(members) == 1:
                        merged.append(members[0])
                        continue
                    values = {v for _, pat in members for v in slots[pat[pos]]}
                    sid = intern(tuple(sorted(values, key=rank.__getitem__)))
                    merged.append((min(o for o, _ in members), rest[:pos] + (sid,) + rest[pos:]))
                patterns = merged
        folded.extend(patterns)
    folded.sort(key=lambda item: item[0])
    return [tuple(slots[sid] for sid in pat) for _, pat in folded]


def fold_keys(keys: Iterable[str]) -> list[str]:
    """Fold dotted keys into a short list of brace patterns, losslessly.

    Sibling names that share the same continuation are folded into braces, integers into
    ranges (``{0..11}`` for three or more consecutive, ``{0,1}`` for two) and names that
    differ in one embedded number around it (``layer{1..4}``). Expanding every pattern with
    :func:`expand_pattern` gives exactly the set of input keys. Patterns come in the order
    in which their first key appears; duplicates in the input are ignored.

    Args:
        keys: dotted tensor names, e.g. the keys of a state dict.

    Returns:
        The patterns, in order of first appearance.

    Example:
        >>> fold_keys(["fc.weight", "fc.bias"])
        ['fc.{weight,bias}']
        >>> fold_keys(f"blocks.{i}.attn.qkv.weight" for i in range(12))
        ['blocks.{0..11}.attn.qkv.weight']
    """
    return [".".join(_render_slot(s) for s in slots) for slots in _fold_rows(tuple(k.split(".")) for k in keys)]


def _parse(pattern: str) -> list[list[str]]:
    """A pattern as a sequence of choices: literal text is a one-element choice."""
    choices: list[list[str]] = []
    literal: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            literal.append(pattern[i + 1])
            i += 2
        elif c == "{":
            if literal:
                choices.append(["".join(literal)])
                literal = []
            items: list[list[str]] = []
            item: list[str] = []
            escaped = False
            i += 1
            while i < n and pattern[i] != "}":
                c = pattern[i]
                if c == "\\" and i + 1 < n:
                    item.append(pattern[i + 1])
                    escaped = True
                    i += 2
                elif c == "{":
                    raise ValueError(f"nested braces are not supported: {pattern!r} at {i}")
                elif c == ",":
                    items.append(_expand_item("".join(item), escaped))
                    item, escaped = [], False
                    i += 1
                else:
                    item.append(c)
                    i += 1
            if i >= n:
                raise ValueError(f"unclosed '{{' in pattern {pattern!r}")
            items.append(_expand_item("".join(item), escaped))
            choices.append([v for values in items for v in values])
            i += 1
        elif c == "}":
            raise ValueError(f"unmatched '}}' in pattern {pattern!r} at {i}")
        else:
            literal.append(c)
            i += 1
    if literal or not choices:
        choices.append(["".join(literal)])
    return choices


def _expand_item(item: str, escaped: bool) -> list[str]:
    m = None if escaped else _RANGE.match(item)
    if m is None:
        return [item]
    lo, hi = int(m[1]), int(m[2])
    if hi < lo:
        raise ValueError(f"empty range {item!r}: the end must not be below the start")
    return [str(i) for i in range(lo, hi + 1)]


def expand_pattern(pattern: str) -> list[str]:
    """Expand a brace pattern made by :func:`fold_keys` into the keys it stands for.

    ``{a,b}`` is a choice, ``{0..3}`` a range of integers (both ends included); each brace
    is an independent choice, so the result is their cross product, in order. A backslash
    escapes the next character.

    Args:
        pattern: a pattern such as ``"layer{1..4}.{0,1}.conv1.weight"``.

    Returns:
        The keys, in expansion order.

    Raises:
        ValueError: the pattern has an unclosed, unmatched or nested brace, or a range
            whose end is below its start.

    Example:
        >>> expand_pattern("fc.{weight,bias}")
        ['fc.weight', 'fc.bias']
        >>> expand_pattern("layer{1..3}.0")
        ['layer1.0', 'layer2.0', 'layer3.0']
    """
    return ["".join(parts) for parts in itertools.product(*_parse(pattern))]


_HOLE = "\x00"


def fold_pairs(pairs: Iterable[tuple[str, str]], sep: str = " -> ") -> list[str]:
    """Fold ``(source, target)`` key pairs into lines like ``0.{weight,bias} -> conv1.{weight,bias}``.

    A brace that appears on both sides of ``sep`` is the *same* choice on both sides: the
    line stands for the pairs obtained by choosing once and filling both sides. Only the
    trailing segments both keys share, and integers that appear in the same order in both
    (``blocks.3.attn`` / ``layer.3.attention``), are folded; everything else stays a line
    of its own, so the display never claims a pair that was not given.

    Args:
        pairs: ``(source, target)`` key pairs, e.g. checkpoint key and model key.
        sep: the text between the two sides.

    Returns:
        One line per folded group, in order of first appearance.

    Example:
        >>> fold_pairs([("0.weight", "conv1.weight"), ("0.bias", "conv1.bias")])
        ['0.{weight,bias} -> conv1.{weight,bias}']
        >>> fold_pairs((f"blocks.{i}.mlp.weight", f"layer.{i}.ffn.weight") for i in range(4))
        ['blocks.{0..3}.mlp.weight -> layer.{0..3}.ffn.weight']
    """
    groups: dict[tuple[_Row, _Row], list[_Row]] = {}
    for source, target in pairs:
        src, tgt = source.split("."), target.split(".")
        k = 0
        while k < min(len(src), len(tgt)) and src[-1 - k] == tgt[-1 - k]:
            k += 1
        src_head, tgt_head, shared = src[: len(src) - k], tgt[: len(tgt) - k], src[len(src) - k :]
        src_ints = [s for s in src_head if _INT.match(s)]
        tgt_ints = [s for s in tgt_head if _INT.match(s)]
        holes: list[str] = []
        if src_ints and src_ints == tgt_ints:
            holes = src_ints
            src_head = [_HOLE if _INT.match(s) else s for s in src_head]
            tgt_head = [_HOLE if _INT.match(s) else s for s in tgt_head]
        groups.setdefault((tuple(src_head), tuple(tgt_head)), []).append((*holes, *shared))

    lines: list[str] = []
    for (src_tmpl, tgt_tmpl), rows in groups.items():
        n_holes = src_tmpl.count(_HOLE)
        for slots in _fold_rows(rows):
            rendered = [_render_slot(s) for s in slots]
            hole_text, shared_text = rendered[:n_holes], rendered[n_holes:]

            def fill(tmpl: _Row) -> str:
                it = iter(hole_text)
                segs = [next(it) if s == _HOLE else _escape(s) for s in tmpl]
                return ".".join(segs + shared_text)

            lines.append(f"{fill(src_tmpl)}{sep}{fill(tgt_tmpl)}")
    return lines


def group_by_module(keys: Iterable[str]) -> dict[str, list[str]]:
    """Group dotted keys by their module path: ``{"layer1.0.conv1": ["weight"], ...}``.

    Keys without a dot go under ``""``. Modules and leaf names keep their input order.

    Args:
        keys: dotted tensor names.

    Returns:
        ``{module_path: [leaf names]}``.

    Example:
        >>> group_by_module(["fc.weight", "fc.bias", "scale"])
        {'fc': ['weight', 'bias'], '': ['scale']}
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    return groups
