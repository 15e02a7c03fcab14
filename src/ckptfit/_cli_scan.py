"""``ckptfit scan PATH [--json]``: what a file's pickles would run, without running anything
(registered in :mod:`ckptfit.cli`).

Exit status (the CLI's one table, :data:`ckptfit._cli_common.EXIT_CODES`): 0 clean, 1 error,
3 not known to be safe, 4 damaged, 5 dangerous.
"""
from __future__ import annotations

import sys

import click

from ._cli_common import EXIT_CODES, SOURCE, echo_json, handle_errors, stderr

__all__ = ["scan_command"]


@click.command("scan", epilog="""\b
Examples:
  ckptfit scan downloaded.pth
  ckptfit scan model.ckpt --json | jq .dangerous
Exit status: 0 clean, 1 error, 2 usage error, 3 not known to be safe, 4 damaged (a CRC mismatch), 5 dangerous.
""")
@click.argument("path", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@handle_errors
def scan_command(path: str, as_json: bool) -> None:
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
    from .scanning import scan

    report = scan(path)
    if as_json:
        echo_json(report.to_dict())
    else:
        from rich.console import Console

        Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(report.__rich__())
    if report.verdict == "error" and not as_json:
        stderr(f"error: {path}: {report.errors[0].splitlines()[0]}")
    sys.exit(EXIT_CODES["ok"] if report.verdict == "clean" else EXIT_CODES[report.verdict])
