"""``ckptfit identify`` and ``ckptfit convert``: thin commands over :mod:`ckptfit.identify` and
:mod:`ckptfit.convert` (registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import json
import sys

import click

from .cli import handle_errors, parse_dtype  # cli imports this module after defining them

__all__ = ["identify_command", "convert_command"]


@click.command("identify", epilog="""\b
Examples:
  ckptfit identify resnet_final.pth
  ckptfit identify last.ckpt --json --top 3
""")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 100), help="How many candidates to list.")
@click.option("--use", metavar="NAME", default=None, help="Which state dict in the file: 'ema' or a key path.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@handle_errors
def identify_command(path: str, as_json: bool, top: int, use: str | None, trust: bool) -> None:
    """Name the architecture of a bare state dict, and its arguments.

    From names and shapes alone (num_classes, in_chans, sizes ...). Compares the file with every torchvision builder, timm's registry and common transformers
    families, built on the meta device (no download); the index is cached in ~/.cache/ckptfit
    ($CKPTFIT_CACHE_DIR), the first run takes a minute. Exit code 2 when unknown.
    """
    from .identify import identify

    result = identify(path, top=top, use=use, trust=trust)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(str(result))
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    if not result.known:
        sys.exit(2)


@click.command("convert", epilog="""\b
Examples:
  ckptfit convert last.ckpt model.safetensors --only-weights --dtype bf16
  ckptfit convert model_best.pth.tar ./sharded --shard-size 2GB --use ema
""")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, show_default="keep",
              help="Cast floating weights to this dtype.")
@click.option("--use", metavar="NAME", default=None, show_default="the model's own weights",
              help="Which state dict in the file: 'ema' or a key path.")
@click.option("--only-weights", is_flag=True, help="Write the weights alone: no optimizer, scheduler or metadata.")
@click.option("--shard-size", metavar="SIZE", default=None, show_default="one file",
              help="Write safetensors shards of at most SIZE (e.g. 2GB) plus model.safetensors.index.json.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch", "dcp"]), default=None,
              show_default="from DST", help="Output format.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def convert_command(src: str, dst: str, dtype: str | None, use: str | None, only_weights: bool,
                    shard_size: str | None, fmt: str | None, trust: bool, as_json: bool) -> None:
    """Convert or slim a checkpoint, atomically and verified.

    Writes safetensors (one file or shards), a torch file or a DCP folder. Reads any format ckptfit reads, never changes it, writes beside DST and moves the result
    into place only after every tensor was re-read and found equal to the source (or its cast).
    """
    from .convert import convert

    result = convert(src, dst, dtype=parse_dtype(dtype), use=use, only_weights=only_weights,
                     shard_size=shard_size, trust=trust, format=fmt)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(str(result))
