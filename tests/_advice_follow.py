"""Read a refusal's printed suggestions back, literally, as a user would type them.

Shared by tests/test_advice_property.py and bench/advice_corpus.py: each suggestion offers one or
more alternatives; each alternative is the Python keyword arguments it names (``pass
rename=[...]``, ``use='teacher'``, ``model_kwargs={...}``, ``partial=True``, ``transforms={...}``)
or the command-line arguments it names (``on the command line: --rename '...'``, ``CLI: --use x``).
Nothing here knows what ckptfit meant: it reads the text.
"""
from __future__ import annotations

import ast
import re
import shlex
from typing import Any

import torch

# The keyword arguments a suggestion can name; each value is read as a Python literal.
_PY_NAMES = ("rename", "transforms", "model_kwargs", "exclude", "include", "use", "partial", "source_model")
_PY_START = re.compile(r"(?<![\w-])(" + "|".join(_PY_NAMES) + r")=(?=[\[{'\"T])")
_CLI_MARK = re.compile(r"(?:on the command line|CLI):")


def python_alternatives(suggestion: str) -> list[dict[str, Any]]:
    """Every alternative ``suggestion`` offers, as keyword arguments, in the order printed."""
    if suggestion.startswith("on the command line"):
        return []
    # the command-line spellings in parentheses are read by cli_alternatives, not here
    text = re.sub(r"\((?:on the command line|CLI):[^()]*(?:\([^()]*\)[^()]*)*\)", "", suggestion)
    found: list[tuple[int, dict[str, Any]]] = []
    for m in _PY_START.finditer(text):
        value = _literal_at(text, m.end())
        if value is not _NOTHING:
            found.append((m.start(), {m.group(1): value}))
    return [options for _, options in found]


_NOTHING = object()


def _literal_at(text: str, start: int) -> Any:
    """The Python literal that starts at ``text[start]`` (brackets balanced, quotes respected)."""
    if text.startswith("True", start):
        return True
    depth, quote, i = 0, "", start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
                if depth == 0:
                    break
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
            if depth == 0:
                break
        i += 1
    try:
        return ast.literal_eval(text[start:i + 1])
    except (ValueError, SyntaxError):
        return _NOTHING


def cli_alternatives(suggestion: str) -> list[list[str]]:
    """Every command-line alternative ``suggestion`` offers, as argv pieces, in the order printed."""
    out: list[list[str]] = []
    for m in _CLI_MARK.finditer(suggestion):
        lexer = shlex.shlex(suggestion[m.end():], posix=True, punctuation_chars=";)")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in (";", ")", ";)") or token.startswith(")"):
                if current:
                    out.append(current)
                current = []
                if token.startswith(")"):
                    break
                continue
            if token.startswith("--") or current:
                current.append(token)
        if current:
            out.append(current)
    return out


def merged(options: dict[str, Any], alternative: dict[str, Any]) -> dict[str, Any]:
    """The options of the next try: what was passed before, with what the suggestion names."""
    out = dict(options)
    for k, v in alternative.items():
        if k == "model_kwargs":
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"state_dict.module.conv.weight": tensor}`` for every tensor in a loaded file's tree."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def file_tensor(flat: dict[str, torch.Tensor], container: str | None, source: str) -> torch.Tensor | None:
    """The file's tensor that a decision names (``source`` inside ``container``)."""
    for key in ((f"{container}.{source}" if container else source), source):
        if key in flat:
            return flat[key]
    return None


def renames_onto_one_name(rules: list[tuple[str, str]]) -> bool:
    """Whether rename rules send two different checkpoint modules onto one model name."""
    fixed = [replacement for _, replacement in rules if "\\" not in replacement]
    return len(fixed) != len(set(fixed))


def check_load(report_loaded: list[tuple[str, str | None, bool]], got: dict[str, torch.Tensor],
               flat: dict[str, torch.Tensor], container: str | None) -> list[str]:
    """What is wrong with a load: each ``(target, source, transformed)`` must hold the file's tensor."""
    wrong = []
    for target, source, transformed in report_loaded:
        if source is None or transformed:
            continue  # made by the module's own load logic or a layout transform: checked elsewhere
        want = file_tensor(flat, container, source)
        have = got.get(target)
        if want is None or have is None:
            wrong.append(f"{target}: cannot find {source!r} in the file or {target!r} in the model")
        elif not torch.equal(have.to(want.dtype), want):
            wrong.append(f"{target}: does not hold the file's {source!r}")
    return wrong
