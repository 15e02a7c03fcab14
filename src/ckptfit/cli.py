"""The ``ckptfit`` command: thin commands over the library.

Results go to stdout (human text, or one JSON object with ``--json``); errors are one line
on stderr with exit code 1 (``--debug`` shows the traceback); warnings go to stderr so they
never pollute parsed output.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import CheckpointError

__all__ = ["main"]

def parse_dtype(name: str | None):
    """``"bf16"`` -> ``torch.bfloat16`` (None stays None): :func:`ckptfit.dtypes.parse_dtype` as a usage error."""
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


def _stderr(msg: str) -> None:
    """One message on stderr; text from a file inside it (keys, class names) cannot drive the terminal."""
    from .report import printable

    click.echo(printable(msg), err=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one message on stderr and exit code 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except CheckpointError as e:
            if debug:
                raise
            _stderr(f"error: {e}")
            if "\n" not in str(e):
                _stderr("(run with --debug for the full traceback)")
            sys.exit(1)
        except (OSError, ValueError, TypeError, ImportError, RuntimeError, MemoryError) as e:
            if debug:
                raise
            _stderr(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _stderr("(run with --debug for the full traceback)")
            sys.exit(1)

    wrapper = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)
    return wrapper


def _console():
    from rich.console import Console

    import shutil

    width = None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 24)).columns)
    return Console(highlight=False, soft_wrap=False, width=width)


EPILOG = """\b
Examples:
  ckptfit demo
  ckptfit inspect resnet18.pth
  ckptfit load model_best.pth.tar --model timm:resnet18 --model-arg num_classes=10
  ckptfit plan dp_model.pth --model mypkg.models:SimpleCNN
  ckptfit diff old.pth new.safetensors
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ckptfit")
def main() -> None:
    """Put any PyTorch checkpoint into a model: correctly, safely, fast, with a report."""


class _Source(click.Path):
    """A local path that exists, or a source ckptfit fetches (hf://, https://, s3://, gs://)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .sources import is_remote

        if isinstance(value, str) and is_remote(value):
            return value
        return super().convert(value, param, ctx)


SOURCE = _Source(exists=True)

# ------------------------------------------------------------------------------------ inspect

@main.command(epilog="""\b
Examples:
  ckptfit inspect resnet18.pth
  ckptfit inspect ./tiny-bert --json
""")
@click.argument("path", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor instead of folded groups.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@handle_errors
def inspect(path: str, as_json: bool, show_all: bool, trust: bool) -> None:
    """Show what a checkpoint holds, without reading tensor data.

    Format, size, safety verdict, metadata, the candidate state dicts, and the tensors grouped
    by module with shapes, dtypes, parameter counts and bytes (repeated layers folded).
    """
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(path, trust=trust)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2, default=str))
    else:
        info.print(_console(), show_all=show_all)


# ------------------------------------------------------------------------------------ load / plan

def _load_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--model", "model_spec", metavar="SPEC",
                     help="torchvision:NAME, timm:NAME, hf:CONFIG_DIR or package.module:factory."),
        click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                     help="Constructor argument for the model (repeatable), e.g. num_classes=10."),
        click.option("--partial", is_flag=True, help="Allow model tensors to stay at init (new head)."),
        click.option("--use", metavar="NAME", help="Which state dict in the file: 'ema' or a key path."),
        click.option("--rename", "renames", multiple=True, metavar="'REGEX=>REPL'",
                     help="Rename checkpoint keys before matching (repeatable)."),
        click.option("--include", "include", multiple=True, metavar="GLOB", help="Load only matching tensors."),
        click.option("--exclude", "exclude", multiple=True, metavar="GLOB", help="Do not load matching tensors."),
        click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off."),
        click.option("--transform", "transform_rules", multiple=True, metavar="'PATTERN=KIND'",
                     help="Layout rule for tensors matching a glob or regex: transpose, none, split:N "
                          "(repeatable; see docs/porting.md)."),
        click.option("--adapt", "adapt", default=None, metavar="in_chans",
                     help="Adapt an RGB first convolution to the model's input channels (summed for 1, repeated "
                          "and rescaled for more), as timm does; reported as a transform."),
        click.option("--sha256", "sha256", default=None, metavar="HEX|POINTER",
                     help="Check the file's sha256 before reading it: 64 hex digits, or a Git LFS pointer file."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _rename_rules(renames: tuple[str, ...]) -> list[tuple[str, str]] | None:
    rules = []
    for r in renames:
        if "=>" not in r:
            raise click.BadParameter(f"{r!r}: write rename rules as 'REGEX=>REPLACEMENT'", param_hint="--rename")
        a, b = r.split("=>", 1)
        rules.append((a, b))
    return rules or None


def _transform_rules(rules: tuple[str, ...]) -> dict[str, str] | None:
    from .porting import parse_rules

    out: dict[str, str] = {}
    for r in rules:
        pattern, eq, kind = r.rpartition("=")
        if not eq or not pattern:
            raise click.BadParameter(f"{r!r}: write transform rules as 'PATTERN=KIND', e.g. "
                                     f"'*.c_attn.weight=transpose'", param_hint="--transform")
        out[pattern] = kind
    try:
        parse_rules(out)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--transform") from None
    return out or None


def _common(partial, use, renames, include, exclude, trust, transform_rules=(), adapt=None) -> dict[str, Any]:
    out = dict(partial=partial, use=use, rename=_rename_rules(renames), include=list(include) or None,
               exclude=list(exclude) or None, trust=trust)
    if transform_rules:
        out["transforms"] = _transform_rules(transform_rules)
    if adapt is not None:
        from ._adapt import parse_adapt

        try:
            out["adapt"] = parse_adapt(adapt)
        except ValueError as e:
            raise click.BadParameter(str(e).replace("adapt=", "--adapt ", 1), param_hint="--adapt") from None
    return out


def _factory(model_spec: str | None, model_args: tuple[str, ...]):
    from .specs import model_factory, parse_model_args

    if not model_spec:
        raise click.UsageError("pass --model SPEC (e.g. torchvision:resnet18, timm:resnet50, mypkg.mod:factory)")
    return model_factory(model_spec, parse_model_args(model_args))


@main.command(epilog="""\b
Examples:
  ckptfit load resnet18_imagenet.pth --model torchvision:resnet18 --model-arg num_classes=10 --partial
  ckptfit load model_best.pth.tar --model timm:resnet18 --use ema --verify --save fixed.safetensors
""")
@click.argument("ckpt", type=SOURCE)
@_load_options
@click.option("--device", default=None, metavar="DEVICE", help="Load onto this device, e.g. cuda:0 (default: cpu).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Cast floating tensors: fp32, fp16 or bf16 (default: keep the model's).")
@click.option("--verify", "do_verify", is_flag=True,
              help="Run one forward pass and check for NaN/Inf; exit 1 (and do not --save) if it fails.")
@click.option("--save", "save_path", type=click.Path(), default=None,
              help="Write the loaded model's state dict here (.safetensors, else torch.save); every tensor kept, "
                   "tied weights once, atomic and re-read to verify.")
@click.option("--mmap", "zero_copy", is_flag=True,
              help="Map the file into the model instead of copying it (zero-copy). Risk: if the file is rewritten "
                   "in place later the weights change with it, and if it is truncated the process dies (SIGBUS).")
@click.option("--no-crc", "no_crc", is_flag=True,
              help="Do not check the CRC-32 of the bytes read (only for a file you verified yourself).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def load(ckpt: str, model_spec: str | None, model_args: tuple[str, ...], partial: bool, use: str | None,
         renames: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], trust: bool,
         device: str | None, dtype: str | None, do_verify: bool, save_path: str | None, as_json: bool,
         transform_rules: tuple[str, ...] = (), zero_copy: bool = False, no_crc: bool = False,
         adapt: str | None = None, sha256: str | None = None) -> None:
    """Load a checkpoint into a model and print the report.

    The model is built from --model SPEC without random init, then filled from the checkpoint.
    Without --model, ckptfit builds the model the checkpoint records or identifies.
    """
    from .loading import build

    opts = _common(partial, use, renames, include, exclude, trust, transform_rules, adapt)
    opts.update(device=parse_device(device), dtype=parse_dtype(dtype))
    if zero_copy:
        opts["mmap"] = True
    if no_crc:
        opts["verify"] = False
    if sha256:
        opts["sha256"] = sha256
    if model_spec:
        model, report = build(_factory(model_spec, model_args), ckpt, **opts)
        chosen = None
    else:
        try:
            from .auto import from_checkpoint
        except ImportError:
            raise click.UsageError("pass --model SPEC (e.g. torchvision:resnet18)") from None
        model, report = from_checkpoint(ckpt, **opts)
        chosen = None  # the report says which model was built (report.model), in text and JSON
    result: dict[str, Any] = {"report": report.to_dict()}
    if chosen and not as_json:
        click.echo(f"model: {chosen}")
    if as_json:
        pass
    else:
        _console().print(report)
    if do_verify:
        from .verification import verify

        v = verify(model)
        result["verify"] = {"ok": v.ok, "input_shape": v.input_shape, "output_shapes": v.output_shapes,
                            "nonfinite": v.nonfinite, "error": v.error}
        if not as_json:
            click.echo(str(v))
        if not v.ok:
            if as_json:
                click.echo(json.dumps(result, indent=2, default=str))
            _stderr("error: verify failed: " + (v.error or f"{v.nonfinite} NaN/Inf values in the output")
                    + ("; not saved" if save_path else ""))
            sys.exit(1)
    if save_path:
        written = _save_state_dict(model, save_path, ckpt)
        result["saved"] = save_path
        result["save"] = written.to_dict()
        if not as_json:
            click.echo(f"saved {save_path}")
            if written.aliases:
                click.echo(f"  tied, written once ({len(written.aliases)}): "
                           + ", ".join(f"{a} = {c}" for a, c in list(written.aliases.items())[:3])
                           + (" ..." if len(written.aliases) > 3 else ""))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


def _save_state_dict(model, path: str, source: str):
    """The model's state dict through the one writer (safetensors for ``*.safetensors``, else torch.save)."""
    from .writing import write_checkpoint

    return write_checkpoint(path, model.state_dict(), source=source)


@main.command(epilog="""\b
Examples:
  ckptfit plan dp_model.pth --model mypkg.models:SimpleCNN
  ckptfit plan resnet18_imagenet.pth --model torchvision:resnet18 --model-arg num_classes=10 --partial
  ckptfit plan last.ckpt --model mypkg.models:SimpleCNN --resume
""")
@click.argument("ckpt", type=SOURCE)
@_load_options
@click.option("--json", "as_json", is_flag=True, help="Print every decision as JSON.")
@click.option("--resume", "resume_", is_flag=True,
              help="Also show how ckptfit.resume would map the saved optimizer state onto the model.")
@handle_errors
def plan(ckpt: str, model_spec: str | None, model_args: tuple[str, ...], partial: bool, use: str | None,
         renames: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], trust: bool,
         as_json: bool, transform_rules: tuple[str, ...] = (), resume_: bool = False,
         adapt: str | None = None, sha256: str | None = None) -> None:
    """Show what would be loaded where, and why, without loading.

    A dry run of `load`: decides from names, shapes and dtypes only, reads no tensor data,
    and exits 1 if the load would be refused (the problems and suggestions are printed).
    """
    from .loading import _parameters_on_meta, plan as make_plan
    from .report import LoadReport, render_plan

    factory = _factory(model_spec, model_args)
    with _parameters_on_meta():
        model = factory()
    p = make_plan(model, ckpt, **_common(partial, use, renames, include, exclude, trust, transform_rules, adapt),
                  sha256=sha256)
    resumed = None
    if resume_:  # how ckptfit.resume would map the optimizer state (described by the saved groups)
        from .resume import describe_resume

        resumed = describe_resume(model, ckpt, p, trust=trust)
    if as_json:
        d = LoadReport.from_plan(p).to_dict()
        d.update(ok=p.ok, problems=list(p.problems), suggestions=list(p.suggestions))
        if resumed is not None:
            d["resume"] = resumed.to_dict()
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(render_plan(p, max_lines=40))
        if resumed is not None:
            click.echo(str(resumed))
    if not p.ok or (resumed is not None and not resumed.ok):
        sys.exit(1)


# ------------------------------------------------------------------------------------ diff

@main.command(epilog="""\b
Examples:
  ckptfit diff epoch10.pth epoch20.pth
  ckptfit diff resnet18.pth torchvision:resnet18 --model-arg num_classes=10
""")
@click.argument("a")
@click.argument("b")
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V", help="Constructor argument when B is a SPEC.")
@click.option("--no-values", is_flag=True, help="Compare names, shapes and dtypes only (read no tensor data).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the files). Default: off.")
@handle_errors
def diff(a: str, b: str, model_args: tuple[str, ...], no_values: bool, as_json: bool, trust: bool) -> None:
    """Compare two checkpoints, or a checkpoint and a model SPEC.

    Lists added, removed and renamed tensors, shape and dtype changes, and for tensors in both
    the largest absolute difference; keys are grouped and folded.
    """
    from .diffing import diff_sources

    result = diff_sources(a, b, model_args=model_args, values=not no_values, trust=trust)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(str(result))


# ------------------------------------------------------------------------------------ commands from other modules
# (each module defines one click command; registered here)
from ._cli_demo import demo as _demo; main.add_command(_demo)  # noqa: E402,E702
from ._cli_scan import scan_command; main.add_command(scan_command)  # noqa: E402,E702
from ._cli_more import identify_command; main.add_command(identify_command)  # noqa: E402,E702
from ._cli_more import convert_command; main.add_command(convert_command)  # noqa: E402,E702


if __name__ == "__main__":  # pragma: no cover
    main()
