"""EMA copies stored under the model's names with the dots removed (latent-diffusion's ``LitEma``).

``LitEma`` (latent-diffusion, Stable Diffusion v1 ``.ckpt`` files) registers one buffer per
parameter of the model it follows, named ``name.replace('.', '')``: the EMA of
``model.diffusion_model.input_blocks.0.0.weight`` is ``model_ema.diffusion_modelinput_blocks00weight``,
beside two bookkeeping buffers ``decay`` and ``num_updates``. With ``use='ema'`` those names are
mapped back through the dotted names stored beside them in the same state dict (``model.*``), only
when every EMA name maps to exactly one dotted name; when two dotted names lose their dots to the
same string (``blocks.1.0.weight`` and ``blocks.10.weight`` are both ``blocks10weight``) nothing is
guessed and the choice is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError

__all__ = ["undot"]

# LitEma's own buffers: not weights of the model it follows.
_LITEMA_BOOKKEEPING = ("decay", "num_updates")


def undot(outer: Mapping[str, Any], prefix: str, path: str | None = None) -> tuple[dict[str, Any], str] | None:
    """Map a LitEma copy's dotless names back to dotted ones, or None when ``prefix`` holds no such copy.

    Args:
        outer: the whole state dict (``{"model.x.weight": ..., "model_ema.xweight": ...}``).
        prefix: the EMA copy's key prefix with its dot (``"model_ema."``).
        path: the file, for errors.

    Returns:
        ``({dotted name: tensor}, note)``: the names as the followed module has them (relative to
        the prefix whose dotted names they come from, e.g. ``"model."``), and a line for the report.

    Raises:
        CheckpointError: two dotted names lose their dots to the same EMA name (the mapping is not unique).

    Example:
        >>> sd = {"model.a.0.weight": 1, "model_ema.a0weight": 2, "model_ema.decay": 3}
        >>> undot(sd, "model_ema.")
        ({'a.0.weight': 2}, "LitEma's dotless names mapped back onto the 1 dotted names under 'model.' (its decay, num_updates left out)")
    """
    ema = {k[len(prefix):]: t for k, t in outer.items() if k.startswith(prefix)}
    names = [k for k in ema if k not in _LITEMA_BOOKKEEPING]
    if not names or any("." in k for k in names) or not any(k in ema for k in _LITEMA_BOOKKEEPING):
        return None
    # every other leading segment whose dotted names, dots removed, cover all of the EMA names
    firsts = dict.fromkeys(k.split(".", 1)[0] + "." for k in outer if "." in k and not k.startswith(prefix))
    found = []
    for other in firsts:
        table: dict[str, list[str]] = {}
        for k in outer:
            if k.startswith(other):
                rel = k[len(other):]
                table.setdefault(rel.replace(".", ""), []).append(rel)
        if all(n in table for n in names):
            found.append((other, table))
    if len(found) != 1:
        return None
    other, table = found[0]
    clashes = {n: table[n] for n in names if len(table[n]) > 1}
    if clashes:
        n, dotted = next(iter(clashes.items()))
        shown = " and ".join(f"'{other}{d}'" for d in dotted[:3])
        raise CheckpointError(
            f"use='ema': the EMA copy under '{prefix}' stores names with the dots removed (LitEma), and "
            f"{len(clashes)} of them cannot be mapped back: '{prefix}{n}' could be {shown}; nothing is guessed",
            path=path, hint="load the model's own weights (leave use= out), or write the EMA tensors under "
                            "dotted names yourself and load that state dict")
    out = {table[n][0]: ema[n] for n in names}
    left = ", ".join(k for k in _LITEMA_BOOKKEEPING if k in ema)
    note = (f"LitEma's dotless names mapped back onto the {len(out)} dotted names under '{other}' "
            f"(its {left} left out)")
    return out, note
