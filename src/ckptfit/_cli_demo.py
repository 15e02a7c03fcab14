"""``ckptfit demo``: the command over :func:`ckptfit.demo.run_demo` (registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import sys

import click

from ._cli_common import handle_errors

__all__ = ["demo"]


@click.command(epilog="""\b
Examples:
  ckptfit demo
  ckptfit demo --keep ./ckptfit-demo
""")
@click.option("--keep", metavar="DIR", type=click.Path(file_okay=False), default=None,
              help="Write the checkpoints into DIR and leave them there, to try the other commands on.  "
                   "[default: a temporary directory, removed afterwards]")
@handle_errors
def demo(keep: str | None) -> None:
    """Try ckptfit on built-in checkpoints with classic problems.

    Writes three small checkpoints with the classic problems (a DataParallel training
    checkpoint with argparse args, a head with another num_classes, a torch.compile-d model
    saved on a GPU), shows what model.load_state_dict(torch.load(path)) says about each, then
    loads each with ckptfit and prints the report. No download, no GPU; most of its time
    is importing torch and torchvision.
    """
    from .demo import run_demo

    if not run_demo(keep, echo=click.echo):
        sys.exit(1)
