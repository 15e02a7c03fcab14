"""The ``ckptfit`` command: thin commands over the library.

Results go to stdout (human text, or one JSON object with ``--json``); errors are one line
on stderr with exit code 1 (``--debug`` shows the traceback), or one JSON ``error`` object
on stdout with ``--json``; warnings go to stderr so they never pollute parsed output. The
exit codes are one table, :data:`ckptfit._cli_common.EXIT_CODES` (``ckptfit --help``).

This module defines the group and the small commands (``inspect``, ``diff``); the others
live in ``_cli_load`` (load, plan), ``_cli_convert``, ``_cli_identify``, ``_cli_scan`` and
``_cli_demo``. They import only :mod:`ckptfit._cli_common`, never this module.
"""
from __future__ import annotations

import os
import sys

import click

from ._cli_common import EXIT_CODES, EXIT_STATUS_HELP, SOURCE, JsonAwareGroup, console, echo_json, handle_errors
from ._cli_convert import convert_command
from ._cli_demo import demo
from ._cli_identify import identify_command
from ._cli_load import load, plan
from ._cli_scan import scan_command
from ._cli_verify import verify_command

__all__ = ["main"]

EPILOG = """\b
Examples:
  ckptfit demo
  ckptfit inspect resnet18.pth
  ckptfit load model_best.pth.tar --model timm:resnet18 --model-arg num_classes=10
  ckptfit load last.pth --model ./net.py:Net --save model.safetensors
  ckptfit convert train_dp.pth model.safetensors --strip-prefix module.
  ckptfit diff old.pth new.safetensors

\b
Model SPECs (--model): torchvision:NAME, timm:NAME, hf:CONFIG_DIR, package.module:ATTR,
path/to/file.py:ATTR; --model-arg values are Python literals. See docs/cli.md.

""" + EXIT_STATUS_HELP


@click.group(cls=JsonAwareGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ckptfit")
def main() -> None:
    """Put any PyTorch checkpoint into a model: correctly, safely, fast, with a report."""


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
        echo_json(info.to_dict())
    else:
        info.print(console(), show_all=show_all)


# ------------------------------------------------------------------------------------ diff

@main.command(epilog="""\b
Examples:
  ckptfit diff epoch10.pth epoch20.pth
  ckptfit diff resnet18.pth torchvision:resnet18 --model-arg num_classes=10
  ckptfit diff dino.pth dino.pth --use-a student --use-b teacher
  ckptfit diff last.pth best.pth --use ema
Exit status: 0 the same, 7 they differ, 1 error, 2 usage error (as diff(1), but 1 is kept for errors).
""")
@click.argument("a")
@click.argument("b")
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V", help="Constructor argument when B is a SPEC.")
@click.option("--no-values", is_flag=True, help="Compare names, shapes and dtypes only (read no tensor data).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the files). Default: off.")
@click.option("--use", metavar="NAME", help="Which state dict in each file, as load takes it: 'ema', 'teacher' or a "
                                            "key path.")
@click.option("--use-a", "use_a", metavar="NAME", help="Which state dict in A (over --use).")
@click.option("--use-b", "use_b", metavar="NAME", help="Which state dict in B (over --use).")
@handle_errors
def diff(a: str, b: str, model_args: tuple[str, ...], no_values: bool, as_json: bool, trust: bool,
         use: str | None = None, use_a: str | None = None, use_b: str | None = None) -> None:
    """Compare two checkpoints, or a checkpoint and a model SPEC.

    Lists added, removed and renamed tensors, shape and dtype changes, and for tensors in both
    the largest absolute difference; keys are grouped and folded. Exits 0 when they are the
    same (names, shapes, dtypes and, unless --no-values, values), 7 when they differ.
    """
    from .diffing import diff_sources

    if use_b is not None and not os.path.exists(b) and ":" in b:
        raise click.BadParameter(f"{use_b!r} picks a state dict inside a checkpoint file, but B ({b!r}) is a model "
                                 f"SPEC; leave --use-b out", param_hint="--use-b")
    result = diff_sources(a, b, model_args=model_args, values=not no_values, trust=trust, use=use, use_a=use_a,
                          use_b=use_b)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(str(result))
    if not result.identical:
        sys.exit(EXIT_CODES["differ"])


for _command in (load, plan, convert_command, identify_command, scan_command, demo, verify_command):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
