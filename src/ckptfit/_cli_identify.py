"""``ckptfit identify``: the command over :func:`ckptfit.identification.identify` and its text rendering
(registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import json
import sys

import click

from ._cli_common import EXIT_CODES, SOURCE, echo_json, handle_errors, stderr

__all__ = ["identify_command", "render_identification", "SUPPORT"]

SUPPORT = 0.5  # a candidate below this score shares too little with the file to be worth listing


@click.command("identify", epilog="""\b
Examples:
  ckptfit identify resnet_final.pth
  ckptfit identify last.ckpt --json --top 3
Exit status: 0 identified, 6 unknown, 1 error, 2 usage error.
""")
@click.argument("path", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text (every candidate, scored).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 100), help="How many candidates to list.")
@click.option("--use", metavar="NAME", default=None, help="Which state dict in the file: 'ema' or a key path.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@handle_errors
def identify_command(path: str, as_json: bool, top: int, use: str | None, trust: bool) -> None:
    """Name the architecture of a bare state dict, and its arguments.

    From names and shapes alone (num_classes, in_chans, sizes ...). Compares the file with every
    torchvision builder, timm's registry and common transformers families, built on the meta
    device (no download); the index is cached in ~/.cache/ckptfit/identify ($CKPTFIT_CACHE), the
    first run takes a minute. When nothing fits, only candidates sharing at least half of their
    tensors with the file are listed, else the closest one and why it fails. Exit code 6 when unknown.
    """
    from .identification import identify

    result = identify(path, top=top, use=use, trust=trust)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(render_identification(result))
        for note in result.notes:
            stderr(f"note: {note}")
    if not result.known:
        sys.exit(EXIT_CODES["unknown"])


def _call(c) -> str:
    return f"{c.architecture}({', '.join(f'{k}={v!r}' for k, v in c.kwargs.items())})"


def render_identification(result) -> str:
    """The text of ``ckptfit identify``: the answer, or "unknown" with only the candidates that have real support."""
    from .rendering import printable

    where = f"{result.path}" + (f" (container {result.container!r})" if result.container else "")
    if result.known:
        return str(result)  # the identification, its evidence and the command that builds it
    lines = [f"{where}: unknown architecture ({result.num_tensors} tensors)"]
    supported = [c for c in result.candidates if c.score >= SUPPORT]
    if supported:
        lines[0] += f"; candidates sharing at least {SUPPORT:.0%} of their tensors with it:"
        for c in supported:
            lines.append(f"  {c.score:.3f}  {_call(c)}: {c.explained}")
            lines.extend(f"           {d}" for d in c.differences[:4])
        if supported[0].spec:
            kw = "".join(f" --model-arg {k}={json.dumps(v)}" for k, v in supported[0].kwargs.items())
            lines.append(f"  to see what differs: ckptfit plan {result.path} --model {supported[0].spec}{kw}")
    elif result.candidates and result.candidates[0].score > 0:
        c = result.candidates[0]
        lines[0] += "; no known architecture fits it"
        lines.append(f"  closest: {_call(c)}, score {c.score:.3f}: {c.explained}")
        lines.extend(f"    {d}" for d in c.differences[:4])
        lines.append(f"  this is too little in common to be a guess (a candidate needs a score of {SUPPORT}); "
                     "pass the model yourself with --model SPEC")
    else:
        lines[0] += "; no known architecture shares a tensor name and shape with it"
        lines.append("  pass the model yourself with --model SPEC (see docs/cli.md)")
    if result.searched:
        lines.append("  searched: " + "; ".join(result.searched))
    return printable("\n".join(lines))
