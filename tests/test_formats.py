"""Every reader against files written by the real library that writes that format.

Each test writes a tiny checkpoint the way users get one (``torch.save`` both serializations,
``safetensors``, ``save_pretrained``, ``torch.distributed.checkpoint`` in one and two processes,
``torch.jit.save``, a Lightning ``Trainer``, timm-style training dicts, a GPU box), then checks
what :func:`ckptfit.open` says about it: the format, every tensor (``torch.equal`` after
``.load()``, dtype, shape, saved device), plain-data metadata, and the candidate state dicts
with the default and its reason. No tensor bytes may be read until ``.load()``.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing as mp
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ckptfit
from ckptfit.lazy import MappedFile


class Net(nn.Module):
    """Conv, batch norm (with num_batches_tracked), linear, and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    m = Net()
    m.bn.running_mean.uniform_()  # buffers that differ from their init
    m.bn.num_batches_tracked.fill_(7)
    return m


def assert_same(tensors: dict[str, ckptfit.LazyTensor], expected: dict[str, torch.Tensor], *,
                device: str = "cpu") -> None:
    """Same keys in the same order; each tensor's dtype, shape, saved device and bytes as saved."""
    assert list(tensors) == list(expected)
    for key, want in expected.items():
        lazy = tensors[key]
        assert lazy.dtype == want.dtype, key
        assert lazy.shape == tuple(want.shape), key
        assert lazy.device == device, key
        assert lazy.nbytes == want.numel() * want.element_size(), key
        got = lazy.load()
        assert got.device.type == "cpu", key
        assert torch.equal(got, want.cpu()), key


@pytest.fixture
def tensor_reads(monkeypatch) -> list[tuple]:
    """Every read of tensor bytes from a mapped file, recorded (the reads still happen)."""
    calls: list[tuple] = []
    real_tensor, real_read = MappedFile.tensor, MappedFile.read

    def tensor(self, offset, dtype, count):
        calls.append(("tensor", self.path, offset, count))
        return real_tensor(self, offset, dtype, count)

    def read(self, offset, nbytes):
        calls.append(("read", self.path, offset, nbytes))
        return real_read(self, offset, nbytes)

    monkeypatch.setattr(MappedFile, "tensor", tensor)
    monkeypatch.setattr(MappedFile, "read", read)
    return calls


def describe(ckpt: ckptfit.Checkpoint) -> None:
    """Everything `ckptfit inspect` would show; must not touch tensor bytes."""
    for _ in ckpt.tensors():
        pass
    json.dumps(ckpt.metadata)  # plain data only
    assert ckpt.num_bytes >= 0
    for c in ckpt.state_dicts():
        assert c.num_tensors and c.num_bytes >= 0 and c.reason
    ckpt.safety.to_dict()


# --------------------------------------------------------------------------- torch.save


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_training_dict(tmp_path, tensor_reads, zip_format):
    m = _net()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": m.state_dict(), "epoch": 3, "global_step": 120, "best_acc": 0.5,
                "classes": ["cat", "dog"]}, path, _use_new_zipfile_serialization=zip_format)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
    assert ckpt.safety.verdict == "safe"
    md = ckpt.metadata
    assert md["epoch"] == 3 and md["global_step"] == 120 and md["best_acc"] == 0.5
    assert md["classes"] == ["cat", "dog"]
    assert "state_dict" not in md
    [cand] = ckpt.state_dicts()
    assert (cand.name, cand.kind, cand.default) == ("state_dict", "model", True)
    assert cand.reason == "the only set of weights in the file"
    assert cand.num_tensors == 9  # the non-persistent buffer is not saved
    assert cand.num_bytes == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert_same(cand.tensors, m.state_dict())
    assert tensor_reads  # the spy sees reads: loading is where they happen
    ckpt.close()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_pickle_protocols(tmp_path, zip_format, protocol):
    sd = _net().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "epoch": 4}, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    ckpt = ckptfit.open(path)
    assert ckpt.format == ("torch-zip" if zip_format else "torch-legacy")
    assert ckpt.metadata["epoch"] == 4
    assert_same(ckpt.state_dict().tensors, sd)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_dtypes_views_and_shared_storage(tmp_path, zip_format):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    sd = {
        "f32": torch.randn(3, 4), "f16": torch.randn(3).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "f64": torch.randn(2).double(), "i64": torch.arange(5), "i32": torch.arange(4, dtype=torch.int32),
        "i8": torch.arange(-2, 2, dtype=torch.int8), "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "c64": torch.randn(2, dtype=torch.complex64),
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3),
        "rows": base[2:4], "transposed": base.t(), "column": base[:, 1], "base": base, "tied": base,
    }
    path = tmp_path / "dtypes.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    ckpt = ckptfit.open(path)
    tensors = ckpt.state_dict().tensors
    assert_same(tensors, sd)
    assert tensors["transposed"].load().stride() == sd["transposed"].stride()
    # one storage, five views: counted once in the file's bytes
    assert ckpt.num_bytes < sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_whole_pickled_module_is_read_without_running_code(tmp_path, tensor_reads, zip_format):
    m = _net()
    m.alias = m.fc  # one submodule under two names: nn.Module.state_dict lists it twice
    path = tmp_path / "model.pt"
    torch.save(m, path, _use_new_zipfile_serialization=zip_format)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.safety.verdict == "safe, with placeholders"
    assert f"{Net.__module__}.Net" in ckpt.safety.unknown
    assert "torch.nn.modules.conv.Conv2d" in ckpt.safety.unknown
    [cand] = ckpt.state_dicts()
    assert (cand.name, cand.kind, cand.default) == ("", "module", True)
    assert "scratch" not in cand.tensors  # non-persistent, as nn.Module.state_dict
    assert_same(cand.tensors, m.state_dict())
    assert cand.tensors["fc.weight"].is_parameter
    assert cand.tensors["fc.weight"].requires_grad


def test_pickled_module_shared_without_end_is_refused(tmp_path):
    """Each level holds the next one twice: 2**20 paths from 21 modules; bounded, not walked."""
    m = nn.Linear(1, 1)
    for _ in range(20):
        parent = nn.Module()
        parent.a, parent.b = m, m
        m = parent
    path = tmp_path / "chain.pt"
    torch.save(m, path)
    ckpt = ckptfit.open(path)
    with pytest.raises(ckptfit.ResourceLimitExceeded, match=r"pickled module tree expands to more than"):
        ckpt.state_dicts()


def test_pickled_modules_in_a_training_dict(tmp_path):
    """YOLOv5-style: whole half-precision modules under "model" and "ema", an empty optimizer."""
    model = _net().half()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.fc.weight.mul_(0.5)
    path = tmp_path / "best.pt"
    torch.save({"epoch": 5, "model": model, "ema": ema, "updates": 10, "optimizer": None, "date": "2024-01-01"},
               path)

    ckpt = ckptfit.open(path)
    cands = {c.name: c for c in ckpt.state_dicts()}
    assert [(c.kind, c.default) for c in cands.values()] == [("module", True), ("ema", False)]
    assert list(cands) == ["model", "ema"]
    assert_same(cands["model"].tensors, model.state_dict())
    assert_same(cands["ema"].tensors, ema.state_dict())
    assert ckpt.metadata == {"epoch": 5, "updates": 10, "optimizer": None, "date": "2024-01-01"}


def test_timm_style_training_checkpoint(tmp_path, tensor_reads):
    model = _net()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()  # momentum buffers: tensors in the optimizer state that are not model weights
    args = argparse.Namespace(model="net", lr=0.1, epochs=3, sched=None, amp=True)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 2, "arch": "net", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": args, "metric": 71.5, "state_dict_ema": ema.state_dict()}, path)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    cands = {c.name: c for c in ckpt.state_dicts()}
    assert list(cands) == ["state_dict", "state_dict_ema"]  # no optimizer momentum buffers
    assert cands["state_dict"].default and cands["state_dict"].kind == "model"
    assert "'state_dict_ema' (ema)" in cands["state_dict"].reason
    assert not cands["state_dict_ema"].default and cands["state_dict_ema"].kind == "ema"
    assert "use='state_dict_ema'" in cands["state_dict_ema"].reason
    assert ckpt.state_dict("ema") is not None and ckpt.state_dict("ema").name == "state_dict_ema"
    assert_same(cands["state_dict"].tensors, model.state_dict())
    assert_same(cands["state_dict_ema"].tensors, ema.state_dict())

    md = ckpt.metadata
    assert md["epoch"] == 2 and md["arch"] == "net" and md["metric"] == 71.5
    assert md["args"] == {"__class__": "argparse.Namespace", "model": "net", "lr": 0.1, "epochs": 3,
                          "sched": None, "amp": True}
    assert md["optimizer"] == "<dict with 2 entries>"
    assert "argparse.Namespace" in ckpt.safety.unknown
    json.dumps(md)


def test_same_state_dict_saved_under_two_names(tmp_path):
    sd = _net().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "state_dict_ema": sd}, path)  # one object, pickled once
    cands = ckptfit.open(path).state_dicts()
    assert [(c.name, c.kind, c.default) for c in cands] == [("state_dict", "model", True),
                                                            ("state_dict_ema", "ema", False)]
    assert_same(cands[1].tensors, sd)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_gpu_saved_file_reads_on_cpu_without_options(tmp_path, monkeypatch, zip_format):
    import torch.serialization as ser

    sd = _net().state_dict()
    real = ser.location_tag
    path = tmp_path / "gpu.pt"
    with monkeypatch.context() as mp_:
        mp_.setattr(ser, "location_tag", lambda s: "cuda:0" if real(s) == "cpu" else real(s))
        torch.save({"model": sd}, path, _use_new_zipfile_serialization=zip_format)
    if not torch.cuda.is_available():  # the file really is a "GPU" file for torch.load
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)

    ckpt = ckptfit.open(path)
    cand = ckpt.state_dict()
    assert cand.name == "model"
    assert_same(cand.tensors, sd, device="cuda:0")


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("metadata", [None, {"format": "pt", "epoch": "3", "config": '{"depth": 2}'}],
                         ids=["plain", "metadata"])
def test_safetensors_file(tmp_path, tensor_reads, metadata):
    from safetensors.torch import save_file

    sd = _net().state_dict()
    sd["half"] = torch.randn(3, 2).half()
    sd["bf16"] = torch.randn(5).bfloat16()
    path = tmp_path / "weights.bin"  # the extension says nothing: content decides
    save_file(sd, str(path), metadata=metadata)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "safetensors"
    assert ckpt.safety.verdict == "no pickle"
    if metadata:
        assert ckpt.metadata == {"format": "pt", "epoch": "3", "config": {"depth": 2}}
    else:
        assert ckpt.metadata == {}
    [cand] = ckpt.state_dicts()
    assert cand.default and cand.kind == "model"
    assert_same(cand.tensors, collections.OrderedDict((k, sd[k]) for k in cand.tensors))
    assert set(cand.tensors) == set(sd)


def test_plain_pickle_of_numpy_arrays(tmp_path):
    import pickle

    import numpy as np

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3), "step": 3}
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=4)
    ckpt = ckptfit.open(path)
    assert ckpt.format == "pickle"
    assert ckpt.metadata == {"step": 3}
    assert_same(ckpt.state_dict().tensors, {"w": torch.from_numpy(arrays["w"]), "b": torch.from_numpy(arrays["b"])})


# --------------------------------------------------------------------------- Hugging Face folders


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(config)


def test_save_pretrained_sharded(tmp_path, tensor_reads):
    model = _tiny_bert()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3, shards

    ckpt = ckptfit.open(tmp_path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "hf-folder"
    assert ckpt.metadata["index"]["file"] == "model.safetensors.index.json"
    assert ckpt.metadata["index"]["shards"] == len(shards)
    assert ckpt.metadata["config"]["model_type"] == "bert"
    [cand] = ckpt.state_dicts()
    assert cand.default
    sd = model.state_dict()
    assert set(cand.tensors) == set(sd)
    assert_same(cand.tensors, collections.OrderedDict((k, sd[k]) for k in cand.tensors))


def test_sharded_bin_folder(tmp_path, tensor_reads):
    """The layout transformers 4 wrote: pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json."""
    sd = _net().state_dict()
    keys = list(sd)
    parts = [keys[:3], keys[3:7], keys[7:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    ckpt = ckptfit.open(tmp_path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "hf-folder"
    assert ckpt.metadata["index"] == {"file": "pytorch_model.bin.index.json", "shards": 3, "total_size": total}
    assert "config" not in ckpt.metadata
    assert ckpt.safety.verdict == "safe"
    assert_same(ckpt.state_dict().tensors, sd)


def test_single_file_hf_folder(tmp_path):
    from safetensors.torch import save_file

    sd = _net().state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "net"}')
    ckpt = ckptfit.open(tmp_path)
    assert ckpt.format == "hf-folder"
    assert ckpt.metadata == {"file": "model.safetensors", "config": {"model_type": "net"}}
    assert set(ckpt.state_dict().tensors) == set(sd)


# --------------------------------------------------------------------------- torch.distributed.checkpoint


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_save_one_process(tmp_path, tensor_reads):
    import torch.distributed.checkpoint as dcp

    model = _net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    sd = model.state_dict()
    dcp.save({"model": sd, "step": 5}, checkpoint_id=str(tmp_path))

    ckpt = ckptfit.open(tmp_path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "dcp"
    assert ckpt.metadata == {"step": 5}
    [cand] = ckpt.state_dicts()
    assert (cand.name, cand.default) == ("model", True)
    assert_same(cand.tensors, sd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtensor_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(6, 4), "b": torch.randn(5), "r": torch.randn(3, 3), "h": torch.randn(4, 6).half()}


def _save_dtensor_shards(rank: int, world: int, port: int, out: str, err: str) -> None:
    """One rank: its shard of each DTensor, saved with torch.distributed.checkpoint (gloo, CPU)."""
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", (world,))
            full = _dtensor_state()
            placements = {"w": Shard(0), "b": Shard(0), "r": Replicate(), "h": Shard(1)}
            sd = {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in full.items()}
            dcp.save({"model": sd, "step": 3}, checkpoint_id=out)
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(err).write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def test_dcp_dtensor_shards_written_by_two_ranks(tmp_path):
    # fork keeps this fast (no second torch import); the imports below are paid once, before forking
    import torch._dynamo  # noqa: F401 - DTensor imports it lazily on first use
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    world, out = 2, tmp_path / "ckpt"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = _free_port()
    procs = [ctx.Process(target=_save_dtensor_shards, args=(r, world, port, str(out), str(tmp_path / f"rank{r}.err")))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=90)
        for r, p in enumerate(procs):
            err = tmp_path / f"rank{r}.err"
            assert p.exitcode == 0, err.read_text() if err.exists() else f"rank {r} exit code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    ckpt = ckptfit.open(out)
    assert ckpt.format == "dcp"
    assert ckpt.metadata == {"step": 3}
    cand = ckpt.state_dict()
    assert cand.name == "model"
    assert_same(cand.tensors, _dtensor_state())


# --------------------------------------------------------------------------- TorchScript


def _script_save(module: nn.Module, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))


def test_torchscript_archive(tmp_path, tensor_reads):
    m = _net().eval()
    m.head = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))  # numbered children, a mangled class
    path = tmp_path / "scripted.pt"
    _script_save(m, path)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "torchscript"
    assert ckpt.metadata == {"torchscript_class": f"__torch__.{Net.__module__}.Net"}
    [cand] = ckpt.state_dicts()
    assert (cand.name, cand.kind, cand.default) == ("", "module", True)
    # what torch.jit.load itself reports: TorchScript keeps the non-persistent buffer too
    expected = dict(torch.jit.load(str(path)).state_dict())
    assert "scratch" in expected
    assert_same(cand.tensors, expected)
    for key, value in m.state_dict().items():
        assert torch.equal(cand.tensors[key].load(), value), key


# --------------------------------------------------------------------------- Lightning


def test_lightning_trainer_checkpoint(tmp_path, tensor_reads):
    pl = pytest.importorskip("pytorch_lightning")

    class LitNet(pl.LightningModule):
        def __init__(self, hidden: int = 4, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1))

        def training_step(self, batch, _):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    lit = LitNet()
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    ckpt = ckptfit.open(path)
    describe(ckpt)
    assert tensor_reads == []
    assert ckpt.format == "torch-zip"
    md = ckpt.metadata
    assert md["epoch"] == 0 or md["epoch"] == 1
    assert md["global_step"] == 1
    assert md["hyper_parameters"] == {"hidden": 4, "lr": 0.1}
    assert md["pytorch-lightning_version"] == pl.__version__
    assert md["optimizer_states"] == "<list of 1>"
    assert md["lr_schedulers"] == "<list of 1>"
    [cand] = ckpt.state_dicts()  # Adam's exp_avg/exp_avg_sq are not weights
    assert (cand.name, cand.kind, cand.default) == ("state_dict", "model", True)
    assert_same(cand.tensors, lit.state_dict())


def test_dcp_with_fqn_keyed_optimizer_state_offers_only_the_model(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    optim = {"state": {names[i]: v for i, v in osd["state"].items()}, "param_groups": osd["param_groups"]}
    out = tmp_path / "dcp_fsdp_style"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "optim": optim}, checkpoint_id=str(out))
    cands = ckptfit.open(out).state_dicts()
    assert [(c.name, c.default) for c in cands] == [("model", True)]
