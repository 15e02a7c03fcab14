"""Tied weights in sharded loads (ckptfit.loading.distributed -> ckptfit.loading.ties), and a tie whose
main weight a module's own load code makes.

A sharded load is chosen by the *model* (FSDP2's ``fully_shard``, DTensor parameters, DDP inside a
process group), not by the file, so these tests shard a tied model in a real one-rank gloo group
(in this process, destroyed after each test) and load real files into it: a torch.distributed.checkpoint
folder written by ``dcp.save`` and a safetensors file. What holds for one process holds here: a file whose
two copies are equal loads and says it checked them; one whose copies differ is refused, every shard
unchanged, and each suggestion followed literally loads exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import ckptfit

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class Tied(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(x)))


@pytest.fixture
def group():
    """A real one-rank gloo process group for the test, gone after it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(model: nn.Module, how: str) -> nn.Module:
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model


def _plain(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k.removeprefix("module."): (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _untied_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = Tied(tie=False).state_dict()
    path = tmp_path / "untied.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, sd


@pytest.mark.parametrize("how", ["fsdp2", "ddp"])
def test_equal_copies_in_a_dcp_checkpoint_load_and_the_report_says_tied(tmp_path, group, how):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    src = Tied(tie=False)
    with torch.no_grad():
        src.head.weight.copy_(src.emb.weight)  # a tied model saved by a writer that duplicated the tensor
    dcp.save({"model": src.state_dict()}, checkpoint_id=str(tmp_path / "dcp"))
    model = _shard(Tied(), how)
    report = ckptfit.load(model, tmp_path / "dcp")
    assert _plain(model).head.weight is _plain(model).emb.weight
    got = _values(model)
    assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    prefix = "module." if how == "ddp" else ""
    assert [d.source for d in report.tied] == ["head.weight"]
    assert (f"  tied (1): {prefix}head.weight — shares {prefix}emb.weight; the checkpoint's own 'head.weight' "
            f"checked equal at load") in str(report).splitlines()


@pytest.mark.parametrize("how", ["fsdp2", "ddp"])
def test_different_copies_are_refused_every_shard_unchanged(tmp_path, group, how):
    path, _ = _untied_file(tmp_path)
    model = _shard(Tied(), how)
    before = _values(model)
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path)
    prefix = "module." if how == "ddp" else ""
    assert (f"missing (1): {prefix}head.weight — tied to '{prefix}emb.weight' (one tensor), but the checkpoint holds different "
            f"values for them: 'head.weight' and 'emb.weight' differ (40 of 40 values") in str(e.value)
    after = _values(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert e.value.hint.splitlines() == [
        "untie 'head.weight' from 'emb.weight' in the model before you shard or wrap it (fully_shard, DDP), so each "
        "loads its own checkpoint tensor: `model.head.weight = nn.Parameter(model.emb.weight.detach().clone())` on "
        "the plain model, then shard it and load (or build the model without the tie)",
        "pass exclude=['head.weight'] (on the command line: --exclude head.weight) to load the checkpoint's "
        "'emb.weight' into both tied weights; 'head.weight' is not used",
        "pass exclude=['emb.weight'] (on the command line: --exclude emb.weight) to load the checkpoint's "
        "'head.weight' into both tied weights; 'emb.weight' is not used"]


@pytest.mark.parametrize("how", ["fsdp2", "ddp"])
@pytest.mark.parametrize(("exclude", "kept"), [("head.weight", "emb.weight"), ("emb.weight", "head.weight")])
def test_each_exclude_suggestion_followed_loads_the_kept_tensor_into_both(tmp_path, group, how, exclude, kept):
    path, sd = _untied_file(tmp_path)
    model = _shard(Tied(), how)
    ckptfit.load(model, path, exclude=[exclude])
    got = _values(model)
    assert torch.equal(got["emb.weight"], sd[kept]) and torch.equal(got["head.weight"], sd[kept])
    assert torch.equal(got["body.weight"], sd["body.weight"]) and torch.equal(got["body.bias"], sd["body.bias"])


@pytest.mark.parametrize("how", ["fsdp2", "ddp"])
def test_the_untie_suggestion_followed_loads_both_tensors(tmp_path, group, how):
    path, sd = _untied_file(tmp_path)
    model = Tied()
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())  # the suggestion, on the plain model
    model = _shard(model, how)
    ckptfit.load(model, path)
    got = _values(model)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    if how == "fsdp2":  # the forward pass uses both: FSDP2 manages the untied weight as its own
        x = torch.tensor([[1, 2, 3]])
        want = nn.functional.linear(nn.functional.linear(nn.functional.embedding(x, sd["emb.weight"]),
                                                         sd["body.weight"], sd["body.bias"]), sd["head.weight"])
        assert torch.equal(model(x), want)


# ------------------------------------------------------------------ a tie whose main weight a module's own code makes

class TransposedEmb(nn.Embedding):
    """Its own ``_load_from_state_dict`` reads the table stored transposed, as ``table_t``."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "table_t" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "table_t").t()
        super()._load_from_state_dict(state_dict, prefix, *args)


class OwnTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = TransposedEmb(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def _own_file(tmp_path: Path, same: bool) -> tuple[Path, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    table = torch.randn(10, 4)
    head = table.clone() if same else torch.randn(10, 4)
    path = tmp_path / "own.pth"
    torch.save({"emb.table_t": table.t().contiguous(), "head.weight": head}, path)
    return path, table, head


@pytest.mark.parametrize("same", [True, False])
def test_a_tie_filled_by_a_modules_own_load_code_is_refused_as_cannot_be_checked(tmp_path, same):
    path, table, head = _own_file(tmp_path, same)
    model = OwnTied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, path)
    assert ("missing (1): head.weight — tied to 'emb.weight' (one tensor), which is made by a module's own load "
            "logic, so the checkpoint's own 'head.weight' cannot be checked against it") in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert e.value.hint.splitlines() == [
        "untie 'head.weight' from 'emb.weight' in the model, so each loads its own checkpoint tensor: before "
        "loading, `model.head.weight = nn.Parameter(model.emb.weight.detach().clone())` (or build the model "
        "without the tie)",
        "pass exclude=['head.weight'] (on the command line: --exclude head.weight) to fill both tied weights with "
        "what the module's own load logic makes for 'emb.weight'; the checkpoint's 'head.weight' is not used"]
    # each suggestion, followed literally
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    ckptfit.load(model, path)
    assert torch.equal(model.emb.weight, table) and torch.equal(model.head.weight, head)
    model = OwnTied()
    report = ckptfit.load(model, path, exclude=["head.weight"])
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, table)
    assert report.num_loaded == 2


def test_in_a_sharded_load_a_modules_own_load_code_is_refused_with_the_way_round(tmp_path, group):
    path, table, _ = _own_file(tmp_path, same=True)
    model = _shard(OwnTied(), "fsdp2")
    before = _values(model)
    with pytest.raises(ckptfit.LoadError, match=r"'emb.weight' \(and 0 more\) is made by a module's own load logic, "
                                                r"which a sharded load does not run; load into the unsharded model, "
                                                r"save it, then shard"):
        ckptfit.load(model, path)
    assert all(torch.equal(_values(model)[k], v) for k, v in before.items())
    plain = OwnTied()  # the way round, followed: the unsharded model says what settles the tie
    ckptfit.load(plain, path, exclude=["head.weight"])
    save_file({k: v.contiguous() for k, v in plain.state_dict().items() if k != "head.weight"},
              str(tmp_path / "plain.safetensors"))
    model = _shard(OwnTied(), "fsdp2")
    ckptfit.load(model, tmp_path / "plain.safetensors")
    assert torch.equal(_values(model)["emb.weight"], table)
