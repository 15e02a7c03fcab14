"""The LoadReport and render_plan: short folded text, JSON-ready dict, rich table."""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from ckptfit.plans import Decision, Plan, Unused
from ckptfit.report import LoadReport, render_plan


def load(target: str, shape: tuple[int, ...], source: str | None = None, stage: str = "exact", reason: str = "same name") -> Decision:
    return Decision(target, "load", source or target, stage, reason, shape, shape, torch.float32, torch.float16)  # type: ignore[arg-type]


def make_plan(**overrides) -> Plan:
    decisions = [
        load("conv1.weight", (64, 3, 7, 7), "0.weight", "structural", "aligned by order and shape"),
        load("conv1.bias", (64,), "0.bias", "structural", "aligned by order and shape"),
        *(load(f"layer{i}.{b}.conv1.weight", (64, 64, 3, 3), f"module.layer{i}.{b}.conv1.weight", "prefix", "strip 'module.'")
          for i in range(1, 5) for b in (0, 1)),
        load("head.0.weight", (8, 8)),
        Decision("lm_head.weight", "tied", None, "tie", "tied to embed.weight", (8, 8), tied_to="embed.weight"),
        *(Decision(f"layer{i}.{b}.bn1.num_batches_tracked", "keep", None, "harmless", "counter buffer, harmless", ())
          for i in range(1, 5) for b in (0, 1)),
        Decision("fc.weight", "skip_shape", "fc.weight", "exact", "shape differs", (10, 512), (1000, 512), torch.float32, torch.float32),
        Decision("fc.bias", "skip_shape", "fc.bias", "exact", "shape differs", (10,), (1000,), torch.float32, torch.float32),
    ]  # fmt: skip
    fields = dict(
        decisions=tuple(decisions),
        unused=(
            Unused("classifier.weight", "no model tensor of that name", (1000, 512)),
            Unused("classifier.bias", "no model tensor of that name", (1000,)),
            Unused("extra.buf", "no model tensor of that name", (3,)),
        ),
        transforms=("strip 'module.'",),
        warnings=("checkpoint is float16, model is float32: values were upcast",),
        partial=True,
        container="state_dict",
        containers=("state_dict", "optimizer", "state_dict_ema"),
        container_reason="'state_dict' matches the model best",
        format="torch-zip",
        path="resnet18_gpu.pth",
    )
    fields.update(overrides)
    return Plan(**fields)


@pytest.fixture
def report() -> LoadReport:
    return LoadReport.from_plan(make_plan(), device="cpu", dtype=torch.bfloat16, seconds=0.5, bytes_read=2_500_000)


def test_from_plan_partitions_decisions(report: LoadReport):
    assert report.num_loaded == 12  # 11 copied + 1 through a tie
    assert report.num_tied == 1 and len(report.loaded) == 11
    assert len(report.left_at_init) == 8
    assert len(report.skipped_shape) == 2
    assert report.num_targets == 22
    assert len(report.unused) == 3
    assert report.dtype == "bfloat16" and report.device == "cpu"
    assert not report.complete  # fc was skipped


def test_str_is_short_and_folded(report: LoadReport):
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == (
        "Loaded 12/22 tensors (1 tied) from resnet18_gpu.pth (torch-zip, container 'state_dict'; "
        "also has: optimizer, state_dict_ema)"
    )
    assert "  on cpu, as bfloat16, 2.5 MB read, in 0.50 s" in lines
    assert "  names: strip 'module.'" in lines
    assert "  matched: 1 by name, 8 by name after renaming, 2 by structure" in lines
    assert (
        "  by structure (2): 0.{weight,bias} -> conv1.{weight,bias} — aligned by order and shape" in lines
    )
    assert "  tied (1): lm_head.weight — shares embed.weight" in lines
    assert "  left at init (8): layer{1..4}.{0,1}.bn1.num_batches_tracked — counter buffer, harmless" in lines
    assert "    fc.weight — checkpoint [1000, 512], model [10, 512]" in lines
    assert "    fc.bias — checkpoint [1000], model [10]" in lines
    assert (
        "  unused in checkpoint (3): classifier.{weight,bias}, extra.buf — no model tensor of that name" in lines
    )
    assert "  warning: checkpoint is float16, model is float32: values were upcast" in lines
    # Prefix loads are counted, not listed one by one.
    assert "module.layer" not in text
    assert len(lines) <= 14


def test_shared_shapes_fold_together():
    decisions = tuple(
        Decision(f"blocks.{i}.qkv.weight", "skip_shape", f"blocks.{i}.qkv.weight", "exact", "shape", (6, 4), (12, 4))
        for i in range(12)
    )
    text = str(LoadReport.from_plan(Plan(decisions, partial=True)))
    assert "  left at init, shape differs (12): blocks.{0..11}.qkv.weight — checkpoint [12, 4], model [6, 4]" in text


def test_rule_pairs_listed_and_folded():
    decisions = tuple(
        load(f"encoder.layer.{i}.attention.qkv.{w}", (4,), f"blocks.{i}.attn.qkv.{w}", "rule", "rule 'timm-vit'")
        for i in range(12)
        for w in ("weight", "bias")
    )
    text = str(LoadReport.from_plan(Plan(decisions)))
    assert text.splitlines()[1:] == [
        "  matched: 24 by rule",
        "  by rule (24): blocks.{0..11}.attn.qkv.{weight,bias} -> encoder.layer.{0..11}.attention.qkv.{weight,bias}"
        " — rule 'timm-vit'",
    ]


def test_long_sections_are_capped():
    decisions = tuple(
        Decision(f"m{i}.w", "keep", None, "user", f"reason {i}", ()) for i in range(40)
    )
    text = LoadReport.from_plan(Plan(decisions)).to_text(max_lines=5)
    assert "… 36 more lines" in text
    assert len(text.splitlines()) == 1 + 1 + 5


def test_to_dict_is_json_ready_and_round_trips(report: LoadReport):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == "resnet18_gpu.pth"
    assert data["format"] == "torch-zip"
    assert data["container"] == "state_dict"
    assert data["containers"] == ["state_dict", "optimizer", "state_dict_ema"]
    assert data["dtype"] == "bfloat16"
    assert data["bytes_read"] == 2_500_000
    assert data["counts"] == {
        "targets": 22, "loaded": 12, "tied": 1, "left_at_init": 8, "skipped_shape": 2, "unused": 3,
    }  # fmt: skip
    first = data["loaded"][0]
    assert first == {
        "target": "conv1.weight",
        "action": "load",
        "source": "0.weight",
        "stage": "structural",
        "reason": "aligned by order and shape",
        "target_shape": [64, 3, 7, 7],
        "source_shape": [64, 3, 7, 7],
        "target_dtype": "float32",
        "source_dtype": "float16",
        "tied_to": None,
    }
    assert data["skipped_shape"][0]["source_shape"] == [1000, 512]
    assert data["tied"][0]["tied_to"] == "embed.weight"
    assert data["unused"][0] == {"source": "classifier.weight", "reason": "no model tensor of that name", "shape": [1000, 512]}
    assert data["folded"]["left_at_init"] == ["layer{1..4}.{0,1}.bn1.num_batches_tracked"]
    assert {d["target"] for d in data["loaded"]} == {d.target for d in report.loaded}


def test_rich_renders_a_table(report: LoadReport):
    console = Console(record=True, width=120)
    console.print(report)
    out = console.export_text()
    assert "Key" in out and "Status" in out and "Detail" in out
    assert "layer{1..4}.{0,1}.bn1.num_batches_tracked" in out
    assert "0.{weight,bias} -> conv1.{weight,bias}" in out
    assert "classifier.{weight,bias}" in out
    assert "checkpoint [1000, 512], model [10, 512]" in out  # brackets are not read as markup
    assert "(8 tensors)" in out and "(1 tensor)" in out


def test_render_plan_lists_each_problem_once_and_the_suggestion_last():
    decisions = tuple(
        Decision(f"x.{i}.y", "missing", None, "none", "not in the checkpoint", (2,)) for i in range(3)
    ) + (load("a.w", (2,)),)
    problems = tuple(f"x.{i}.y: not in the checkpoint" for i in range(3)) + ("version 1.5 is odd",)
    plan = Plan(decisions, problems=problems, suggestions=("pass partial=True to keep them at init",), path="m.pt")
    lines = render_plan(plan).splitlines()
    assert lines == [
        "Refused: would load 1/4 tensors from m.pt — 4 problems",
        "  missing (3): x.{0..2}.y — not in the checkpoint",
        "  problem: version 1.5 is odd",  # the three missing tensors are listed once, above
        "  suggestion: pass partial=True to keep them at init",
    ]
    with pytest.raises(ValueError, match="refused plan"):
        LoadReport.from_plan(plan)


def test_render_plan_ok(report: LoadReport):
    text = render_plan(make_plan())
    assert text.startswith("Would load 12/22 tensors (1 tied) from resnet18_gpu.pth")
    assert "refused" not in text and "problem" not in text
    assert "  partial=True: tensors that nothing fills stay at their init" in text


def test_root_container_and_minimal_report():
    plan = Plan((load("w", (1,)),), container="", containers=("", "ema"))
    assert str(LoadReport.from_plan(plan)) == "Loaded 1/1 tensors (state dict at the root; also has: ema)"
    assert str(LoadReport.from_plan(Plan(()))) == "Loaded 0/0 tensors"


def test_refused_plan_does_not_call_wrong_shapes_left_at_init():
    decisions = (
        load("conv.weight", (4,)),
        Decision("fc.weight", "skip_shape", "fc.weight", "exact", "same name, but another shape; not loaded",
                 (10, 512), (1000, 512), torch.float32, torch.float32),
    )
    refused = Plan(decisions, problems=("fc.weight: checkpoint has [1000, 512], model has [10, 512]",))
    text = render_plan(refused)
    assert "  shape differs (1): fc.weight — checkpoint [1000, 512], model [10, 512]" in text
    assert "left at init" not in text  # a refused load leaves the model unchanged
    partial = Plan((decisions[0], Decision("fc.weight", "skip_shape", "fc.weight", "exact", "kept at init",
                                           (10, 512), (1000, 512), torch.float32, torch.float32)), partial=True)
    assert "  left at init, shape differs (1): fc.weight" in render_plan(partial)


def test_one_byte_size_format_for_reports_inspect_and_convert():
    from ckptfit.conversion import ConvertResult
    from ckptfit.inspection import human_bytes as from_inspection
    from ckptfit.rendering import human_bytes

    assert from_inspection is human_bytes
    assert [human_bytes(n) for n in (0, 999, 1000, 123_456_789, 999_949_999_999, 2_500_000_000_000, 10**16)] == \
        ["0 B", "999 B", "1.0 KB", "123.5 MB", "999.9 GB", "2.5 TB", "10000.0 TB"]
    plan = Plan((Decision("fc.weight", "load", "fc.weight", "exact", "same name", (2,), (2,)),))
    text = LoadReport.from_plan(plan, device="cpu", bytes_read=2_500_000_000_000).to_text()
    assert "  on cpu, 2.5 TB read" in text
    wrote = ConvertResult("a.pt", "b.safetensors", "safetensors", ("b.safetensors",), "", 3, 1_500_000_000_000, None,
                          seconds=2.0)
    assert str(wrote).startswith("Wrote b.safetensors (safetensors, 3 tensors, 1.5 TB) in 2.00 s, 750.0 GB/s")
