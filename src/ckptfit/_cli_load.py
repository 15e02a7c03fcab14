"""``ckptfit load`` and ``ckptfit plan``, and the options they share (registered in :mod:`ckptfit.cli`)."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ._cli_common import SOURCE, console, echo_json, handle_errors, parse_device, parse_dtype, stderr
from ._cli_verify import failure, input_option, reference_options, run_verify

__all__ = ["load", "plan", "rename_rules"]

SPEC_HELP = ("Where the model comes from: torchvision:NAME, timm:NAME, hf:CONFIG_DIR, package.module:ATTR or "
             "path/to/file.py:ATTR (docs/cli.md).")


def _load_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--model", "model_spec", metavar="SPEC", help=SPEC_HELP),
        click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                     help="Constructor argument (repeatable), a Python literal: num_classes=10, dims=(64,128), "
                          "act=gelu."),
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
        click.option("--class-map", "class_map", default=None, metavar="NEW=OLD,...|FILE.json",
                     help="Keep the file's classifier rows for the model's classes: model class = file class pairs "
                          "(0=3,1=7; classes not given are new, at init) or a JSON file (a list: the file's class "
                          "for each model class, null for a new one); reported as a transform."),
        click.option("--class-map-head", "class_map_head", default=None, metavar="NAME",
                     help="The head module --class-map applies to (e.g. fc), when its shape does not tell."),
        click.option("--source-model", "source_model", default=None, metavar="SPEC|identify",
                     help="The implementation that wrote the file, when names cannot settle a port (same SPEC forms "
                          "as --model, or 'identify'); see docs/porting.md."),
        click.option("--source-model-arg", "source_model_args", multiple=True, metavar="K=V",
                     help="Constructor argument for --source-model (repeatable)."),
        click.option("--sha256", "sha256", default=None, metavar="HEX|POINTER",
                     help="Check the file's sha256 before reading it: 64 hex digits, or a Git LFS pointer file."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def rename_rules(renames: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """``("^module\\.=>",)`` -> ``[("^module\\.", "")]``: ``--rename`` as load and convert take it."""
    rules = []
    for r in renames:
        if "=>" not in r:
            raise click.BadParameter(f"{r!r}: write rename rules as 'REGEX=>REPLACEMENT'", param_hint="--rename")
        a, b = r.split("=>", 1)
        rules.append((a, b))
    return rules or None


def _transform_rules(rules: tuple[str, ...]) -> dict[str, str] | None:
    from .transform_rules import parse_rules

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


def _class_map(class_map: str | None, head: str | None) -> dict[str, Any]:
    """``--class-map`` / ``--class-map-head`` as ``class_map=`` / ``class_map_head=`` (ckptfit._class_map)."""
    if class_map is None and head is None:
        return {}
    from ._class_map import class_map_from_text, parse_class_map

    if class_map is None:
        raise click.BadParameter("names the head for --class-map; pass --class-map too", param_hint="--class-map-head")
    try:
        value = class_map_from_text(class_map)
        parse_class_map(value, head)
    except (TypeError, ValueError) as e:
        hint = "--class-map-head" if str(e).startswith("class_map_head") else "--class-map"
        text = str(e).replace("class_map_head=", "--class-map-head ").replace("class_map=", "--class-map ")
        text = text.replace("class_map", "--class-map").replace("partial=True", "--partial")
        raise click.BadParameter(text, param_hint=hint) from None
    return {"class_map": value, **({"class_map_head": head} if head is not None else {})}


def _common(partial, use, renames, include, exclude, trust, transform_rules=(), adapt=None, source_model=None,
            source_model_args=(), class_map=None, class_map_head=None) -> dict[str, Any]:
    out = dict(partial=partial, use=use, rename=rename_rules(renames), include=list(include) or None,
               exclude=list(exclude) or None, trust=trust)
    if transform_rules:
        out["transforms"] = _transform_rules(transform_rules)
    if adapt is not None:
        from ._adapt import parse_adapt

        try:
            out["adapt"] = parse_adapt(adapt)
        except ValueError as e:
            raise click.BadParameter(str(e).replace("adapt=", "--adapt ", 1), param_hint="--adapt") from None
    out.update(_class_map(class_map, class_map_head))
    if source_model is not None:  # ckptfit.provenance
        if source_model != "identify":
            from .specs import model_factory, parse_model_args

            if ":" not in source_model:
                raise click.BadParameter(f"{source_model!r}: a model SPEC (torchvision:NAME, timm:NAME, hf:DIR, "
                                         f"package.module:factory) or 'identify'", param_hint="--source-model")
            args = parse_model_args(source_model_args)
            factory = model_factory(source_model, args)
            factory.ckptfit_label = source_model + (f"({', '.join(source_model_args)})" if args else "")
            out["source_model"] = factory
        else:
            out["source_model"] = source_model
    return out


def _factory(model_spec: str | None, model_args: tuple[str, ...]):
    from .specs import model_factory, parse_model_args

    if not model_spec:
        raise click.UsageError("pass --model SPEC (e.g. torchvision:resnet18, timm:resnet50, ./net.py:Net)")
    return model_factory(model_spec, parse_model_args(model_args))


def _check_save_path(path: str | None) -> None:
    """``--save`` into a folder that does not exist fails now, before anything is read or built."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise click.BadParameter(f"{path!r}: the folder {os.path.dirname(path) or folder!r} {what}; create it first "
                                 f"(mkdir -p {os.path.dirname(path) or folder}) or save elsewhere", param_hint="--save")
    if os.path.isdir(path):
        raise click.BadParameter(f"{path!r} is a folder; give a file name such as {os.path.join(path, 'model.safetensors')}",
                                 param_hint="--save")
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"{path!r}: the folder {folder!r} is not writable", param_hint="--save")


@click.command(epilog="""\b
Examples:
  ckptfit load resnet18_imagenet.pth --model torchvision:resnet18 --model-arg num_classes=10 --partial
  ckptfit load model_best.pth.tar --model timm:resnet18 --use ema --verify --save fixed.safetensors
  ckptfit load last.pth --model ./net.py:Net --model-arg 'dims=(64, 128)' --freeze
""")
@click.argument("ckpt", type=SOURCE)
@_load_options
@click.option("--device", default=None, metavar="DEVICE", help="Load onto this device, e.g. cuda:0 (default: cpu).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Cast floating tensors: fp32, fp16, bf16 or fp64 (also float16, bfloat16, half ...; "
                   "default: keep the model's).")
@click.option("--freeze", is_flag=True,
              help="Freeze the parameters that were loaded (requires_grad=False); the report lists them.")
@click.option("--verify", "do_verify", is_flag=True,
              help="Run one forward pass and check for NaN/Inf (and against --reference); exit 1 (and do not "
                   "--save) if it fails. For tensors left at init after any loader: ckptfit verify.")
@input_option
@reference_options
@click.option("--save", "save_path", type=click.Path(), default=None,
              help="Write the loaded model's state dict here (.safetensors, else torch.save); every tensor kept, "
                   "tied weights once, atomic and re-read to verify. The folder must exist.")
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
         adapt: str | None = None, sha256: str | None = None, freeze: bool = False,
         source_model: str | None = None, source_model_args: tuple[str, ...] = (),
         input_shape: str | None = None, reference_spec: str | None = None, reference_ckpt: str | None = None,
         atol: float = 1e-5, rtol: float = 1e-4, class_map: str | None = None,
         class_map_head: str | None = None) -> None:
    """Load a checkpoint into a model and print the report.

    The model is built from --model SPEC without random init, then filled from the checkpoint
    (and put in eval mode, as from_pretrained does). Without --model, ckptfit builds the model
    the checkpoint records or identifies.
    """
    from .loading import build

    _check_save_path(save_path)
    opts = _common(partial, use, renames, include, exclude, trust, transform_rules, adapt, source_model,
                   source_model_args, class_map, class_map_head)
    opts.update(device=parse_device(device), dtype=parse_dtype(dtype))
    if zero_copy:
        opts["mmap"] = True
    if no_crc:
        opts["verify"] = False
    if sha256:
        opts["sha256"] = sha256
    if freeze:
        opts["freeze"] = True
    if model_spec:
        from .specs import parse_model_args

        _factory(model_spec, model_args)  # a bad SPEC is said before the file is read
        model, report = build(model_spec, ckpt, model_kwargs=parse_model_args(model_args), **opts)
    else:
        from .auto import from_checkpoint

        model, report = from_checkpoint(ckpt, **opts)  # the report says which model was built (report.model)
    result: dict[str, Any] = {"report": report.to_dict()}
    if not as_json:
        console().print(report)
    if do_verify or input_shape or reference_spec:
        v = run_verify(model, input_shape=input_shape, reference_spec=reference_spec,
                       reference_ckpt=reference_ckpt or ckpt, atol=atol, rtol=rtol, trust=trust, untrained=False)
        result["verify"] = v.to_dict()
        if not as_json:
            click.echo(str(v))
        if v.skipped:  # no input to try: the load stands, the forward check did not run
            stderr(f"warning: verify not run: {v.skipped}")
        why = failure(v)
        if why:
            message = "verify failed: " + why + ("; not saved" if save_path else "")
            if as_json:
                result["error"] = {"type": "VerifyFailed", "message": message,
                                   "hint": "the report says what was loaded; check the checkpoint and the model"}
                echo_json(result)
            else:
                stderr("error: " + message)
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
        echo_json(result)


def _save_state_dict(model, path: str, source: str):
    """The model's state dict through the one writer (safetensors for ``*.safetensors``, else torch.save)."""
    from .writing import write_checkpoint

    return write_checkpoint(path, model.state_dict(), source=source)


@click.command(epilog="""\b
Examples:
  ckptfit plan dp_model.pth --model mypkg.models:SimpleCNN
  ckptfit plan resnet18_imagenet.pth --model torchvision:resnet18 --model-arg num_classes=10 --partial
  ckptfit plan last.ckpt --model ./net.py:Net --resume
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
         adapt: str | None = None, sha256: str | None = None, source_model: str | None = None,
         source_model_args: tuple[str, ...] = (), class_map: str | None = None,
         class_map_head: str | None = None) -> None:
    """Show what would be loaded where, and why, without loading.

    A dry run of `load`: decides from names, shapes and dtypes only, reads no tensor data,
    and exits 1 if the load would be refused (the problems and suggestions are printed).
    """
    from .advice import advise_constructor
    from .loading import plan as make_plan
    from .loading.meta import parameters_on_meta
    from .report import plan_to_dict, render_plan
    from .specs import model_factory, parse_model_args

    factory = _factory(model_spec, model_args)
    with parameters_on_meta():
        model = factory()
    opts = _common(partial, use, renames, include, exclude, trust, transform_rules, adapt, source_model,
                   source_model_args, class_map, class_map_head)
    p = make_plan(model, ckpt, **opts, sha256=sha256)
    kwargs = parse_model_args(model_args)  # shapes one constructor argument away: advise it (verified)
    p = advise_constructor(p, lambda kw: model_factory(model_spec, kw)(), kwargs, ckpt, opts)
    resumed = None
    if resume_:  # how ckptfit.resume would map the optimizer state (described by the saved groups)
        from .resuming import describe_resume

        resumed = describe_resume(model, ckpt, p, trust=trust)
    if as_json:
        d = plan_to_dict(p)
        if resumed is not None:
            d["resume"] = resumed.to_dict()
        echo_json(d)
    else:
        click.echo(render_plan(p, max_lines=40))
        if resumed is not None:
            click.echo(str(resumed))
    if not p.ok or (resumed is not None and not resumed.ok):
        sys.exit(1)
