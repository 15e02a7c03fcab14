"""After-load checks: a forward pass on an inferred input, a comparison with a reference model, and
tensors that still hold a fresh default initialisation.

- **Forward**: one pass in eval mode under ``no_grad``; output shapes and NaN/Inf. The input is
  ``example_input`` when given, else inferred from the model (a Hugging Face config, the sizes a
  model declares, then its first layer: channels from the first conv with spatial sizes tried
  from a list until a forward works, token ids for an Embedding, features for a Linear).
- **Reference**: the same input through ``reference`` too; the outputs must agree within
  ``atol + rtol * |reference|``; the largest absolute difference is reported. This proves a port.
- **At init**: :func:`ckptfit.untrained.find_untrained`, tensors whose values look like what
  ``reset_parameters`` (or a library's init) draws, with the evidence.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .untrained import UntrainedReport, find_untrained

__all__ = ["verify", "VerifyResult", "Comparison", "example_input", "candidate_inputs", "parse_input_shape"]

# Spatial sizes tried for an image model, most common first (ImageNet, CIFAR, MNIST, ...).
IMAGE_SIZES = (224, 32, 28, 64, 96, 128, 256, 299, 384, 512, 16)
SEQUENCE_LENGTHS = (64, 256, 1024, 16000, 32, 28, 8)   # Conv1d inputs (signals, audio)
VIDEO_SIZES = ((8, 112), (16, 112), (8, 224), (8, 32), (4, 64))
TOKENS = (8, 16, 1)
MAX_TRIES = 16


@dataclass(frozen=True)
class Comparison:
    """The model's outputs against a reference model's on the same input.

    Attributes:
        ok: the outputs have the same shapes and agree within ``atol + rtol * |reference|``.
        max_abs_diff: the largest absolute difference (None when nothing could be compared).
        atol: absolute tolerance used.
        rtol: relative tolerance used.
        compared: how many output tensors were compared.
        note: what was compared when the two outputs are structured differently, or why the
            comparison failed (shapes differ, the reference failed on the input).
    """

    ok: bool
    max_abs_diff: float | None
    atol: float
    rtol: float
    compared: int = 0
    note: str = ""

    def __str__(self) -> str:
        tol = f"atol {self.atol:g}, rtol {self.rtol:g}"
        if self.max_abs_diff is None:
            return f"reference: not compared: {self.note}"
        verdict = "match" if self.ok else "DIFFER"
        outs = f"{self.compared} output{'s' if self.compared != 1 else ''}"
        text = f"reference: {verdict}: max abs diff {self.max_abs_diff:.3g} over {outs} ({tol})"
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol,
                "compared": self.compared, "note": self.note}


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        ok: every check asked for ran and passed: the forward pass gave finite outputs, the
            reference (if any) agreed, and no tensor looks untrained (if that was checked).
            False when the forward pass could not be run (see ``skipped``).
        input_shape: the shape of the input used.
        output_shapes: shape of each output tensor (in order).
        nonfinite: number of NaN/Inf values in the outputs.
        error: the exception text when the forward pass failed on the input.
        skipped: why the forward pass was not run (no input could be inferred); not a failure
            of the model: pass ``example_input=`` (CLI ``--input-shape``).
        input_note: where the input came from (given, or what it was inferred from).
        reference: the comparison with the reference model, when one was given.
        untrained: the tensors that look like a fresh init, when that was checked.
    """

    ok: bool
    input_shape: tuple[int, ...] | None
    output_shapes: tuple[tuple[int, ...], ...] = ()
    nonfinite: int = 0
    error: str | None = None
    skipped: str | None = None
    input_note: str = ""
    reference: Comparison | None = None
    untrained: UntrainedReport | None = field(default=None, repr=False)

    @property
    def forward_ok(self) -> bool:
        """The forward pass ran and its outputs are finite."""
        return self.error is None and self.skipped is None and self.input_shape is not None and self.nonfinite == 0

    def __str__(self) -> str:
        lines = [self._forward_line()]
        if self.reference is not None:
            lines.append(str(self.reference))
        if self.untrained is not None:
            lines.append(str(self.untrained))
        return "\n".join(line for line in lines if line)

    def _forward_line(self) -> str:
        if self.skipped:
            return f"verify: not run: {self.skipped}"
        if self.input_shape is None and not self.error:
            return ""  # forward pass not asked for
        if self.error:
            return f"verify: forward pass failed: {self.error}"
        outs = ", ".join(str(list(s)) for s in self.output_shapes)
        state = "ok" if self.nonfinite == 0 else f"{self.nonfinite} NaN/Inf values in the output"
        note = f" ({self.input_note})" if ", after " in self.input_note else ""  # the first guess: no note
        return f"verify: input {list(self.input_shape or ())}{note} -> output {outs}: {state}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {"ok": self.ok, "input_shape": self.input_shape, "output_shapes": self.output_shapes,
                "nonfinite": self.nonfinite, "error": self.error, "skipped": self.skipped,
                "input_note": self.input_note,
                "reference": None if self.reference is None else self.reference.to_dict(),
                "untrained": None if self.untrained is None else self.untrained.to_dict()}


# ------------------------------------------------------------------------------------ inputs

def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,1,28,28"`` (or ``1x1x28x28``) -> ``(1, 1, 28, 28)``; ValueError naming the problem otherwise.

    Example:
        >>> parse_input_shape("1,1,28,28")
        (1, 1, 28, 28)
    """
    parts = [p.strip() for p in text.replace("x", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input shape {text!r} is not a list of positive integers like 1,3,224,224")
    return shape


def _where(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if not p.is_meta:
            return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _size_hints(model: nn.Module) -> list[int]:
    """Square image sizes the model declares (timm ``pretrained_cfg``, ``img_size``, HF ``image_size``)."""
    hints: list[int] = []

    def add(v: Any) -> None:
        if isinstance(v, (list, tuple)) and v:
            v = v[-1]
        if isinstance(v, int) and 0 < v <= 4096 and v not in hints:
            hints.append(v)

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        add(cfg.get("input_size"))
    for holder in (model, getattr(model, "patch_embed", None), getattr(model, "config", None)):
        for attr in ("img_size", "image_size", "input_size"):
            add(getattr(holder, attr, None))
    return hints


def candidate_inputs(model: nn.Module) -> Iterator[tuple[Any, str]]:
    """Inputs the model may accept, most likely first, each with where it came from.

    Yields ``(input, note)``; the input is a tensor, or a dict of keyword arguments for a
    Hugging Face model. Nothing is run here.

    Example:
        >>> x, note = next(candidate_inputs(torch.nn.Conv2d(1, 4, 3)))
        >>> list(x.shape), note
        ([1, 1, 224, 224], 'inferred from Conv2d(in_channels=1)')
    """
    device, dtype = _where(model)
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, max(1, high), shape, generator=g).to(device)

    config = getattr(model, "config", None)
    hints = _size_hints(model)
    if config is not None and hasattr(model, "get_input_embeddings"):
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            for n in TOKENS[:2]:
                yield {"input_ids": ids(vocab, 1, n)}, f"token ids from config.vocab_size={vocab}"
        chans = getattr(config, "num_channels", None)
        if isinstance(chans, int) and chans > 0:
            for s in hints + [s for s in IMAGE_SIZES[:3] if s not in hints]:
                yield {"pixel_values": randn(1, chans, s, s)}, f"pixel_values from config (num_channels={chans})"
    seen: set[type] = set()
    for m in model.modules():
        kind = _entry_kind(m)
        if kind is None or kind in seen:
            continue
        seen.add(kind)
        yield from _from_layer(m, hints, randn, ids)


def _entry_kind(m: nn.Module) -> type | None:
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding, nn.RNNBase):
        if isinstance(m, t):
            return t
    return None


def _from_layer(m: nn.Module, hints: list[int], randn, ids) -> Iterator[tuple[Any, str]]:
    name = type(m).__name__
    if isinstance(m, nn.Conv2d):
        c = m.in_channels
        for s in hints + [s for s in IMAGE_SIZES if s not in hints]:
            yield randn(1, c, s, s), f"inferred from {name}(in_channels={c})"
    elif isinstance(m, nn.Conv1d):
        for n in SEQUENCE_LENGTHS:
            yield randn(1, m.in_channels, n), f"inferred from {name}(in_channels={m.in_channels})"
    elif isinstance(m, nn.Conv3d):
        for t, s in VIDEO_SIZES:
            yield randn(1, m.in_channels, t, s, s), f"inferred from {name}(in_channels={m.in_channels})"
    elif isinstance(m, nn.Linear):
        yield randn(1, m.in_features), f"inferred from {name}(in_features={m.in_features})"
        yield randn(1, 8, m.in_features), f"inferred from {name}(in_features={m.in_features}), 8 tokens"
    elif isinstance(m, nn.Embedding):
        for n in TOKENS:
            yield ids(m.num_embeddings, 1, n), f"token ids from {name}(num_embeddings={m.num_embeddings})"
    elif isinstance(m, nn.RNNBase):
        shape = (1, 8, m.input_size) if m.batch_first else (8, 1, m.input_size)
        yield randn(*shape), f"inferred from {name}(input_size={m.input_size})"


def example_input(model: nn.Module) -> Any:
    """The first input :func:`candidate_inputs` proposes (not checked by a forward pass).

    Raises:
        ValueError: no input can be inferred; pass one yourself.

    Example:
        >>> example_input(torch.nn.Linear(4, 2)).shape
        torch.Size([1, 4])
    """
    for x, _ in candidate_inputs(model):
        return x
    raise ValueError(f"cannot infer an input for {type(model).__name__}; pass example_input=")


# ------------------------------------------------------------------------------------ running

def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


def _shape_of(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, dict) and x:
        v = next(iter(x.values()))
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None
    return None


def _moved(x: Any, model: nn.Module) -> Any:
    """``x`` on the model's device, floating parts in its dtype (a reference may live elsewhere)."""
    device, dtype = _where(model)

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    if isinstance(x, dict):
        return {k: move(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(move(v) for v in x)
    return move(x)


def _forward(model: nn.Module, x: Any) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(x, dict):
                return model(**x)
            if isinstance(x, tuple):
                return model(*x)
            return model(x)
    finally:
        model.train(was_training)


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _compare(out: Any, ref: Any, atol: float, rtol: float) -> Comparison:
    a = [t for t in _tensors(out) if t.is_floating_point() or t.is_complex()]
    b = [t for t in _tensors(ref) if t.is_floating_point() or t.is_complex()]
    note = ""
    if not a or not b:
        return Comparison(False, None, atol, rtol, 0, "the model or the reference gave no floating-point output")
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        note = f"compared the first output of each (the model gives {len(a)} tensors, the reference {len(b)})" \
            if len(a) != len(b) else "compared the first output of each (the other outputs differ in shape)"
        a, b = a[:1], b[:1]
        if a[0].shape != b[0].shape:
            return Comparison(False, None, atol, rtol, 0,
                              f"outputs differ in shape: model {list(a[0].shape)}, reference {list(b[0].shape)}")
    worst, ok = 0.0, True
    for x, y in zip(a, b):
        wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
        x64, y64 = x.detach().to("cpu", wide), y.detach().to("cpu", wide)
        finite = torch.isfinite(x64) & torch.isfinite(y64)
        same = (torch.isnan(x64) & torch.isnan(y64)) | (x64 == y64)  # NaN where the reference has NaN, same Inf
        if not bool((finite | same).all()):
            ok = False
        diff = (x64 - y64).abs()[finite]
        if diff.numel():
            worst = max(worst, float(diff.max()))
            ok = ok and bool((diff <= atol + rtol * y64.abs()[finite]).all())
    return Comparison(ok, worst, atol, rtol, len(a), note)


def verify(model: nn.Module, example_input: Any = None, *, reference: nn.Module | None = None,
           atol: float = 1e-5, rtol: float = 1e-4, forward: bool = True, untrained: bool = True) -> VerifyResult:
    """Check a loaded model: a forward pass, optionally against a reference, and for tensors left at init.

    Args:
        model: the loaded model (its train/eval mode is restored afterwards).
        example_input: the input to use: a tensor, a tuple of positional arguments or a dict of
            keyword arguments. When omitted, inputs are inferred (a Hugging Face config, the
            sizes the model declares, its first Conv/Linear/Embedding/RNN layer) and tried in
            turn until a forward pass works; if none does, the forward check is ``skipped``,
            saying what was tried.
        reference: another model computing the same function (the source of a port); the same
            input goes through both and the outputs are compared.
        atol: absolute tolerance of the comparison.
        rtol: relative tolerance of the comparison (relative to the reference's output).
        forward: run the forward pass (False: only the check for tensors at init).
        untrained: look for tensors whose values look like a fresh default init
            (:func:`ckptfit.untrained.find_untrained`).

    Returns:
        A :class:`VerifyResult`: ``ok``, shapes, NaN/Inf count, the failure or why the forward
        pass was skipped, the :class:`Comparison` and the tensors at init.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> print(verify(torch.nn.Linear(16, 2), untrained=False))
        verify: input [1, 16] -> output [1, 2]: ok
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify() takes an nn.Module, not {type(model).__name__}")
    if reference is not None and not isinstance(reference, nn.Module):
        raise TypeError(f"reference= must be an nn.Module, not {type(reference).__name__}")
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name}= must be a finite number >= 0, not {tol!r}")
    found = find_untrained(model) if untrained else None
    init_ok = found is None or not found.flagged
    if not forward:
        return VerifyResult(init_ok, None, untrained=found)
    run = _run(model, example_input, reference, atol, rtol)
    ok = init_ok and run["forward_ok"] and (run["reference"] is None or run["reference"].ok)
    del run["forward_ok"]
    return VerifyResult(ok, untrained=found, **run)


def _run(model: nn.Module, x: Any, reference: nn.Module | None, atol: float, rtol: float) -> dict[str, Any]:
    if x is not None:
        candidates: Iterator[tuple[Any, str]] = iter([(x, "given")])
    else:
        candidates = candidate_inputs(model)
    tried: list[str] = []
    first_error: str | None = None
    for i, (inp, note) in enumerate(candidates):
        if i >= MAX_TRIES:
            break
        try:
            out = _forward(model, _moved(inp, model))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            if note == "given":
                return dict(forward_ok=False, input_shape=_shape_of(inp), error=_error_text(e), input_note=note,
                            reference=None)
            first_error = first_error or _error_text(e)
            tried.append(str(list(_shape_of(inp) or ())))
            continue
        comparison = None
        if reference is not None:
            try:
                ref_out = _forward(reference, _moved(inp, reference))
            except Exception as e:  # noqa: BLE001 - the reference does not take this input: try the next
                if note == "given":
                    comparison = Comparison(False, None, atol, rtol, 0,
                                            f"the reference failed on the input: {_error_text(e)}")
                else:
                    first_error = first_error or f"reference: {_error_text(e)}"
                    tried.append(str(list(_shape_of(inp) or ())) + " (reference failed)")
                    continue
            else:
                comparison = _compare(out, ref_out, atol, rtol)
        if tried:
            note += f", after {', '.join(tried)} failed"
        outs = _tensors(out)
        bad = sum(int((~torch.isfinite(t)).sum()) for t in outs if t.is_floating_point() or t.is_complex())
        return dict(forward_ok=bad == 0, input_shape=_shape_of(inp), output_shapes=tuple(tuple(t.shape) for t in outs),
                    nonfinite=bad, input_note=note, reference=comparison)
    what = f"{type(model).__name__}" + (" and the reference" if reference is not None else "")
    if not tried:
        why = f"cannot infer an input for {what} (no Conv, Linear, Embedding or RNN layer to start from)"
    else:
        why = (f"no inferred input worked for {what}: tried {', '.join(tried)}; first error: {first_error}")
    return dict(forward_ok=False, input_shape=None, skipped=why + "; pass example_input= (CLI: --input-shape 1,3,H,W)",
                reference=None)
