"""A class_map head tied to another weight (an embedding shared with the output layer), with the file's
head for another number of classes: the tied weight *is* the head's tensor, so after the load it holds the
rows class_map selects, and the report says so (tied), never "left at init". A file copy of its own is
compared with the head's on the rows the map selects: equal (a tied model's file) loads; different is
refused, model unchanged, with an exclude= that, followed literally, loads.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckptfit

ROWS = [4, None, 0]  # model class 0 <- file class 4; class 1 is new; class 2 <- file class 0


class Tied(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, 4)
        self.head = nn.Linear(4, n, bias=False)
        self.head.weight = self.emb.weight


def _mapped(file_rows: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    return torch.stack([init[i] if r is None else file_rows[r] for i, r in enumerate(ROWS)])


def _lines(report) -> list[str]:
    return str(report).splitlines()


@pytest.mark.parametrize("head", [None, "emb"])
def test_a_tied_weight_the_file_lacks_is_reported_tied_to_the_mapped_rows(tmp_path: Path, head):
    torch.manual_seed(0)
    src = {"emb.weight": torch.randn(5, 4)}  # the file has the table only: head.weight is filled through the tie
    torch.save(src, tmp_path / "five.pt")
    model = Tied(3)
    init = model.emb.weight.detach().clone()
    report = ckptfit.load(model, tmp_path / "five.pt", partial=True, class_map=ROWS, class_map_head=head)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.head.weight, _mapped(src["emb.weight"], init))
    assert "  tied (1): head.weight — shares emb.weight" in _lines(report)
    assert [d.target for d in report.tied] == ["head.weight"]
    assert "head.weight" not in {d.target for d in report.left_at_init}
    assert not any("left at init" in line for line in _lines(report))
    assert report.num_loaded == 2


@pytest.mark.parametrize("head", ["emb", "head"])
def test_a_tied_models_file_loads_and_its_copy_is_checked_on_the_mapped_rows(tmp_path: Path, head):
    torch.manual_seed(1)
    trained = Tied(5)
    torch.save(trained.state_dict(), tmp_path / "tied.pt")  # one storage under both keys
    model = Tied(3)
    init = model.emb.weight.detach().clone()
    report = ckptfit.load(model, tmp_path / "tied.pt", partial=True, class_map=ROWS, class_map_head=head)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, _mapped(trained.emb.weight.detach(), init))
    other = "head" if head == "emb" else "emb"
    assert (f"  tied (1): {other}.weight — shares {head}.weight; the checkpoint's own '{other}.weight' checked equal "
            f"at load") in _lines(report)
    assert not report.left_at_init


@pytest.mark.parametrize("partial", [True, False])
def test_different_copies_are_refused_and_the_exclude_followed_loads(tmp_path: Path, partial):
    torch.manual_seed(2)
    src = {"emb.weight": torch.randn(5, 4), "head.weight": torch.randn(5, 4)}  # saved without the tie
    torch.save(src, tmp_path / "untied.pt")
    model = Tied(3)
    before = model.emb.weight.detach().clone()
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, tmp_path / "untied.pt", partial=partial, class_map=ROWS, class_map_head="emb")
    assert ("  missing (1): head.weight — tied to 'emb.weight' (one tensor), whose rows are chosen by class_map, but "
            "the checkpoint's own 'head.weight' and 'emb.weight' differ in the rows the map selects (8 of 8 values, "
            "largest difference") in str(e.value)
    assert torch.equal(model.emb.weight, before)
    assert e.value.hint == ("pass exclude=['head.weight'] (on the command line: --exclude head.weight) to fill "
                            "'head.weight' through the tie from the rows class_map selects; the checkpoint's "
                            "'head.weight' is not used")
    report = ckptfit.load(model, tmp_path / "untied.pt", partial=partial, class_map=ROWS, class_map_head="emb",
                          exclude=["head.weight"])
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.head.weight, _mapped(src["emb.weight"], before))
    assert "  tied (1): head.weight — shares emb.weight" in _lines(report)
    assert "  unused in checkpoint (1): head.weight — excluded by rule" in _lines(report)
    assert not report.left_at_init


def test_freeze_keeps_the_tied_head_with_new_rows_trainable(tmp_path: Path):
    """freeze=True freezes what was loaded, but a head whose new classes are at init is trained: under its
    tied name too (it is one tensor)."""
    torch.manual_seed(3)
    torch.save({"emb.weight": torch.randn(5, 4), "extra.weight": torch.randn(2, 2)}, tmp_path / "five.pt")

    class WithBody(Tied):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.extra = nn.Linear(2, 2, bias=False)

    model = WithBody(3)
    report = ckptfit.load(model, tmp_path / "five.pt", partial=True, class_map=ROWS, class_map_head="emb",
                          freeze=True)
    assert report.frozen == ("extra.weight",)
    assert model.emb.weight.requires_grad and not model.extra.weight.requires_grad


def test_naming_the_tied_module_the_file_lacks_says_which_module_to_name(tmp_path: Path):
    torch.manual_seed(4)
    src = {"emb.weight": torch.randn(5, 4)}
    torch.save(src, tmp_path / "five.pt")
    model = Tied(3)
    init = model.emb.weight.detach().clone()
    with pytest.raises(ckptfit.LoadError) as e:
        ckptfit.load(model, tmp_path / "five.pt", partial=True, class_map=ROWS, class_map_head="head")
    assert ("class_map_head='head': head.weight is tied to 'emb.weight' (one tensor), which the file holds for "
            "another number of classes; name that module: class_map_head='emb' (CLI: --class-map-head emb)"
            in str(e.value))
    assert torch.equal(model.emb.weight, init)
    ckptfit.load(model, tmp_path / "five.pt", partial=True, class_map=ROWS, class_map_head="emb")  # followed
    assert torch.equal(model.head.weight, _mapped(src["emb.weight"], init))
