"""After-load checks: one forward pass on an inferred input, output shape and NaN/Inf."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["verify", "VerifyResult", "example_input"]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        ok: the forward pass ran and the output holds no NaN/Inf.
        input_shape: the shape of the input used.
        output_shapes: shape of each output tensor (in order).
        nonfinite: number of NaN/Inf values in the outputs.
        error: the exception text when the forward pass failed.
    """

    ok: bool
    input_shape: tuple[int, ...] | None
    output_shapes: tuple[tuple[int, ...], ...] = ()
    nonfinite: int = 0
    error: str | None = None

    def __str__(self) -> str:
        if self.error and self.input_shape is None and not self.output_shapes:
            return f"verify: not run: {self.error}"
        if self.error:
            return f"verify: forward pass failed: {self.error}"
        outs = ", ".join(str(list(s)) for s in self.output_shapes)
        state = "ok" if self.ok else f"{self.nonfinite} NaN/Inf values in the output"
        return f"verify: input {list(self.input_shape or ())} -> output {outs}: {state}"


def example_input(model: nn.Module) -> Any:
    """An input the model accepts, inferred from its first layer (or its Hugging Face config)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size") and hasattr(model, "get_input_embeddings"):
        return {"input_ids": torch.randint(0, int(config.vocab_size), (1, 8), device=device)}
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            return torch.randn(1, m.in_channels * m.groups // m.groups, 64, generator=g).to(device, dtype)
        if isinstance(m, nn.Conv2d):
            return torch.randn(1, m.in_channels, 224, 224, generator=g).to(device, dtype) \
                if m.in_channels in (1, 3, 4) else torch.randn(1, m.in_channels, 64, 64, generator=g).to(device, dtype)
        if isinstance(m, nn.Conv3d):
            return torch.randn(1, m.in_channels, 8, 32, 32, generator=g).to(device, dtype)
        if isinstance(m, nn.Linear):
            return torch.randn(1, m.in_features, generator=g).to(device, dtype)
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (1, 8), generator=g).to(device)
    raise ValueError(f"cannot infer an input for {type(model).__name__}; pass example_input=")


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


def verify(model: nn.Module, example_input: Any = None) -> VerifyResult:
    """Run one forward pass in eval mode under ``no_grad`` and check the output.

    Args:
        model: the loaded model (its train/eval mode is restored afterwards).
        example_input: the input to use; inferred from the first Conv/Linear/Embedding layer
            (or the Hugging Face config) when omitted.

    Returns:
        A :class:`VerifyResult` (``ok``, shapes, NaN/Inf count, or the error: a failed forward
        pass, or no input that could be inferred).

    Example:
        >>> import torch
        >>> print(verify(torch.nn.Linear(4, 2)))
        verify: input [1, 4] -> output [1, 2]: ok
    """
    if example_input is None:
        try:
            example_input = globals()["example_input"](model)
        except ValueError as e:  # no input to infer: reported like a failed pass, not raised
            return VerifyResult(False, None, error=str(e))
    x = example_input
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**x) if isinstance(x, dict) else model(x)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return VerifyResult(False, _shape_of(x), error=f"{type(e).__name__}: {e}")
    finally:
        model.train(was_training)
    outs = [t for t in _tensors(out) if t.is_floating_point() or t.is_complex()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in outs)
    return VerifyResult(bad == 0, _shape_of(x), tuple(tuple(t.shape) for t in _tensors(out)), bad)


def _shape_of(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, dict) and x:
        v = next(iter(x.values()))
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None
    return None
