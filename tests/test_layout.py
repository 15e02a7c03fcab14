"""The package's layout rules, checked on the source (AST), not by convention.

- No module imports a private name (``_x``) from another ckptfit module: a name used across
  modules is public inside the package, in the module that owns it. Private *modules*
  (``from . import _zip``, ``from ._gc import gc_paused``) are fine: the rule is about names.
- No import cycles between ckptfit modules. Imports that run when a module is imported count
  (module level, ``try``/``if`` blocks included); imports inside functions (deferred until
  called, used to keep ``import ckptfit`` free of torch) and ``if TYPE_CHECKING:`` blocks do not.
  Importing ``ckptfit.a.b`` also runs the package ``ckptfit.a``, so that counts as an edge too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "ckptfit"
PACKAGE = "ckptfit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute module name ``from <level dots><module> import ...`` refers to in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str) -> list[tuple[ast.ImportFrom | ast.Import, bool]]:
    """Every import in module ``name``, with whether it runs at import time."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found: list[tuple[ast.ImportFrom | ast.Import, bool]] = []

    def walk(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, eager))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                walk(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    walk(ast.Module(body=[sub], type_ignores=[]), False)
                for sub in child.orelse:
                    walk(ast.Module(body=[sub], type_ignores=[]), eager)
            else:
                walk(child, eager)

    walk(tree, True)
    return found


def _targets(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    """(ckptfit module imported, name taken from it or None) for one import statement."""
    out: list[tuple[str, str | None]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                out.append((alias.name, None))
        return out
    mod = _resolve(importer, node.level, node.module)
    if mod != PACKAGE and not mod.startswith(PACKAGE + "."):
        return out
    for alias in node.names:
        sub = f"{mod}.{alias.name}"
        if sub in MODULES:  # a submodule, not a name defined in mod
            out.append((sub, None))
        else:
            out.append((mod, alias.name))
    return out


def test_the_walk_sees_the_package():
    assert {"ckptfit", "ckptfit.loading", "ckptfit.matching", "ckptfit.formats"} <= set(MODULES)
    assert any(_targets("ckptfit.loading.loader", n) for n, _ in _imports("ckptfit.loading.loader"))


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for name in MODULES:
        for node, _eager in _imports(name):
            for mod, taken in _targets(name, node):
                if taken is not None and taken.startswith("_") and not taken.startswith("__") and mod != name:
                    offenders.append(f"{MODULES[name].relative_to(ROOT.parent)}:{node.lineno}: "
                                     f"from {mod} import {taken}")
    assert not offenders, ("private names imported from another module (make the name public in the module "
                           "that owns it):\n" + "\n".join(offenders))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for node, eager in _imports(name):
            if not eager:
                continue
            for mod, _taken in _targets(name, node):
                parts = mod.split(".")
                for i in range(2, len(parts) + 1):  # the module and the packages it runs on the way
                    dep = ".".join(parts[:i])
                    if dep in MODULES and dep not in own:
                        graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" <-> ".join(c) for c in cycles)


_IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "ckptfit" or m.startswith("ckptfit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_first():
    """Each module can be the first ckptfit module imported (no cycle hidden by import order)."""
    names = sorted(n for n in MODULES if n != PACKAGE)
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *names], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_submodule_is_named_like_a_public_name():
    """``import ckptfit.x`` sets the attribute ``ckptfit.x``: a module named like a verb would shadow it."""
    import ckptfit

    clash = sorted(n.split(".")[1] for n in MODULES if n.count(".") >= 1 and n.split(".")[1] in ckptfit.__all__)
    assert not clash, f"submodules named like public names of ckptfit: {clash}"


_VERBS_AFTER_SUBMODULES = """
import importlib, sys
import ckptfit
for name in sys.argv[1:]:
    importlib.import_module(name)
bad = [v for v in ckptfit.__all__ if v != "__version__" and getattr(ckptfit, v) is None]
verbs = ["open", "plan", "load", "build", "from_checkpoint", "verify", "resume", "identify", "convert", "scan", "diff"]
bad += [v for v in verbs if not callable(getattr(ckptfit, v)) or isinstance(getattr(ckptfit, v), type(sys))]
print(bad)
sys.exit(1 if bad else 0)
"""


def test_every_public_name_resolves_after_every_submodule_is_imported():
    names = sorted(n for n in MODULES if n != PACKAGE)
    r = subprocess.run([sys.executable, "-c", _VERBS_AFTER_SUBMODULES, *names], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_importing_ckptfit_stays_torch_free():
    code = "import sys, ckptfit, ckptfit.errors; dir(ckptfit); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
