"""Sources: URLs read in byte ranges from a local HTTP server (counting what it serves), Hugging Face repos from
a cache in huggingface_hub's layout, Git LFS pointers and sha256 checks. No network: 127.0.0.1 only."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ckptfit
from ckptfit.cli import main
from ckptfit.errors import CheckpointError, CorruptCheckpoint, NotACheckpoint


class _Server:
    """A threaded http.server on 127.0.0.1 serving files from a folder, with Range support and byte counts."""

    def __init__(self, root: str):
        self.root = root
        self.served = 0
        self.requests: list[str] = []
        self.lie_size: dict[str, int] = {}  # name -> Content-Length to claim (the body is the real file)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _file(self):
                path = os.path.join(server.root, self.path.lstrip("/").split("?")[0])
                if not os.path.isfile(path):
                    self.send_error(404)
                    return None, 0
                name = os.path.basename(path)
                return path, server.lie_size.get(name, os.path.getsize(path))

            def _headers(self, path, size, status, length, extra=()):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"' + hashlib.md5(open(path, "rb").read()).hexdigest() + '"')
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                path, size = self._file()
                if path:
                    self._headers(path, size, 200, size)

            def do_GET(self):
                path, size = self._file()
                if not path:
                    return
                server.requests.append(self.headers.get("Range", "whole"))
                start, end = 0, size
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m:
                    start, end = int(m.group(1)), min(size, int(m.group(2)) + 1 if m.group(2) else size)
                    self._headers(path, size, 206, end - start, [("Content-Range", f"bytes {start}-{end - 1}/{size}")])
                else:
                    self._headers(path, size, 200, size)
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)  # shorter than promised when the size is a lie
                server.served += len(data)
                self.wfile.write(data)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "www"
    root.mkdir()
    s = _Server(str(root))
    yield s
    s.close()


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(256, 256)
        self.dec = torch.nn.Linear(256, 256)


def _zeroed(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "npz"])
def test_half_the_tensors_fetch_about_half_the_bytes(server, fmt):
    torch.manual_seed(0)
    src = _Two()
    name = {"safetensors": "two.safetensors", "torch-zip": "two.pth", "npz": "two.npz"}[fmt]
    path = os.path.join(server.root, name)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, path)
    elif fmt == "torch-zip":
        torch.save(sd, path)
    else:
        import numpy as np

        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    size = os.path.getsize(path)
    model = _zeroed(_Two())
    report = ckptfit.load(model, f"{server.url}/{name}", include=["enc.*"], partial=True)
    assert len(report.loaded) == 2
    assert torch.equal(model.enc.weight, src.enc.weight) and torch.equal(model.enc.bias, src.enc.bias)
    assert not model.dec.weight.any()  # left at (zeroed) init, never fetched
    assert server.served < 0.6 * size, (server.served, size)
    # the rest is fetched when needed; what is already cached is not fetched again
    before = server.served
    model2 = _zeroed(_Two())
    ckptfit.load(model2, f"{server.url}/{name}")
    for k, v in src.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert server.served - before < 0.6 * size
    assert os.listdir(os.environ["CKPTFIT_CACHE"]) == ["remote"]  # fetched files: a subfolder of the one cache


def test_a_download_cut_short_is_the_same_error_as_a_truncated_file(server, tmp_path):
    sd = {"weight": torch.randn(64, 64)}
    path = os.path.join(server.root, "w.safetensors")
    save_file(sd, path)
    size = os.path.getsize(path)
    data = open(path, "rb").read()
    # the server claims the full size but the file ends early (Content-Length lies / connection closed)
    open(path, "wb").write(data[: size - 1000])
    server.lie_size["w.safetensors"] = size
    model = torch.nn.Linear(64, 64, bias=False)
    before = model.weight.detach().clone()
    with pytest.raises(CorruptCheckpoint, match=r"the download stopped at byte \d+ of \d+ .*: the file is truncated") \
            as remote:
        ckptfit.load(model, f"{server.url}/w.safetensors")
    assert torch.equal(model.weight.detach(), before)  # nothing changed
    local = tmp_path / "cut.safetensors"
    local.write_bytes(data[: size - 1000])
    with pytest.raises(CorruptCheckpoint, match=r"truncated") as here:
        ckptfit.load(model, local)
    assert type(remote.value) is type(here.value)
    assert remote.value.hint.startswith("download or copy the file again")
    assert here.value.hint.startswith("download or copy the file again")


def test_a_missing_url_is_a_clear_error(server):
    with pytest.raises(CheckpointError, match=r"no such file at this URL"):
        ckptfit.open(f"{server.url}/nothing.pth")


def test_sha256_checks_a_url_and_a_local_file(server, tmp_path):
    sd = {"weight": torch.randn(4, 3)}
    path = os.path.join(server.root, "m.safetensors")
    save_file(sd, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    model = torch.nn.Linear(3, 4, bias=False)
    ckptfit.load(model, f"{server.url}/m.safetensors", sha256=digest)
    assert torch.equal(model.weight.detach(), sd["weight"])
    wrong = "0" * 64
    with pytest.raises(CorruptCheckpoint, match=f"sha256 mismatch: expected {wrong}, the file has {digest}"):
        ckptfit.load(model, path, sha256=wrong)
    result = CliRunner().invoke(main, ["load", path, "--sha256", wrong, "--model", "torch.nn:Linear",
                                       "--model-arg", "in_features=3", "--model-arg", "out_features=4"])
    assert result.exit_code != 0 and "sha256 mismatch" in result.output and digest in result.output


def _lfs_pointer(data: bytes) -> str:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n")


def test_lfs_pointer_without_its_object_says_so(tmp_path):
    (tmp_path / "model.pth").write_text(_lfs_pointer(b"x" * 100))
    with pytest.raises(NotACheckpoint, match=r"Git LFS pointer, not the checkpoint: the LFS object was never fetched "
                                              r"\(sha256 [0-9a-f]{64}, 100 bytes; not in \.git/lfs/objects"):
        ckptfit.open(tmp_path / "model.pth")


def test_lfs_pointer_is_followed_to_its_object_and_checked(tmp_path):
    sd = {"weight": torch.randn(4, 3)}
    real = tmp_path / "real.pth"
    torch.save(sd, real)
    data = real.read_bytes()
    repo = tmp_path / "repo"
    oid = hashlib.sha256(data).hexdigest()
    obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    obj.parent.mkdir(parents=True)
    shutil.copy(real, obj)
    (repo / "weights").mkdir()
    pointer = repo / "weights" / "model.pth"
    pointer.write_text(_lfs_pointer(data))
    model = torch.nn.Linear(3, 4, bias=False)
    ckptfit.load(model, pointer)
    assert torch.equal(model.weight.detach(), sd["weight"])
    # the object is damaged: the pointer's digest catches it
    damaged = bytearray(data)
    damaged[-30] ^= 1
    obj.write_bytes(bytes(damaged))
    with pytest.raises(CorruptCheckpoint, match=f"sha256 mismatch: expected {oid}, the file has "):
        ckptfit.load(model, pointer)
    # the real file passed with the pointer as its digest
    ckptfit.load(model, real, sha256=str(pointer))


def _hf_cache(root, repo: str, files: dict[str, bytes], commit: str = "a" * 40, ref: str = "main") -> str:
    """A cache entry in huggingface_hub's documented layout: blobs/<sha>, snapshots/<commit>/<file> -> blob."""
    entry = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(entry, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(entry, "refs"), exist_ok=True)
    with open(os.path.join(entry, "refs", ref), "w") as f:
        f.write(commit)
    for name, data in files.items():
        blob = os.path.join(entry, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(entry, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return entry


def _bytes_of(sd, tmp_path, name="x.safetensors") -> bytes:
    save_file(sd, tmp_path / name)
    return (tmp_path / name).read_bytes()


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: never the network
    return cache


def test_hf_repo_from_the_cache_single_sharded_revision_and_subfolder(tmp_path, hf_offline):
    torch.manual_seed(0)
    src = _Two()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    single = _bytes_of(sd, tmp_path)
    shard1 = _bytes_of({k: v for k, v in sd.items() if k.startswith("enc")}, tmp_path, "s1.safetensors")
    shard2 = _bytes_of({k: v for k, v in sd.items() if k.startswith("dec")}, tmp_path, "s2.safetensors")
    index = ('{"metadata": {}, "weight_map": {' + ", ".join(
        f'"{k}": "model-0000{1 if k.startswith("enc") else 2}-of-00002.safetensors"' for k in sd) + "}}").encode()
    _hf_cache(hf_offline, "org/two", {"model.safetensors": single, "config.json": b"{}",
                                      "sub/model.safetensors.index.json": index,
                                      "sub/model-00001-of-00002.safetensors": shard1,
                                      "sub/model-00002-of-00002.safetensors": shard2})
    _hf_cache(hf_offline, "org/two", {"model.safetensors": shard1}, commit="b" * 40, ref="v1")
    for spec in ("hf://org/two", "hf://org/two/sub", "hf://org/two/model.safetensors", f"hf://org/two@{'a' * 40}"):
        model = _zeroed(_Two())
        report = ckptfit.load(model, spec)
        assert len(report.loaded) == 4, spec
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (spec, k)
    model = _zeroed(_Two())
    report = ckptfit.load(model, "hf://org/two@v1", partial=True)
    assert len(report.loaded) == 2 and torch.equal(model.enc.weight, src.enc.weight)
    model = _zeroed(_Two())
    ckptfit.load(model, "hf://org/two/model.safetensors", sha256=hashlib.sha256(single).hexdigest())
    assert torch.equal(model.dec.weight, src.dec.weight)
    with pytest.raises(CorruptCheckpoint, match="sha256 mismatch"):
        ckptfit.load(model, "hf://org/two/model.safetensors", sha256=hashlib.sha256(shard1).hexdigest())
    result = CliRunner().invoke(main, ["inspect", "hf://org/two/sub"])
    assert result.exit_code == 0 and "hf-folder" in result.output and "4 tensors" in result.output


def test_hf_repo_not_cached_offline_is_a_clear_error(hf_offline):
    with pytest.raises(CheckpointError, match=r"org/missing is not in the Hugging Face cache .* and HF_HUB_OFFLINE "
                                              r"is set"):
        ckptfit.open("hf://org/missing")
    result = CliRunner().invoke(main, ["inspect", "hf://org/missing"])
    assert result.exit_code == 1 and "hf download org/missing" in result.output
    with pytest.raises(CheckpointError, match=r"does not name a Hugging Face repository"):
        ckptfit.open("hf://justone")


@pytest.mark.parametrize("url, extra", [("s3://bucket/model.pth", "s3"), ("gs://bucket/model.pth", "gcs")])
def test_an_object_store_without_its_backend_names_the_extra(url, extra):
    import importlib.util

    if importlib.util.find_spec({"s3": "s3fs", "gcs": "gcsfs"}[extra]) is not None:
        pytest.skip("the backend is installed")
    with pytest.raises(CheckpointError, match=r"needs an fsspec backend that is not installed") as info:
        ckptfit.open(url)
    assert info.value.hint == f'pip install "ckptfit[{extra}]"'


def test_a_server_without_range_support_still_loads_exactly(tmp_path, monkeypatch):
    import functools

    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "www").mkdir()
    sd = {"weight": torch.randn(8, 4), "bias": torch.randn(8)}
    save_file(sd, tmp_path / "www" / "m.safetensors")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        model = torch.nn.Linear(4, 8)
        with ckptfit.open(f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors") as ckpt:
            assert ckpt.remote.complete  # the first answer was the whole file: nothing more is asked for
            ckptfit.load(model, ckpt)
        assert torch.equal(model.weight.detach(), sd["weight"]) and torch.equal(model.bias.detach(), sd["bias"])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cli_loads_and_inspects_a_url(server, tmp_path):
    sd = {"weight": torch.randn(4, 3), "bias": torch.randn(4)}
    save_file(sd, os.path.join(server.root, "m.safetensors"))
    url = f"{server.url}/m.safetensors"
    result = CliRunner().invoke(main, ["inspect", url])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("m.safetensors  safetensors") and "2 tensors" in result.output
    out = tmp_path / "saved.safetensors"
    result = CliRunner().invoke(main, ["load", url, "--model", "torch.nn:Linear", "--model-arg", "in_features=3",
                                       "--model-arg", "out_features=4", "--save", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Loaded 2/2 tensors from {url} (safetensors" in result.output
    back = ckptfit.open(out)
    assert torch.equal(dict(back.tensors())["weight"].load(), sd["weight"])
    result = CliRunner().invoke(main, ["inspect", f"{server.url}/missing.pth"])
    assert result.exit_code == 1 and "no such file at this URL" in result.output


def test_from_checkpoint_builds_a_transformers_model_from_an_hf_repo(tmp_path, hf_offline):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    src = transformers.BertModel(config)
    src.save_pretrained(tmp_path / "saved")
    files = {name: (tmp_path / "saved" / name).read_bytes() for name in os.listdir(tmp_path / "saved")}
    _hf_cache(hf_offline, "org/tiny-bert", files)
    model, report = ckptfit.from_checkpoint("hf://org/tiny-bert")
    assert type(model).__name__ == "BertModel"
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_online_resolution_downloads_only_the_weights_and_config(monkeypatch, tmp_path):
    """With the hub reachable, ckptfit lists the repo and asks huggingface_hub for just what a load reads."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listing = ["README.md", "config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
               "onnx/model.onnx", "sub/config.json", "sub/pytorch_model-00001-of-00002.bin",
               "sub/pytorch_model-00002-of-00002.bin", "sub/pytorch_model.bin.index.json"]
    asked: list = []
    (tmp_path / "snap" / "sub").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append((repo, kw)) or str(tmp_path / "snap"))
    from ckptfit.sources import resolve_hf

    assert resolve_hf("hf://org/repo") == str(tmp_path / "snap")
    assert sorted(asked[-1][1]["allow_patterns"]) == ["config.json", "model.safetensors"]
    assert resolve_hf("hf://org/repo@v2/sub") == str(tmp_path / "snap" / "sub")
    assert asked[-1][1]["revision"] == "v2"
    assert sorted(asked[-1][1]["allow_patterns"]) == ["sub/config.json", "sub/pytorch_model-00001-of-00002.bin",
                                                      "sub/pytorch_model-00002-of-00002.bin",
                                                      "sub/pytorch_model.bin.index.json"]
    with pytest.raises(CheckpointError, match=r"org/repo/onnx holds no weights ckptfit reads"):
        resolve_hf("hf://org/repo/onnx")


def test_scan_and_convert_take_a_url(server, tmp_path):
    sd = {"weight": torch.randn(4, 3), "bias": torch.randn(4)}
    torch.save({"epoch": 1, "state_dict": sd}, os.path.join(server.root, "m.pth"))
    url = f"{server.url}/m.pth"
    result = CliRunner().invoke(main, ["scan", url])
    assert result.exit_code == 0, result.output
    assert "verdict: clean" in result.output
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["convert", url, str(out)])
    assert result.exit_code == 0, result.output
    back = dict(ckptfit.open(out).tensors())
    assert torch.equal(back["weight"].load(), sd["weight"]) and torch.equal(back["bias"].load(), sd["bias"])


def test_an_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("CKPTFIT_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match=r"cannot reach the file \(") as info:
        ckptfit.open(f"http://127.0.0.1:{port}/model.pth")
    assert info.value.hint == "check the URL, the network and the credentials"
