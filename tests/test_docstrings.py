"""The public API documents itself: ``help(ckptfit.load)`` is enough to use it.

Every public function in ``ckptfit.__all__`` has a Google-style docstring: a one-line
summary, ``Args:`` when it takes arguments (or an explicit "same arguments as
:func:`other`" pointing at a documented function), ``Returns:`` when it returns
something, and an ``Example:``. Every public class, exceptions included, has a docstring.
"""
from __future__ import annotations

import inspect
import re

import pytest

import ckptfit

PUBLIC = [name for name in ckptfit.__all__ if callable(getattr(ckptfit, name))]
FUNCTIONS = [n for n in PUBLIC if inspect.isfunction(getattr(ckptfit, n))]
CLASSES = [n for n in PUBLIC if inspect.isclass(getattr(ckptfit, n))]


def _sections(doc: str) -> set[str]:
    return set(re.findall(r"^(\w[\w ]*):\s*$", doc, re.M))


def test_public_surface_is_what_we_document() -> None:
    assert {"open", "load", "plan", "build", "verify"} <= set(FUNCTIONS)
    assert not [n for n in ckptfit.__all__ if not hasattr(ckptfit, n)]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_docstring(name: str) -> None:
    fn = getattr(ckptfit, name)
    doc = inspect.getdoc(fn)
    assert doc, f"ckptfit.{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) <= 100, f"ckptfit.{name}: summary line {summary!r}"
    sections = _sections(doc)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    if params:
        same_as = re.search(r"same arguments as :func:`(\w+)`", doc)
        if same_as:
            other = inspect.getdoc(getattr(ckptfit, same_as.group(1))) or ""
            assert "Args" in _sections(other), f"ckptfit.{name} points to {same_as.group(1)}, which has no Args"
        else:
            assert "Args" in sections, f"ckptfit.{name} takes arguments but has no 'Args:' section"
            for p in params:
                if p.kind is p.VAR_KEYWORD:
                    assert f"**{p.name}" in doc, f"ckptfit.{name}: **{p.name} is not described"
                else:
                    assert re.search(rf"^\s+{p.name}:", doc, re.M), f"ckptfit.{name}: argument {p.name!r} not in Args"
    if inspect.signature(fn).return_annotation not in (None, "None", inspect.Signature.empty):
        assert "Returns" in sections, f"ckptfit.{name} has no 'Returns:' section"
    assert sections & {"Example", "Examples"}, f"ckptfit.{name} has no 'Example:' section"
    assert ">>>" in doc.split("Example", 1)[1], f"ckptfit.{name}: the Example shows no code"


@pytest.mark.parametrize("name", CLASSES)
def test_class_docstring(name: str) -> None:
    cls = getattr(ckptfit, name)
    doc = cls.__dict__.get("__doc__")
    assert doc and doc.strip(), f"ckptfit.{name} has no docstring of its own"


def test_help_of_load_reads_well() -> None:
    doc = inspect.getdoc(ckptfit.load) or ""
    for word in ("Args:", "Returns:", "Raises:", "Example:", "partial", "LoadReport"):
        assert word in doc
