"""``ckptfit scan PATH [--json]``: what a file's pickles would run, without running anything.

Exit status: 0 clean (every global known to be safe), 1 error (one line on stderr), 2 dangerous,
3 not known to be safe (would import something outside the allowlist).
"""
from __future__ import annotations

import json
import sys

import click

from .errors import CheckpointError

__all__ = ["scan_command"]


@click.command("scan", epilog="""\b
Examples:
  ckptfit scan downloaded.pth
  ckptfit scan model.ckpt --json | jq .dangerous
Exit status: 0 clean, 1 error, 2 dangerous, 3 not known to be safe, 4 damaged (a CRC mismatch).
""")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def scan_command(path: str, as_json: bool, debug: bool) -> None:
    """Show what a file's pickles would run, without running it.

    Lists every global, call and object construction in the file's pickles, classed as tensor
    machinery, known data, known inert classes, unknown or dangerous, plus anomalies (CRC,
    trailing data, extra pickles). The verdict is "clean" only when every global is known to be
    safe: torch.load(weights_only=False) would then run no code from the file. Anything else
    the file would import is "not known to be safe" (exit 3), even though ckptfit itself loads
    it as an inert placeholder.
    Every pickle is run on ckptfit's restricted interpreter, the one the loader uses: nothing in
    the file runs and no module it names is imported. Works on torch zip and TorchScript
    archives, legacy torch files, plain pickles, .npy/.npz, safetensors and checkpoint folders.
    """
    from .scan import scan

    try:
        report = scan(path)
    except CheckpointError as e:
        if debug:
            raise
        click.echo(f"error: {str(e).splitlines()[0]}", err=True)
        sys.exit(1)
    except (OSError, ValueError, RuntimeError) as e:  # as the other commands (cli.handle_errors)
        if debug:
            raise
        click.echo(f"error: {path}: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        from rich.console import Console

        Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(report.__rich__())
    if report.verdict == "error":
        click.echo(f"error: {path}: {report.errors[0].splitlines()[0]}", err=True)
    sys.exit(report.exit_code)
