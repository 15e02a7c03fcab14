"""What every ``ckptfit`` command shares: the exit codes, the one error path, option parsers, output.

The command modules (:mod:`ckptfit.cli`, ``_cli_load``, ``_cli_scan``, ``_cli_identify``,
``_cli_convert``, ``_cli_demo``) import from here and never from each other, so any of them
can be imported first (``python -m ckptfit.cli`` works).

Errors take one path, :func:`fail`: one ``error: ...`` line on stderr (plus its ``hint:``
line) and exit code 1; with ``--json``, one ``{"error": {"type", "message", "hint"}}``
object on stdout instead, with the same exit code. Usage errors (a mistyped option, a
missing file argument) exit 2, also as JSON under ``--json`` (:class:`JsonAwareGroup`).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .errors import CheckpointError

__all__ = ["EXIT_CODES", "EXIT_STATUS_HELP", "JsonAwareGroup", "SOURCE", "console", "echo_json", "fail",
           "handle_errors", "parse_device", "parse_dtype", "stderr"]

# The one table of exit codes: distinct per meaning, the same for every command.
EXIT_CODES: dict[str, int] = {
    "ok": 0,                    # done: loaded, written, clean, identified, the same
    "error": 1,                 # a ckptfit error: unreadable file, refused load or plan, failed --verify
    "usage": 2,                 # a usage error: unknown option, bad value, missing file argument
    "not known to be safe": 3,  # scan: would import something outside the allowlist
    "damaged": 4,               # scan: bytes fail their CRC check
    "dangerous": 5,             # scan: would run code under pickle / torch.load(weights_only=False)
    "unknown": 6,               # identify: no architecture fits the file
    "differ": 7,                # diff: the two differ
}

EXIT_STATUS_HELP = """\b
Exit status (every command; docs/cli.md):
  0 ok   1 error or refused   2 usage error
  3 scan: not known to be safe   4 scan: damaged   5 scan: dangerous
  6 identify: unknown   7 diff: they differ
"""


def stderr(msg: str) -> None:
    """One message on stderr; text from a file inside it (keys, class names) cannot drive the terminal."""
    from .rendering import printable

    click.echo(printable(msg), err=True)


def echo_json(obj: Any) -> None:
    """One JSON object on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str))


def error_object(e: BaseException) -> dict[str, Any]:
    """``{"error": {"type", "message", "hint"}}`` for an exception (a refused load adds ``problems``)."""
    if isinstance(e, CheckpointError):
        message, hint = e.summary, e.hint
    elif isinstance(e, click.ClickException):
        message, hint = e.format_message(), "run the command with --help for its options"
    else:
        message, hint = f"{type(e).__name__}: {e}", "run with --debug for the full traceback"
    error: dict[str, Any] = {"type": type(e).__name__, "message": message, "hint": hint}
    if getattr(e, "problems", None):  # LoadError: every problem, one line each
        error["problems"] = list(e.problems)
    return {"error": error}


def fail(e: BaseException, *, as_json: bool, code: int = EXIT_CODES["error"]) -> NoReturn:
    """The one way a command reports an error: text on stderr, or JSON on stdout; then exit ``code``."""
    if as_json:
        echo_json(error_object(e))
    elif isinstance(e, CheckpointError):
        stderr(f"error: {e}")  # the message, then its "  hint: ..." line
        if "\n" not in str(e):
            stderr("(run with --debug for the full traceback)")
    else:
        text = str(e).splitlines()[0] if str(e) else ""
        stderr(f"error: {type(e).__name__}: {text}")
        stderr("(run with --debug for the full traceback)")
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--debug``; library errors become :func:`fail` (exit 1), as JSON when the command got ``--json``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: JsonAwareGroup
        except BrokenPipeError:  # the reader went away (`ckptfit inspect F | head`): stop quietly, as cat does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
            sys.exit(EXIT_CODES["error"])
        except (CheckpointError, OSError, ValueError, TypeError, ImportError, RuntimeError, MemoryError) as e:
            if debug:
                raise
            fail(e, as_json=bool(kwargs.get("as_json")))

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


class JsonAwareGroup(click.Group):
    """A group whose commands report usage errors as JSON (exit 2) when ``--json`` is among their arguments."""

    def invoke(self, ctx: click.Context) -> Any:
        argv = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        options = argv[:argv.index("--")] if "--" in argv else argv  # after "--" only file names
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if "--json" not in options:
                raise
            echo_json(error_object(e))
            raise click.exceptions.Exit(EXIT_CODES["usage"]) from None


class _Source(click.Path):
    """A local path that exists, or a source ckptfit fetches (hf://, https://, s3://, gs://)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .sources import is_remote

        if isinstance(value, str) and is_remote(value):
            return value
        return super().convert(value, param, ctx)


SOURCE = _Source(exists=True)


def parse_dtype(name: str | None):
    """``"bf16"``/``"float16"`` -> the torch dtype (None stays None): :func:`ckptfit.dtypes.parse_dtype`
    (the one vocabulary of load and convert), its error as a usage error on ``--dtype``."""
    if name is None:
        return None
    from .dtypes import parse_dtype as parse

    try:
        return parse(name)
    except CheckpointError as e:
        raise click.BadParameter(e.detail, param_hint="--dtype") from e


def parse_device(name: str | None) -> str | None:
    """Check ``--device`` before anything is built: a clear usage error for a typo or a missing GPU."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"unknown device {name!r}; use e.g. cpu, cuda, cuda:1 or mps",
                                 param_hint="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{name!r}: CUDA is not available on this machine (torch.cuda.is_available() "
                                 "is False); use cpu", param_hint="--device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                 param_hint="--device")
    return name


def console():
    """A rich console for reports: no highlighting, wide when not a terminal (pipes, tests)."""
    import shutil

    from rich.console import Console

    width = None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 24)).columns)
    return Console(highlight=False, soft_wrap=False, width=width)
