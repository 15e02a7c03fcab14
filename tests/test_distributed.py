"""Sharded loading on real process groups: CPU, gloo, 127.0.0.1, 2 and 3 ranks.

Each group is launched once per module (this file run as a script, one subprocess per rank)
and runs several cases in a row; every rank writes what it saw to JSON, and the tests below
check it. FSDP2's ``fully_shard`` works on CPU with gloo in torch 2.x, so it is used as is.
A launch is bounded in time; on failure or timeout every rank process is killed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
from torch import nn

import ckptfit
from ckptfit.lazy import LazyTensor

LAUNCH_TIMEOUT_S = 80


def _make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 64))


def _zeroed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _comparable(report: ckptfit.LoadReport) -> dict:
    d = report.to_dict()
    for k in ("device", "seconds", "bytes_read"):
        d.pop(k)
    return d


# ------------------------------------------------------------------------------- worker (one rank)

def _fsdp(ws: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    model = _zeroed(_make())
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _shards(model: nn.Module, ref: dict[str, torch.Tensor]) -> dict:
    """Whether each rank's local shard equals the matching block of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            shape, off = compute_local_shape_and_global_offset(v.shape, v.device_mesh, v.placements)
            block = ref[k.removeprefix("module.")][tuple(slice(o, o + s) for o, s in zip(off, shape))]
            out[k] = bool(torch.equal(v.to_local(), block)) and tuple(v.to_local().shape) == tuple(shape)
        else:
            out[k] = bool(torch.equal(v, ref[k.removeprefix("module.")]))
    return out


def _expected_bytes(model: nn.Module) -> int:
    """Bytes this rank must read: its local shard of every DTensor, plain tensors whole."""
    from torch.distributed.tensor import DTensor

    n = 0
    for k, v in model.state_dict().items():
        local = v.to_local() if isinstance(v, DTensor) else v
        n += local.numel() * local.element_size()
    return n


def _loaded(model: nn.Module, path: str, single: nn.Module | None = None) -> dict:
    report = ckptfit.load(model, path)
    info = {"bytes_read": report.bytes_read, "container": report.container, "transforms": list(report.transforms),
            "num_loaded": report.num_loaded, "shards": _shards(model, _make().state_dict()),
            "expected_bytes": _expected_bytes(model)}
    if single is not None:
        info["same_report"] = _comparable(report) == _comparable(
            ckptfit.LoadReport.from_plan(ckptfit.plan(single, path)))
    return info


def _raised(model: nn.Module, path: str) -> dict:
    before = {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in model.state_dict().items()}
    try:
        ckptfit.load(model, path)
    except ckptfit.CheckpointError as e:
        after = model.state_dict()
        unchanged = all(torch.equal(before[k], v.to_local() if hasattr(v, "to_local") else v)
                        for k, v in after.items())
        return {"raised": type(e).__name__, "message": str(e), "unchanged": unchanged}
    return {"raised": None}


def _corrupt_far_chunks(dcp_dir: str, out_dir: str) -> None:
    """Copy a DCP dir and damage every chunk that starts past row 0 (only rank 1 of 2 reads those)."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    shutil.copytree(dcp_dir, out_dir)
    md = FileSystemReader(dcp_dir).read_metadata()
    for idx, info in md.storage_data.items():
        if idx.offset is not None and len(idx.offset) > 0 and idx.offset[0] > 0:
            with open(os.path.join(out_dir, info.relative_path), "r+b") as f:
                f.seek(info.offset)
                f.write(b"XXXX")


def _suite_two(ws: int, d: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    out: dict = {}

    def fsdp_safetensors():
        model = _fsdp(ws)
        info = _loaded(model, f"{d}/module_prefix.safetensors", _zeroed(_make()))
        model.eval()
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
        info["forward_equal"] = bool(torch.allclose(model(x), _make().eval()(x), atol=1e-6))
        dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=f"{d}/dcp2")
        return info

    def fsdp_torch_zip():
        return _loaded(_fsdp(ws), f"{d}/orig_mod.pt", _zeroed(_make()))

    def dtensor_columns():
        mesh = init_device_mesh("cpu", (ws,))
        model = _zeroed(_make())
        for lin in (model[0], model[3]):
            lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(1)]))
            lin.bias = nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Replicate()]))
        return _loaded(model, f"{d}/module_prefix.safetensors", _zeroed(_make()))

    def ddp():
        model = DistributedDataParallel(_zeroed(_make()))
        return _loaded(model, f"{d}/orig_mod.pt")

    def shape_mismatch():
        return _raised(_fsdp(ws), f"{d}/bad_shape.safetensors")

    def read_fails_on_one_rank():
        if dist.get_rank() == 0:
            _corrupt_far_chunks(f"{d}/dcp2", f"{d}/dcp2_bad")
        dist.barrier()
        return _raised(_fsdp(ws), f"{d}/dcp2_bad")

    def strided_shard():  # FSDP2 over tensor parallelism shards like this; read whole, cut by DTensor
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = init_device_mesh("cpu", (ws,))
        placements = [_StridedShard(0, split_factor=2)]
        model = _zeroed(_make())
        model[0].weight = nn.Parameter(distribute_tensor(torch.zeros(256, 64), mesh, placements))
        report = ckptfit.load(model, f"{d}/module_prefix.safetensors")
        want = distribute_tensor(_make().state_dict()["0.weight"], mesh, placements).to_local()
        return {"equal": bool(torch.equal(model[0].weight.to_local(), want)), "bytes_read": report.bytes_read,
                "expected_bytes": _expected_bytes(_make())}

    cases = {"fsdp_safetensors": fsdp_safetensors, "strided_shard": strided_shard, "fsdp_torch_zip": fsdp_torch_zip,
             "dtensor_columns": dtensor_columns, "ddp": ddp, "shape_mismatch": shape_mismatch,
             "read_fails_on_one_rank": read_fails_on_one_rank}
    for name, fn in cases.items():
        out[name] = _run_case(fn)
    return out


def _suite_three(ws: int, d: str) -> dict:
    def dcp_2_to_3():
        return _loaded(_fsdp(ws), f"{d}/dcp2", _zeroed(_make()))

    def fsdp_safetensors():
        return _loaded(_fsdp(ws), f"{d}/module_prefix.safetensors", _zeroed(_make()))

    return {"dcp_2_to_3": _run_case(dcp_2_to_3), "fsdp_safetensors": _run_case(fsdp_safetensors)}


def _run_case(fn) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception:
        return {"ok": False, "error": traceback.format_exc()}


def _worker(suite: str, rank: int, ws: int, port: int, d: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws,
                            timeout=timedelta(seconds=60))
    try:
        result = {"two": _suite_two, "three": _suite_three}[suite](ws, d)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(d, f"{suite}.{rank}.json"), "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(suite: str, ws: int, d: str) -> list[dict]:
    """Run ``suite`` on ``ws`` rank processes; the per-rank results, or fail with their output."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(os.path.join(d, f"{suite}.{r}.log"), "w+") for r in range(ws)]
    procs = [subprocess.Popen([sys.executable, __file__, suite, str(r), str(ws), str(port), d], env=env,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(ws)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = []
        for r in failed:
            logs[r].seek(0)
            tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{logs[r].read()[-3000:]}")
        for f in logs:
            f.close()
        pytest.fail(f"{suite} on {ws} ranks failed or timed out:\n" + "\n".join(tails))
    for f in logs:
        f.close()
    results = []
    for r in range(ws):
        with open(os.path.join(d, f"{suite}.{r}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    from safetensors.torch import save_file

    d = str(tmp_path_factory.mktemp("dist"))
    sd = _make().state_dict()
    save_file({f"module.{k}": v for k, v in sd.items()}, f"{d}/module_prefix.safetensors")
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": 3}, f"{d}/orig_mod.pt")
    bad = dict(sd)
    bad["3.weight"] = torch.zeros(65, 256)
    save_file(bad, f"{d}/bad_shape.safetensors")
    return d


@pytest.fixture(scope="module")
def two(files) -> list[dict]:
    return _launch("two", 2, files)


@pytest.fixture(scope="module")
def three(files, two) -> list[dict]:
    return _launch("three", 3, files)


def _case(results: list[dict], name: str) -> list[dict]:
    out = [r[name] for r in results]
    for rank, c in enumerate(out):
        assert c["ok"], f"rank {rank}, case {name}:\n{c.get('error')}"
    return out


def _check_loaded(results: list[dict], name: str, *, transforms: list[str], container: str) -> None:
    for rank, c in enumerate(_case(results, name)):
        assert all(c["shards"].values()), (rank, {k: v for k, v in c["shards"].items() if not v})
        assert c["transforms"] == transforms
        assert c["container"] == container
        assert c["bytes_read"] == c["expected_bytes"], rank
        if "same_report" in c:
            assert c["same_report"], f"rank {rank}: the report differs from a single process's"


# ------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_fsdp2_safetensors_with_module_prefix(two):
    _check_loaded(two, "fsdp_safetensors", transforms=["strip 'module.'"], container="")
    assert all(c["forward_equal"] for c in _case(two, "fsdp_safetensors"))


@pytest.mark.slow
def test_fsdp2_torch_zip_with_orig_mod_prefix(two):
    _check_loaded(two, "fsdp_torch_zip", transforms=["strip '_orig_mod.'"], container="state_dict")


@pytest.mark.slow
def test_dtensor_column_shards(two):
    _check_loaded(two, "dtensor_columns", transforms=["strip 'module.'"], container="")


@pytest.mark.slow
def test_strided_shard_is_read_whole_and_cut_locally(two):
    for c in _case(two, "strided_shard"):
        assert c["equal"]
        assert c["bytes_read"] == c["expected_bytes"]  # the whole checkpoint: this placement is not one block


@pytest.mark.slow
def test_ddp_wrapped_model_reads_everything_on_every_rank(two):
    cases = _case(two, "ddp")
    for c in cases:
        assert all(c["shards"].values())
        assert c["num_loaded"] == len(c["shards"])
        assert c["bytes_read"] == c["expected_bytes"]


@pytest.mark.slow
def test_shape_mismatch_raises_on_every_rank_and_changes_nothing(two):
    cases = _case(two, "shape_mismatch")
    for c in cases:
        assert c["raised"] == "LoadError"
        assert "3.weight" in c["message"] and "[65, 256]" in c["message"]
        assert c["unchanged"]
    assert cases[0]["message"] == cases[1]["message"]


@pytest.mark.slow
def test_read_failure_on_one_rank_raises_on_every_rank(two):
    r0, r1 = _case(two, "read_fails_on_one_rank")
    assert r1["raised"] == "CorruptCheckpoint", r1
    assert r0["raised"] == "LoadError", r0
    assert "rank 1 of 2" in r0["message"] and "CorruptCheckpoint" in r0["message"]
    assert r0["unchanged"] and r1["unchanged"]


@pytest.mark.slow
def test_dcp_saved_on_2_ranks_loads_on_3(three):
    _check_loaded(three, "dcp_2_to_3", transforms=[], container="model")


@pytest.mark.slow
def test_bytes_read_per_rank_is_about_a_share(two, three):
    sd = _make().state_dict()
    total = sum(v.numel() * v.element_size() for v in sd.values())
    buffers = {k for k, _ in _make().named_buffers()}  # BatchNorm's: not sharded by FSDP2, read whole
    replicated = sum(v.numel() * v.element_size() for k, v in sd.items() if k in buffers)
    for results, ws in ((two, 2), (three, 3)):
        for c in _case(results, "fsdp_safetensors"):
            share = (total - replicated) / ws
            assert c["bytes_read"] <= share * 1.02 + replicated, (ws, c["bytes_read"], total)
    for c in _case(three, "dcp_2_to_3"):
        assert c["bytes_read"] <= (total - replicated) / 3 * 1.02 + replicated


@pytest.mark.slow
def test_dcp_saved_on_2_ranks_loads_in_one_process(files, two):
    model = _zeroed(_make())
    report = ckptfit.load(model, f"{files}/dcp2")
    assert report.container == "model" and report.num_loaded == len(model.state_dict())
    for k, v in _make().state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow
def test_load_slice_reads_blocks(files, two):
    ref = _make().state_dict()["0.weight"]  # [256, 64]
    block = (slice(10, 100), slice(3, 40))
    for path in (f"{files}/module_prefix.safetensors", f"{files}/orig_mod.pt", f"{files}/dcp2"):
        ckpt = ckptfit.open(path)
        try:
            lazy = next(t for k, t in ckpt.state_dicts()[0].tensors.items() if k.endswith("0.weight"))
            assert torch.equal(lazy.load_slice(block), ref[block]), path
            assert torch.equal(lazy.load_slice((slice(120, 140),)), ref[120:140]), path  # across DCP chunks
            assert lazy.load_slice((slice(5, 5),)).shape == (0, 64)
        finally:
            ckpt.close()
    assert torch.equal(LazyTensor.of(torch.tensor(3.0)).load_slice(()), torch.tensor(3.0))
    with pytest.raises(ValueError, match="step 1"):
        LazyTensor.of(ref).load_slice((slice(0, 10, 2),))


def test_not_sharded_outside_a_process_group():
    from ckptfit.loading.distributed import is_sharded

    assert not is_sharded(_make())


if __name__ == "__main__":
    _suite, _rank, _ws, _port, _dir = sys.argv[1:6]
    _worker(_suite, int(_rank), int(_ws), int(_port), _dir)
