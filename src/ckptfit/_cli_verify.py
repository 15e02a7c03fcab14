"""``ckptfit verify``, and the helpers ``load --verify`` shares with it (registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import sys
from typing import Any

import click

from ._cli_common import EXIT_CODES, console, echo_json, handle_errors, stderr

__all__ = ["verify_command", "input_option", "reference_options", "run_verify"]


def input_option(f):
    return click.option("--input-shape", "input_shape", metavar="N,C,H,W", default=None,
                        help="Shape of the random input for the forward pass, e.g. 1,1,28,28 (default: inferred "
                             "from the first layers, trying common sizes).")(f)


def reference_options(f):
    f = click.option("--reference-ckpt", "reference_ckpt", type=click.Path(exists=True), default=None,
                     help="Fill the reference from this file instead.")(f)
    f = click.option("--reference", "reference_spec", metavar="SPEC", default=None,
                     help="Compare outputs with this model (torchvision:NAME, timm:NAME, hf:DIR, pkg.mod:factory), "
                          "filled from the same checkpoint unless --reference-ckpt; proves a port.")(f)
    f = click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance vs --reference.")(f)
    return click.option("--rtol", type=float, default=1e-4, show_default=True,
                        help="Relative tolerance vs --reference.")(f)


def _example(shape_text: str | None):
    if shape_text is None:
        return None
    import torch

    from .verification import parse_input_shape

    try:
        shape = parse_input_shape(shape_text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--input-shape") from None
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _reference(spec: str | None, ckpt: str | None, trust: bool):
    if spec is None:
        return None
    from .loading import build
    from .specs import model_factory

    factory = model_factory(spec)
    if ckpt is None:
        return factory()
    model, _ = build(factory, ckpt, trust=trust)
    return model


def run_verify(model, *, input_shape: str | None, reference_spec: str | None, reference_ckpt: str | None,
               atol: float, rtol: float, trust: bool, untrained: bool, forward: bool = True):
    """The :class:`~ckptfit.verification.VerifyResult` the CLI options ask for."""
    from .verification import verify

    example = _example(input_shape)
    reference = _reference(reference_spec, reference_ckpt, trust)
    try:
        return verify(model, example, reference=reference, atol=atol, rtol=rtol, forward=forward,
                      untrained=untrained)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def failure(v) -> str | None:
    """Why the result fails (None: it does not; a skipped forward pass is a warning, not a failure)."""
    if v.error:
        return v.error
    if v.nonfinite:
        return f"{v.nonfinite} NaN/Inf values in the output"
    if v.reference is not None and not v.reference.ok:
        return "the outputs differ from the reference" if v.reference.max_abs_diff is not None else v.reference.note
    if v.untrained is not None and v.untrained.flagged:
        return f"{len(v.untrained.flagged)} tensors look like a fresh init (not trained)"
    return None


@click.command("verify", epilog="""\b
Examples:
  ckptfit verify torchvision:resnet18 resnet18_finetuned.pth
  ckptfit verify mypkg.models:load_trained            # a model your own code loaded
  ckptfit verify mypkg.lenet:LeNet lenet.pt --input-shape 1,1,28,28
  ckptfit verify mypkg.nano:GPT gpt2.safetensors --reference hf:./gpt2 --reference-ckpt gpt2.safetensors
""")
@click.argument("spec")
@click.argument("ckpt", required=False, type=click.Path(exists=True))
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
              help="Constructor argument for the model (repeatable), e.g. num_classes=10.")
@click.option("--partial", is_flag=True, help="Allow model tensors to stay at init (they are then reported).")
@click.option("--use", metavar="NAME", help="Which state dict in the file: 'ema' or a key path.")
@click.option("--rename", "renames", multiple=True, metavar="'REGEX=>REPL'", help="Rename checkpoint keys (repeatable).")
@click.option("--trust", is_flag=True, help="Allow real unpickling (runs code from the file). Default: off.")
@input_option
@reference_options
@click.option("--no-forward", is_flag=True, help="Only look for tensors at init; run no forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def verify_command(spec: str, ckpt: str | None, model_args: tuple[str, ...], partial: bool, use: str | None,
                   renames: tuple[str, ...], trust: bool, input_shape: str | None, reference_spec: str | None,
                   reference_ckpt: str | None, atol: float, rtol: float, no_forward: bool, as_json: bool) -> None:
    """Check a model: a forward pass, and tensors left at init.

    With CKPT, the model is built from SPEC and filled from CKPT as `load` does. Without CKPT,
    SPEC's factory is checked as it returns the model, e.g. a function that loads weights with
    its own code: the check reads only values, so it works after any loader. Tensors whose
    values fit the distribution their layer is initialised from (exact ones and zeros of norms,
    PyTorch's default bounds, a library's normal init) are listed with the evidence. Exit 0
    when every check passes, 1 when one fails (forward pass, NaN/Inf, --reference, tensors at
    init); a forward pass without an inferable input is skipped with a warning.
    """
    from ._cli_load import rename_rules
    from .specs import model_factory, parse_model_args

    factory = model_factory(spec, parse_model_args(model_args))
    result: dict[str, Any] = {}
    if ckpt is not None:
        from .loading import build

        opts = dict(partial=partial, use=use, rename=rename_rules(renames), trust=trust)
        model, report = build(factory, ckpt, **opts)
        result["report"] = report.to_dict()
        if not as_json:
            console().print(report)
    else:
        model = factory()
    v = run_verify(model, input_shape=input_shape, reference_spec=reference_spec,
                   reference_ckpt=reference_ckpt if reference_ckpt else ckpt, atol=atol, rtol=rtol, trust=trust,
                   untrained=True, forward=not no_forward)
    result["verify"] = v.to_dict()
    why = failure(v)
    if why and as_json:
        result["error"] = {"type": "VerifyFailed", "message": f"verify failed: {why}",
                           "hint": "the lines above say which check failed and why"}
    if as_json:
        echo_json(result)
    else:
        click.echo(str(v))
    if v.skipped:
        stderr(f"warning: forward pass not run: {v.skipped}")
    if why:
        if not as_json:
            stderr(f"error: verify failed: {why}")
        sys.exit(EXIT_CODES["error"])
