"""The lazy :class:`Checkpoint`: what a file holds, described without reading tensor bytes.

A format reader (:mod:`ckptfit.formats`) turns a file or directory into a ``Checkpoint``: the
nested container tree with :class:`~ckptfit.lazy.LazyTensor` leaves, plain-data metadata,
the safety scan of every pickle it interpreted, and the candidate state dicts inside (found
and chosen among by :mod:`ckptfit.state_dicts`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._gc import gc_paused
from .errors import CheckpointError
from .lazy import LazyTensor
from .safety import PickleScan, Placeholder, to_plain
from .state_dicts import (META_KEYS, Choice, StateDictCandidate, candidate_kind, choose_candidate, find_candidates,
                          is_optimizer_state, mark_candidates, module_state)

# StateDictCandidate, Choice and is_optimizer_state (ckptfit.state_dicts) stay importable from here.
__all__ = ["Checkpoint", "StateDictCandidate", "Safety", "Choice", "is_optimizer_state", "as_checkpoint"]

_SCHED_WORDS = ("sched", "lr_")


@dataclass(frozen=True)
class Safety:
    """The safety verdict of a checkpoint's pickles.

    Attributes:
        verdict: ``"no pickle"`` (safetensors), ``"safe"`` (only tensor machinery and known data),
            ``"safe, with placeholders"`` (unknown classes kept inert), ``"trusted"`` (read with
            ``trust=True``: real unpickling was allowed).
        unknown: class paths kept as inert placeholders.
        anomalies: oddities found while reading (trailing data, unclosed marks ...).
    """

    verdict: str
    unknown: tuple[str, ...] = ()
    anomalies: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "unknown_classes": list(self.unknown), "anomalies": list(self.anomalies)}


class Checkpoint:
    """A checkpoint opened by :func:`ckptfit.open`: everything it holds, no tensor bytes read.

    Attributes:
        format: the reader that recognised it (``torch-zip``, ``torch-legacy``, ``safetensors``,
            ``hf-folder``, ``dcp``, ``torchscript``, ``pickle``).
        path: the file or directory.
        tree: the nested containers as saved, tensors as :class:`LazyTensor`, unknown objects as
            inert placeholders.
        scans: one :class:`~ckptfit.safety.PickleScan` per pickle interpreted.
        trusted: whether it was read with ``trust=True`` (real unpickling).
    """

    def __init__(self, *, path: str | os.PathLike[str], format: str, tree: Any,
                 scans: tuple[PickleScan, ...] = (), metadata: dict | None = None, trusted: bool = False,
                 candidates: list[StateDictCandidate] | None = None, size: int | None = None,
                 closers: tuple[Callable[[], None], ...] = ()):
        self.path = os.fspath(path)
        self.format = format
        self.tree = tree
        self.scans = tuple(scans)
        self.trusted = trusted
        self._extra_metadata = metadata or {}
        self._candidates = candidates
        self._size = size
        self._closers = closers
        self._cached: list[StateDictCandidate] | None = None

    # ------------------------------------------------------------------ context management
    def close(self) -> None:
        """Release file handles (tensors already loaded stay valid)."""
        for c in self._closers:
            c()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, format={self.format!r}, tensors={self.num_tensors})"

    # ------------------------------------------------------------------ size
    @property
    def size(self) -> int:
        """Bytes on disk (all files of a directory checkpoint)."""
        if self._size is None:
            if os.path.isdir(self.path):
                self._size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(self.path) for f in fs)
            else:
                self._size = os.path.getsize(self.path)
        return self._size

    def tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """Every tensor in the tree with its key path (each stored tensor once)."""
        seen: set[int] = set()
        stack: list[tuple[str, Any]] = [("", self.tree)]
        out: list[tuple[str, LazyTensor]] = []
        while stack:
            prefix, obj = stack.pop()
            if isinstance(obj, LazyTensor):
                if id(obj) not in seen:
                    seen.add(id(obj))
                    out.append((prefix, obj))
                continue
            if id(obj) in seen:
                continue
            children: list[tuple[str, Any]] = []
            if isinstance(obj, dict):
                seen.add(id(obj))
                children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in obj.items()]
            elif isinstance(obj, list | tuple):
                seen.add(id(obj))
                children = [(f"{prefix}.{i}" if prefix else str(i), v) for i, v in enumerate(obj)]
            elif isinstance(obj, Placeholder):
                seen.add(id(obj))
                ms = module_state(obj)
                items = ms.items() if ms is not None else list(obj.attributes().items()) + list(obj.dict_items.items())
                children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in items]
            stack.extend(reversed(children))
        yield from out

    @property
    def num_tensors(self) -> int:
        return sum(1 for _ in self.tensors())

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors())

    # ------------------------------------------------------------------ metadata and safety
    @property
    def metadata(self) -> dict:
        """Plain data saved beside the weights: epoch, global_step, versions, hyper_parameters, args ..."""
        md: dict[str, Any] = {}
        if isinstance(self.tree, dict):
            cand_names = {c.name for c in self.state_dicts()}
            for k, v in self.tree.items():
                if not isinstance(k, str) or k in cand_names or k in META_KEYS:
                    continue
                if isinstance(v, LazyTensor):
                    continue
                if (candidate_kind(k) == "optimizer" or any(w in k.lower() for w in _SCHED_WORDS)) and \
                        isinstance(v, dict | list | tuple):
                    md[k] = f"<{_summary(v)}>"  # optimizer and scheduler states: their size, not their contents
                    continue
                if isinstance(v, dict) and v and all(isinstance(x, LazyTensor) for x in v.values()):
                    continue
                md[k] = to_plain(v)
        md.update(self._extra_metadata)
        return md

    @property
    def safety(self) -> Safety:
        if self.trusted:
            return Safety("trusted")
        if not self.scans:
            return Safety("no pickle")
        unknown: list[str] = []
        anomalies: list[str] = []
        for s in self.scans:
            for g in s.globals:
                if g.kind == "unknown" and g.qualname not in unknown and not _format_internal(self.format, g.module):
                    unknown.append(g.qualname)
            anomalies.extend(f"{s.member}: {a}" if s.member else a for a in s.anomalies)
        return Safety("safe, with placeholders" if unknown else "safe", tuple(unknown), tuple(anomalies))

    # ------------------------------------------------------------------ state dicts
    def state_dicts(self) -> list[StateDictCandidate]:
        """Every candidate set of model weights in the file, the default one marked.

        Example:
            >>> ckpt = ckptfit.open("model_best.pth.tar")           # doctest: +SKIP
            >>> [(c.name, c.kind, c.default) for c in ckpt.state_dicts()]  # doctest: +SKIP
            [('state_dict', 'model', True), ('state_dict_ema', 'ema', False)]
        """
        if self._cached is None:
            with gc_paused():
                found = self._candidates if self._candidates is not None else find_candidates(self.tree)
                self._cached = mark_candidates(found)
        return list(self._cached)

    def state_dict(self, use: str | None = None) -> StateDictCandidate:
        """The candidate chosen by ``use`` (a name, a key path, or ``"ema"``), else the default.

        The same choice :func:`ckptfit.load` makes (:meth:`choose`), without a model to fit.

        Raises:
            CheckpointError: nothing matches ``use``, the file holds no tensors at all, or it
                holds two complete, equally plausible state dicts and ``use`` does not say which.
        """
        choice = self.choose(use)
        if choice.ambiguous:
            raise CheckpointError(choice.ambiguity, path=self.path, hint=choice.hint)
        return choice.candidate

    def choose(self, use: str | None = None, *,
               fit: Callable[[StateDictCandidate], tuple[bool, int]] | None = None) -> Choice:
        """Which state dict inside the file to load: the one chooser behind ``load``, ``plan`` and ``convert``.

        Args:
            use: a candidate's key path (``"teacher"``, ``"model.ema"``, or ``"model/ema"``), its
                last segment, a kind (``"ema"``, ``"model"``), or a key prefix inside one state
                dict (``"model_ema"`` in a Lightning file holding ``model.*`` and ``model_ema.*``).
            fit: for a model at hand, ``candidate -> (fits, tensors loaded)``. Without ``use``,
                a candidate that fits the model clearly better than the default is taken instead.

        Returns:
            A :class:`Choice`. Its ``ambiguous`` is non-empty when, without ``use``, two or more
            complete state dicts are equally plausible (``{"student": sd, "teacher": sd}``): the
            caller refuses rather than guesses. The model's own weights beside an EMA copy are
            not ambiguous: the model's own are the default, the EMA copy is ``use="ema"``.

        Raises:
            CheckpointError: the file holds no tensors, or ``use`` matches nothing.
        """
        return choose_candidate(self.state_dicts(), use, fit=fit, path=self.path)


def _format_internal(fmt: str, module: str) -> bool:
    """Classes a format's own bookkeeping pickles (DCP's metadata, TorchScript's module classes).

    They are still inert placeholders; they are just not worth a user's attention in a verdict.
    """
    if fmt == "dcp":
        return module.startswith("torch.distributed.checkpoint") or module == "pathlib"
    if fmt == "torchscript":
        return module.startswith("__torch__")
    return False


def _summary(v: Any) -> str:
    if isinstance(v, dict):
        return f"dict with {len(v)} entries"
    if isinstance(v, list | tuple):
        return f"{type(v).__name__} of {len(v)}"
    return type(v).__name__


def as_checkpoint(source: Any, trust: bool, sha256: str | None = None) -> tuple[Checkpoint, bool]:
    """Any :data:`ckptfit.Source` as a :class:`Checkpoint`, and whether it was opened here (to close).

    A path is opened by the format readers without importing torch; a state dict or a module (which
    already hold torch tensors) is wrapped in place.
    """
    if isinstance(source, Checkpoint):
        return source, False
    if isinstance(source, str | os.PathLike):
        from .formats import open_checkpoint

        return open_checkpoint(source, trust=trust, sha256=sha256), True
    if sha256 is not None:
        raise TypeError("sha256= checks a file; pass the path (not an opened checkpoint or a state dict)")
    from collections.abc import Mapping

    if isinstance(source, Mapping):
        from .formats.torch_zip import wrap_real

        return Checkpoint(path="<state dict>", format="in-memory", tree=wrap_real(dict(source))), False
    from torch import nn

    if isinstance(source, nn.Module):
        return Checkpoint(path=f"<{type(source).__name__}>", format="in-memory",
                          tree={k: LazyTensor.of(v) for k, v in source.state_dict().items()}), False
    raise TypeError(f"source must be a path, a Checkpoint or a state dict, not {type(source).__name__}")
