"""``ckptfit convert``: the command over :func:`ckptfit.conversion.convert` (registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import click

from ._cli_common import SOURCE, echo_json, handle_errors, parse_dtype
from ._cli_load import rename_rules

__all__ = ["convert_command"]


@click.command("convert", epilog="""\b
Examples:
  ckptfit convert last.ckpt model.safetensors --only-weights --dtype bf16
  ckptfit convert train_dp.pth model.safetensors --strip-prefix module.
  ckptfit convert train.pth backbone.safetensors --include 'backbone.*' --rename '^backbone\\.=>'
  ckptfit convert model_best.pth.tar ./sharded --shard-size 2GB --use ema
""")
@click.argument("src", type=SOURCE)
@click.argument("dst", type=click.Path())
@click.option("--dtype", default=None, metavar="DTYPE", show_default="keep",
              help="Cast floating weights: fp32, fp16, bf16 or fp64 (also float16, bfloat16, half ...).")
@click.option("--use", metavar="NAME", default=None, show_default="the model's own weights",
              help="Which state dict in the file: 'ema' or a key path.")
@click.option("--strip-prefix", "strip_prefix", multiple=True, metavar="PREFIX",
              help="Remove this key prefix (repeatable), e.g. module.; 'auto' removes the prefixes "
                   "DataParallel/DDP (module.) and torch.compile (_orig_mod.) add to every key.")
@click.option("--rename", "renames", multiple=True, metavar="'REGEX=>REPL'",
              help="Rename keys, as load does (repeatable; applied after --strip-prefix).")
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Write only tensors whose key (before or after renaming) matches.")
@click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
              help="Leave out tensors whose key (before or after renaming) matches.")
@click.option("--only-weights", is_flag=True, help="Write the weights alone: no optimizer, scheduler or metadata.")
@click.option("--shard-size", metavar="SIZE", default=None, show_default="one file",
              help="Write safetensors shards of at most SIZE (e.g. 2GB) plus model.safetensors.index.json.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch", "dcp"]), default=None,
              show_default="from DST", help="Output format.")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def convert_command(src: str, dst: str, dtype: str | None, use: str | None, strip_prefix: tuple[str, ...],
                    renames: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], only_weights: bool,
                    shard_size: str | None, fmt: str | None, trust: bool, as_json: bool) -> None:
    """Convert or slim a checkpoint, atomically and verified.

    Writes safetensors (one file or shards), a torch file or a DCP folder. Reads any format
    ckptfit reads, never changes it, writes beside DST and moves the result into place only
    after every tensor was re-read and found equal to the source (or its cast). Keys can be
    cleaned on the way (--strip-prefix, --rename, --include, --exclude, as load takes them).
    """
    from .conversion import convert

    result = convert(src, dst, dtype=parse_dtype(dtype), use=use, only_weights=only_weights,
                     shard_size=shard_size, trust=trust, format=fmt, strip_prefix=list(strip_prefix) or None,
                     rename=rename_rules(renames), include=list(include) or None, exclude=list(exclude) or None)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(str(result))
