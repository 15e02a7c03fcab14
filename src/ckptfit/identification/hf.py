"""Hugging Face transformers families: tiny sentinel-sized signatures of each head class, the
sizes (hidden size, layers, heads, vocabulary) read from the checkpoint's shapes, and the
candidate rebuilt with them and scored."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


from ..matching import match
from ..plans import TensorSpec
from .cache import write_json
from .results import Candidate
from .scoring import KNOWN_SCORE, Query, score_signature, strip_common
from .signatures import Store, key_patterns, on_meta, quiet, signature_of

__all__ = ["HF_FAMILIES", "build_hf_family", "hf_candidates", "looks_hf"]

# Hugging Face families indexed by default (model_type in transformers' registry).
HF_FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra", "gpt2", "llama", "mistral", "qwen2",
               "t5", "bart", "vit", "opt", "gpt_neox")
# Sizes used to build tiny family signatures; each value found again in a checkpoint's shape
# at the same place is that size.
_HF_SENTINELS = {"hidden_size": 48, "intermediate_size": 76, "vocab_size": 97, "max_position_embeddings": 67,
                 "type_vocab_size": 3, "num_labels": 11}
_HF_BUILD = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0}
_HF_EXTRA = {  # configs whose sizes are not reachable through the standard names
    "t5": {"d_ff": 76, "d_kv": 12, "num_decoder_layers": 2},
    "gpt2": {"n_inner": 76},
    "bart": {"encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 76, "decoder_ffn_dim": 76,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4},
    "distilbert": {"hidden_dim": 76},
    "opt": {"ffn_dim": 76, "word_embed_proj_dim": 48},
    "albert": {"embedding_size": 48},
}
_HF_HEADS = ("MODEL_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
             "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
             "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
             "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
_LAYER_RE = re.compile(r"(?:^|\.)(encoder|decoder)?[^.]*?\.?(?:layers?|h|blocks?)\.(\d+)\.")


def _hf_config(model_type: str, values: Mapping[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **dict(values))


def _hf_entries(model_type: str) -> list[tuple[str, str]]:
    """``[(head_mapping, class_name)]`` for a family, base model first."""
    import transformers.models.auto.modeling_auto as ma

    out: list[tuple[str, str]] = []
    for mapping in _HF_HEADS:
        cls = getattr(ma, mapping, {}).get(model_type)
        if isinstance(cls, tuple | list):
            cls = cls[0]
        if isinstance(cls, str) and cls not in [c for _, c in out]:
            out.append((mapping, cls))
    return out


def build_hf_family(model_type: str) -> dict:
    """Tiny sentinel-sized signatures of every head class of one transformers family."""
    import transformers

    values = {**_HF_SENTINELS, **_HF_BUILD, **_HF_EXTRA.get(model_type, {})}
    fam: dict[str, Any] = {"model_type": model_type, "classes": {}}
    with quiet():
        try:
            config = _hf_config(model_type, values)
        except Exception as e:  # noqa: BLE001
            fam["error"] = f"{type(e).__name__}: {e}"
            return fam
        for _mapping, cls_name in _hf_entries(model_type):
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                continue
            try:
                model = on_meta(lambda: cls(config))
            except Exception:  # noqa: BLE001
                continue
            keys, shapes, tied = signature_of(model)
            fam["classes"][cls_name] = {"keys": keys, "shapes": shapes, "tied": tied}
    return fam


def _hf_read_sizes(tiny: dict, query: Query) -> dict[str, int]:
    """Sizes read from the checkpoint at the places the tiny model has its sentinels."""
    keys, shapes = tiny["keys"], tiny["shapes"]
    p = match([TensorSpec(k, tuple(s), "float32") for k, s in zip(keys, shapes)], query.specs, partial=True)
    q_shape = {s.name: s.shape for s in query.specs}
    votes: dict[str, Counter] = {k: Counter() for k in _HF_SENTINELS}
    by_value = {v: (k, 0) for k, v in _HF_SENTINELS.items()}
    pos = _HF_SENTINELS["max_position_embeddings"]
    by_value.update({pos + 1: ("max_position_embeddings", 1), pos + 2: ("max_position_embeddings", 2)})  # OPT: +2
    for d in p.decisions:
        if d.source is None or d.source not in q_shape:
            continue
        src = q_shape[d.source]
        if len(src) != len(d.target_shape):
            continue
        for t, s in zip(d.target_shape, src):
            if t in by_value:
                name, offset = by_value[t]
                votes[name][s - offset] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items() if c}


def _hf_layers(names: Iterable[str]) -> dict[str, int]:
    enc: set[int] = set()
    dec: set[int] = set()
    for n in names:
        m = _LAYER_RE.search(n)
        if m:
            (dec if m.group(1) == "decoder" else enc).add(int(m.group(2)))
    out = {}
    if enc:
        out["num_hidden_layers"] = max(enc) + 1
    if dec:
        out["num_decoder_layers"] = max(dec) + 1
        out.setdefault("num_hidden_layers", max(dec) + 1)  # decoder-only models (OPT: model.decoder.layers)
    return out


def hf_candidates(query: Query, families: Sequence[str], store: Store, recorded: Mapping[str, Any] | None,
                   notes: list[str], sigs: dict[str, dict]) -> list[Candidate]:
    fams = store.data.setdefault("families", {})
    built = [f for f in families if f not in fams]
    for f in built:
        fams[f] = build_hf_family(f)
    if built:
        write_json(store.path, store.data)
        notes.append(f"indexed {len(built)} transformers families")
    # family and head class by key patterns (prefix-free)
    ranked = []
    for f in families:
        for cls_name, sig in (fams.get(f) or {}).get("classes", {}).items():
            pats = key_patterns(strip_common(sig["keys"]))
            inter = len(pats & query.patterns)
            if not inter:
                continue
            ranked.append((inter / len(pats | query.patterns), inter / len(pats), f, cls_name, sig))
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    out: list[Candidate] = []
    rec_type = recorded.get("model_type") if recorded else None
    for jac, cover, f, cls_name, tiny in ranked[:3]:
        if cover < 0.6 and f != rec_type:
            continue
        sizes = _hf_read_sizes(tiny, query)
        sizes.update(_hf_layers(s.name for s in query.specs))
        kv_dim = None
        values: dict[str, Any] = dict(sizes)
        for name, v in _HF_EXTRA.get(f, {}).items():  # the family's own names for the same sizes
            for std in ("intermediate_size", "hidden_size"):
                if v == _HF_SENTINELS[std] and std in sizes:
                    values[name] = sizes[std]
        how = "read from the shapes"
        if recorded and recorded.get("model_type") == f:
            for k in ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "head_dim"):
                if k in recorded:
                    values[k] = recorded[k]
            how = "read from the shapes; heads from config.json"
        elif "hidden_size" in sizes:
            heads = sizes["hidden_size"] // 64 if sizes["hidden_size"] % 64 == 0 else 1
            values["num_attention_heads"] = max(heads, 1)
            how = "read from the shapes; heads assumed (head_dim 64: heads are not visible in shapes)"
        if f in ("llama", "mistral", "qwen2"):
            kv = next((s.shape[0] for s in query.specs if s.name.endswith("self_attn.k_proj.weight")), None)
            heads = values.get("num_attention_heads")
            if kv and heads and sizes.get("hidden_size"):
                kv_dim = kv
                values["num_key_value_heads"] = max(kv_dim // (sizes["hidden_size"] // heads), 1)
        cand = _hf_verify(f, cls_name, values, query, how, sigs)
        if cand is not None:
            out.append(cand)
    return out


def _hf_verify(model_type: str, cls_name: str, values: dict, query: Query, how: str,
               sigs: dict[str, dict]) -> Candidate | None:
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None
    try:
        with quiet():
            config = _hf_config(model_type, values)
            model = on_meta(lambda: cls(config))
    except Exception:  # noqa: BLE001 - inferred sizes the family rejects
        return None
    keys, shapes, tied = signature_of(model)
    sig = {"arch": f"transformers.{cls_name}", "keys": keys, "shapes": shapes, "tied": tied, "kwargs": {},
           "spec": None, "registry": "transformers"}
    sigs[sig["arch"]] = sig
    c = score_signature(sig, query)
    kw = {"model_type": model_type, **values}  # every value the config needs to rebuild it
    explained = c.explained + f"; sizes {how}" if c.score >= KNOWN_SCORE else c.explained
    return Candidate(c.architecture, kw, c.score, explained, None, c.differences)


def looks_hf(query: Query) -> bool:
    marks = ("embeddings.word_embeddings", "embed_tokens", ".wte.", "wte.weight", "self_attn.q_proj", "attention.self",
             "encoder.block.", "embed_in", "shared.weight", "lm_head", "attn.c_attn", "embeddings.patch_embeddings")
    return any(m in k for k in query.keys[:200] for m in marks)
