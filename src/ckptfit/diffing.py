"""``ckptfit diff``: what differs between two checkpoints, or between a checkpoint and a model.

Names are reconciled with the same matcher as :func:`ckptfit.load`, so a ``module.`` prefix
or a renamed layer shows up as a rename, not as everything removed and added.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .keyfolding import fold_keys, fold_pairs
from .dtypes import dtype_name
from .lazy import LazyTensor
from .matching import match
from .plans import TensorSpec
from .rendering import printable

if TYPE_CHECKING:
    import torch

__all__ = ["Diff", "diff_sources"]


@dataclass(frozen=True)
class Diff:
    """Result of :func:`diff_sources`.

    Attributes:
        a, b: what was compared (paths or a model SPEC).
        added: names only in B.  removed: names only in A.
        renamed: ``(name in A, name in B)`` pairs the matcher reconciled.
        shape_changed: ``(name, shape in A, shape in B)``.  dtype_changed: ``(name, dtype A, dtype B)``.
        max_abs_diff: for tensors in both with equal shapes, ``name -> max |a - b|`` (when values compared).
        equal: names whose values are identical.
    """

    a: str
    b: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    shape_changed: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    dtype_changed: tuple[tuple[str, str, str], ...]
    max_abs_diff: dict[str, float]
    common: int
    values_compared: bool

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.renamed or self.shape_changed or self.dtype_changed) and \
            (not self.values_compared or all(v == 0 for v in self.max_abs_diff.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "identical": self.identical, "common": self.common,
            "added": list(self.added), "removed": list(self.removed),
            "renamed": [{"a": x, "b": y} for x, y in self.renamed],
            "shape_changed": [{"name": n, "a": list(x), "b": list(y)} for n, x, y in self.shape_changed],
            "dtype_changed": [{"name": n, "a": x, "b": y} for n, x, y in self.dtype_changed],
            "max_abs_diff": self.max_abs_diff if self.values_compared else None,
            "folded": {"added": fold_keys(self.added), "removed": fold_keys(self.removed),
                       "renamed": fold_pairs(self.renamed) if self.renamed else []},
        }

    def __str__(self) -> str:
        lines = [f"diff {self.a} -> {self.b}: {self.common} tensor{'s' if self.common != 1 else ''} in both"]
        if self.identical:
            lines.append("  identical" + ("" if self.values_compared else " (names, shapes and dtypes)"))
            return printable("\n".join(lines))
        if self.removed:
            lines.append(f"  removed ({len(self.removed)}): " + ", ".join(fold_keys(self.removed)))
        if self.added:
            lines.append(f"  added ({len(self.added)}): " + ", ".join(fold_keys(self.added)))
        if self.renamed:
            lines.append(f"  renamed ({len(self.renamed)}):")
            lines.extend(_capped([f"    {p}" for p in fold_pairs(self.renamed)], 20))
        shapes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for n, x, y in self.shape_changed:
            shapes.setdefault((tuple(x), tuple(y)), []).append(n)
        lines.extend(_capped([f"  shape {', '.join(fold_keys(names))}: {list(x)} -> {list(y)}"
                              for (x, y), names in shapes.items()], 20))
        if self.dtype_changed:
            by: dict[tuple[str, str], list[str]] = {}
            for n, x, y in self.dtype_changed:
                by.setdefault((x, y), []).append(n)
            for (x, y), names in by.items():
                lines.append(f"  dtype {x} -> {y} ({len(names)}): " + ", ".join(fold_keys(names)))
        if self.values_compared and self.max_abs_diff:
            changed = {k: v for k, v in self.max_abs_diff.items() if v != 0}
            same = len(self.max_abs_diff) - len(changed)
            lines.append(f"  values: {same} equal, {len(changed)} differ")
            top = sorted(changed.items(), key=lambda kv: -kv[1])[:10]
            lines.extend(f"    {k}: max |a-b| = {v:.3g}" for k, v in top)
        return printable("\n".join(lines))


def _capped(lines: list[str], limit: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    return [*lines[: limit - 1], f"{indent}… {len(lines) - limit + 1} more lines"]


def _side(src: str, model_args: Sequence[str], trust: bool, use: str | None = None,
          option: str = "use_a", given: str = "use") -> tuple[dict[str, Any], bool]:
    """``({name: LazyTensor or meta tensor}, has_values)``; ``use`` picks the state dict in a file,
    the way :func:`ckptfit.load` does (:meth:`~ckptfit.checkpoint.Checkpoint.choose`), and ``option``
    is the diff option that passes it for this side (``use_a`` / ``use_b``), named in the advice;
    ``given`` the one the user passed (``use`` or that one)."""
    from .errors import CheckpointError

    cli = "--" + option.replace("_", "-")
    if os.path.exists(src):
        from .formats import open_checkpoint

        ckpt = open_checkpoint(src, trust=trust)
        try:
            choice = ckpt.choose(use)
        except CheckpointError as e:
            if use is None:
                raise
            detail = given + e.detail[3:] if e.detail.startswith("use=") else e.detail
            raise CheckpointError(detail, path=e.path, hint=f"pass one of those names as {option}= (CLI: {cli} "
                                                              f"NAME)") from None
        if choice.ambiguous:  # two complete state dicts (DINO's student and teacher): refused, not guessed
            names = [c.name for c in choice.ambiguous if c.name]
            raise CheckpointError(choice.ambiguity, path=ckpt.path, hint="choose one: " + " or ".join(
                f"{option}={n!r} (CLI: {cli} {n})" for n in names) + "; use= (CLI: --use NAME) picks the same "
                "name in both files")
        return dict(choice.candidate.tensors), True
    if ":" in src:
        from .loading.meta import parameters_on_meta
        from .specs import model_factory, parse_model_args

        factory = model_factory(src, parse_model_args(list(model_args)))
        with parameters_on_meta():
            model = _bounded(factory)
        return dict(model.state_dict()), False
    from .errors import CheckpointError

    raise CheckpointError(f"{src!r} is neither an existing path nor a model SPEC (like torchvision:resnet18)")


# Bounds on a model whose sizes come from a file (an ``hf:DIR`` SPEC's config.json). They cannot come from
# the other side of the diff, as load's do (specs.bounded_by_file): "what does this file lack" compares a file
# with a far larger model. So they are fixed, and generous. Parameters registered: transformers 5 holds a
# layer's experts in one tensor, so a 70B Llama registers ~700 and DeepSeek-V3 ~1,500; with one tensor per
# expert (transformers 4) the largest (a DeepSeek-V3-shaped config with 384 experts: 60 x 384 x 3) register
# ~70,000, under 100,000. Building costs time per registered parameter (num_hidden_layers=100_000 of a tiny
# BERT would run for minutes), so the limit stops it after 100,000. Real tensors computed in __init__ (position
# ids, rotary frequencies, masks: megabytes in real models) are held to MAX_INIT_BYTES, which refuses
# max_position_embeddings=300_000_000 (2.3 GiB of position ids) before the memory is taken. Parameter bytes are
# not bounded: on meta they take no memory, and a 1T-parameter model in float32 would hold 4 TB of them.
MAX_SPEC_PARAMETERS = 100_000


def _bounded(factory: Any) -> Any:
    """``factory()`` on meta, within the bounds above when its sizes come from a config.json (else as it is)."""
    cfg_dir = getattr(factory, "ckptfit_config_dir", None)
    if cfg_dir is None:
        return factory()
    from .specs import config_bounds

    with config_bounds(cfg_dir, max_parameters=MAX_SPEC_PARAMETERS, why="more than any real model",
                       instead="those of the model meant"):
        return factory()


def _dtype_name(t: Any) -> str:
    """A file's tensor's dtype by name (no torch import), or a model tensor's."""
    return t.dtype_name if isinstance(t, LazyTensor) else dtype_name(t.dtype)


def _spec(name: str, t: Any) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), _dtype_name(t))  # dtypes by name on both sides (match takes either)


def _same_bytes(x: Any, y: Any) -> bool:
    """Whether two file tensors hold the same bytes, read without torch (False when either is not one run
    of bytes in its file, or their dtypes differ)."""
    if not isinstance(x, LazyTensor) or not isinstance(y, LazyTensor) or x.dtype_name != y.dtype_name:
        return False
    sx, sy = x.byte_span(), y.byte_span()
    if (sx is None or sy is None or sx.nbytes != sy.nbytes or sx.stride != sy.stride
            or tuple(x.shape) != tuple(y.shape)):
        return False
    return all(a == b for a, b in zip(sx.chunks(), sy.chunks()))


def _values(t: Any) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


def diff_sources(a: str, b: str, *, model_args: Sequence[str] = (), values: bool = True,
                 trust: bool = False, use: str | None = None, use_a: str | None = None,
                 use_b: str | None = None) -> Diff:
    """Compare two checkpoints (or a checkpoint with a model): names, shapes, dtypes and values.

    Tensors are paired through the loader's matcher (:func:`ckptfit.matching.match`), so a
    renamed or re-prefixed tensor is reported as renamed, not as removed and added.

    Args:
        a: a checkpoint path.
        b: a checkpoint path, or a model SPEC (``"torchvision:resnet18"``) built on the meta device.
        model_args: ``K=V`` constructor arguments for the model SPEC ``b``.
        values: also compare the values of tensors present on both sides (reads them).
        trust: allow real unpickling (runs code from the files). Never needed for weights.
        use: which state dict in each file, as for :func:`ckptfit.load` (``"ema"``, ``"teacher"``,
            a key path); for a file holding two complete state dicts, which is refused without it.
        use_a: the same for A only (over ``use``): ``use_a="student", use_b="teacher"``
            compares the two state dicts of one DINO file.
        use_b: the same for B only (over ``use``).

    Returns:
        A :class:`Diff`; ``print()`` it, or ``.to_dict()`` for JSON.

    Raises:
        CheckpointError: a file cannot be read, holds two complete state dicts and no ``use``
            says which, or ``use`` matches none of its state dicts.

    Example:
        >>> print(ckptfit.diff("epoch10.pth", "epoch20.pth"))   # doctest: +SKIP
        >>> print(ckptfit.diff("dino.pth", "dino.pth", use_a="student", use_b="teacher"))  # doctest: +SKIP
    """
    for name, value in (("use", use), ("use_a", use_a), ("use_b", use_b)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"{name}= must be a state dict's name such as 'ema' or 'teacher', or a key path "
                            f"such as 'model.ema', not {value!r}")
    if use_b is not None and not os.path.exists(b) and ":" in b:
        raise ValueError(f"use_b={use_b!r} picks a state dict inside a checkpoint file, but B ({b!r}) is a model "
                         f"SPEC; leave use_b out")
    ta, va = _side(a, (), trust, use_a if use_a is not None else use, "use_a", "use" if use_a is None else "use_a")
    tb, vb = _side(b, model_args, trust, use_b if use_b is not None else use, "use_b",
                   "use" if use_b is None else "use_b")
    p = match([_spec(k, v) for k, v in tb.items()], [_spec(k, v) for k, v in ta.items()], partial=True)
    mapping = {d.source: d.target for d in p.decisions if d.action == "load" and d.source is not None}
    shape_pairs = {d.source: d.target for d in p.decisions if d.action == "skip_shape" and d.source is not None}
    renamed = tuple((s, t) for s, t in mapping.items() if s != t)
    shape_changed = tuple((t, tuple(ta[s].shape), tuple(tb[t].shape)) for s, t in shape_pairs.items())
    matched_a = set(mapping) | set(shape_pairs)
    matched_b = set(mapping.values()) | set(shape_pairs.values())
    tied_b = {d.target for d in p.decisions if d.action == "tied"}
    removed = tuple(k for k in ta if k not in matched_a)
    added = tuple(k for k in tb if k not in matched_b and k not in tied_b)
    dtype_changed = tuple((t, _dtype_name(ta[s]), _dtype_name(tb[t]))
                          for s, t in mapping.items() if _dtype_name(ta[s]) != _dtype_name(tb[t]))
    diffs: dict[str, float] = {}
    compare = values and va and vb
    if compare and mapping:
        rest = {}
        for s, t in mapping.items():
            if _same_bytes(ta[s], tb[t]):
                diffs[t] = 0.0  # (byte-identical: no torch needed to say so)
            else:
                rest[s] = t
        if rest:
            import torch  # values that differ are measured as tensors

        for s, t in rest.items():
            x, y = _values(ta[s]), _values(tb[t])
            if x.is_floating_point() or y.is_floating_point() or x.is_complex():
                d = (x.to(torch.float64) - y.to(torch.float64)).abs()
                diffs[t] = float(d.max()) if d.numel() else 0.0
            else:
                diffs[t] = 0.0 if torch.equal(x, y.to(x.dtype)) else float((x.long() - y.long()).abs().max())
    return Diff(a, b, added, removed, renamed, shape_changed, dtype_changed, diffs, len(mapping), bool(compare))
