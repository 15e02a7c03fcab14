"""Every example in the docs runs, so the docs cannot rot.

Each ``## `` section of ``docs/troubleshooting.md``, ``docs/porting.md``, ``docs/sources.md`` and ``README.md`` runs in a fresh empty
directory, its blocks in order, sharing one namespace:

- a ```` ```python ```` block is executed; a line ending in ``# raises Name: fragment`` must
  raise an exception of that class whose message contains the fragment; a ```` ```text ````
  block right after it holds the expected output;
- a ```` ```console ```` block holds ``$ ckptfit ...`` commands, each followed by its expected
  output; the commands run through click's runner (exit code 0 unless an ``error:`` line or
  a plan ``— refused`` is shown; a command ending in ``# exit N`` must exit with N).

Expected output is checked line by line, in order, as a subsequence of the real output
(a doc may leave lines out); ``...`` inside a line matches anything (timings, temp paths).
``` ```bash ``` blocks (installing) are not run here; ``.ci/run`` runs the README's.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptfit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "troubleshooting.md", ROOT / "README.md", ROOT / "docs" / "porting.md", ROOT / "docs" / "cli.md",
        ROOT / "docs" / "sources.md", ROOT / "docs" / "verify.md"]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_RAISES = re.compile(r"^(?P<indent>[ \t]*)(?P<stmt>\S.*?)\s+# raises (?P<exc>\w+)(?::\s*(?P<msg>.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence in the file
    expected: str | None = None  # for python: the ```text block right after it


def _sections(path: Path) -> list[tuple[str, list[Block]]]:
    """``[(heading, blocks)]`` for every ``## `` section holding a runnable block."""
    text = path.read_text(encoding="utf-8")
    out: list[tuple[str, list[Block]]] = []
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M)] + [len(text)]
    for a, b in zip(starts, starts[1:]):
        body = text[a:b]
        heading = body.splitlines()[0][3:].strip()
        blocks: list[Block] = []
        prev_end = None
        for m in _FENCE.finditer(body):
            lang = m.group(1)
            line = text.count("\n", 0, a + m.start()) + 1
            if lang == "text" and blocks and blocks[-1].lang == "python" and prev_end is not None \
                    and not body[prev_end:m.start()].strip():
                blocks[-1].expected = m.group(2)
            elif lang in ("python", "console"):
                blocks.append(Block(lang, m.group(2), line))
            prev_end = m.end()
        if blocks:
            out.append((heading, blocks))
    return out


def _cases() -> list:
    cases = []
    for path in DOCS:
        for heading, blocks in _sections(path):
            cases.append(pytest.param(blocks, id=f"{path.name}:{heading[:60]}"))
    return cases


def _pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in line.split("...")))


def _check_output(expected: str, actual: str, where: str) -> None:
    want = [ln.rstrip() for ln in expected.splitlines() if ln.strip()]
    got = [_ANSI.sub("", ln).rstrip() for ln in actual.splitlines()]
    i = 0
    for w in want:
        pat = _pattern(w)
        while i < len(got) and not pat.fullmatch(got[i]):
            i += 1
        if i == len(got):
            raise AssertionError(f"{where}: expected line not found (in order):\n  {w}\nactual output:\n{actual}")
        i += 1


@contextlib.contextmanager
def _raises(name: str, fragment: str | None):
    """The check behind ``# raises Name: fragment``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - checked below
        names = {c.__name__ for c in type(e).__mro__}
        assert name in names, f"expected {name}, got {type(e).__name__}: {e}"
        if fragment:
            text = " ".join(_ANSI.sub("", str(e)).split())
            frag = fragment.strip().rstrip(".… ").strip()
            assert _pattern(frag).search(text), f"{name} message lacks {frag!r}:\n{text}"
    else:
        if fragment and "CUDA device" in fragment and torch.cuda.is_available():
            return  # a file saved on a GPU loads fine where there is one
        raise AssertionError(f"expected {name}: {fragment} to be raised")


def _rewrite_raises(code: str) -> str:
    lines = []
    for line in code.splitlines():
        m = _RAISES.match(line)
        if m:
            indent = m.group("indent")
            lines.append(f"{indent}with __raises__({m.group('exc')!r}, {m.group('msg')!r}):")
            lines.append(f"{indent}    {m.group('stmt')}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _run_python(block: Block, namespace: dict, where: str) -> None:
    code = _rewrite_raises(block.code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - our own docs
    if block.expected is not None:
        _check_output(block.expected, out.getvalue(), where)


def _run_console(block: Block, where: str) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:].strip(), []))
        elif commands:
            commands[-1][1].append(line)
    assert commands, f"{where}: a console block without '$ ' commands"
    for command, expected in commands:
        status = re.search(r"\s+# exit (\d+)$", command)
        argv = shlex.split(command[:status.start()] if status else command)
        assert argv[0] == "ckptfit", f"{where}: console blocks run only ckptfit commands, not {command!r}"
        result = CliRunner().invoke(main, argv[1:], catch_exceptions=False)
        if status:
            assert result.exit_code == int(status.group(1)), \
                f"{where}: `{command}` exited {result.exit_code}:\n{result.output}"
        else:
            shown_error = any(ln.startswith(("error:", "Refused:")) for ln in expected)
            assert (result.exit_code != 0) == shown_error, \
                f"{where}: `{command}` exited {result.exit_code}:\n{result.output}"
        _check_output("\n".join(expected), result.output, f"{where}: `{command}`")


@pytest.mark.parametrize("blocks", _cases())
def test_doc_section_runs(blocks: list[Block], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / ".ckptfit-cache"))
    environ = dict(os.environ)  # a page may set variables (HF_HUB_OFFLINE ...): they end with its section
    namespace: dict = {"__name__": "__doc__", "__raises__": _raises}
    try:
        for block in blocks:
            where = f"line {block.line}"
            if block.lang == "python":
                _run_python(block, namespace, where)
            else:
                _run_console(block, where)
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_every_troubleshooting_entry_has_a_runnable_example() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, re.M)
    runnable = {h for h, _ in _sections(ROOT / "docs" / "troubleshooting.md")}
    assert len(headings) >= 14
    assert [h for h in headings if h not in runnable] == []


def test_runner_checks_output_and_raises() -> None:
    _check_output("Loaded ... tensors\n  names: strip 'module.'", "Loaded 3/3 tensors\n  x\n  names: strip 'module.'",
                  "self-test")
    with pytest.raises(AssertionError, match="not found"):
        _check_output("names: strip 'model.'", "names: strip 'module.'", "self-test")
    ns: dict = {"__raises__": _raises}
    exec(_rewrite_raises("int('x')  # raises ValueError: invalid literal"), ns)  # noqa: S102
    with pytest.raises(AssertionError, match="expected ValueError"):
        exec(_rewrite_raises("int('1')  # raises ValueError: invalid literal"), ns)  # noqa: S102


def test_ci_runs_exactly_the_readme_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [ln for m in re.finditer(r"^```bash\n(.*?)^```", setup, re.M | re.S) for ln in m.group(1).splitlines()
                if ln.strip()]
    assert commands == ['pip install -c constraints.txt -e ".[vision]" && ckptfit demo',
                        'pip install -c constraints.txt -e ".[dev]" && pytest']
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert "torch==" in pins and "torchvision==" in pins
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert "set -euo pipefail" in ci
    assert [ln for ln in ci if "pip install" in ln] == [f"( {c} )" for c in commands]


def test_every_test_the_readme_names_for_a_promise_exists() -> None:
    """The README's promise table names tests; each must exist, so that no promise points at nothing."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## The promises, and the tests that hold them", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", table)
    assert len(named) >= 10
    for file, func in named:
        path = ROOT / "tests" / file
        assert path.is_file(), file
        if func:
            assert re.search(rf"^def {func}\(", path.read_text(encoding="utf-8"), re.M), f"{file}::{func}"
