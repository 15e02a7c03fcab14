"""The CLI options people reach for (#14) and its structure (#13): model SPECs from files,
--model-arg literals, --save into a missing folder, diff's and every command's exit codes,
--json errors, convert's key options, one dtype vocabulary, no import cycles."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from ckptfit._cli_common import EXIT_CODES
from ckptfit.cli import main
from ckptfit.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.fixture()
def small(tmp_path):
    torch.manual_seed(0)
    net = Small()
    path = tmp_path / "small.pth"
    torch.save(net.state_dict(), path)
    return net, path


# ------------------------------------------------------------------------------------ model SPEC from a file

NET_PY = """
import torch.nn as nn

class {name}(nn.Module):
    def __init__(self, width=4, dims=(3,), act="relu", bias=True):
        super().__init__()
        self.act = act
        self.conv = nn.Conv2d(dims[0], width, 3, bias=bias)
        self.fc = nn.Linear(width, 2)
"""


def test_model_spec_from_a_file_with_literal_args(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net_cli_a.py").write_text(NET_PY.format(name="Net"))
    torch.manual_seed(0)
    ns: dict = {}
    exec(NET_PY.format(name="Net"), ns)  # noqa: S102 - the same class, to write its checkpoint
    ref = ns["Net"](width=6, dims=(1,), act="gelu", bias=False)
    torch.save(ref.state_dict(), "ckpt.pth")
    r = run("load", "ckpt.pth", "--model", "./net_cli_a.py:Net", "--model-arg", "width=6", "--model-arg",
            "dims=(1,)", "--model-arg", "act=gelu", "--model-arg", "bias=False", "--save", "out.safetensors")
    assert r.exit_code == 0, r.output
    assert "Loaded 3/3 tensors" in r.output and "saved out.safetensors" in r.output
    from safetensors.torch import load_file

    saved = load_file("out.safetensors")
    assert set(saved) == set(ref.state_dict()) and all(torch.equal(saved[k], v) for k, v in ref.state_dict().items())


def test_model_spec_from_a_module_in_a_package_uses_its_relative_imports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkg = tmp_path / "src" / "clipkg_b" / "models"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg.parent / "layers.py").write_text("import torch.nn as nn\n\ndef head(n):\n    return nn.Linear(4, n)\n")
    (pkg / "zoo.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from ..layers import head

        def factory(num_classes=3):
            return nn.Sequential(nn.Linear(2, 4), head(num_classes))
    """))
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 7))
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, "dp.pth")
    r = run("load", "dp.pth", "--model", "src/clipkg_b/models/zoo.py:factory", "--model-arg", "num_classes=7")
    assert r.exit_code == 0, r.output
    assert "Loaded 4/4 tensors" in r.output and "strip 'module.'" in r.output
    assert sys.modules["clipkg_b.models.zoo"].__file__ == str(pkg / "zoo.py")


def test_model_spec_file_errors_say_what_to_do(tmp_path, monkeypatch, small):
    _net, ckpt = small
    monkeypatch.chdir(tmp_path)
    r = run("load", ckpt, "--model", "./missing_net.py:Net")
    assert r.exit_code == 1
    assert "no Python file './missing_net.py'" in r.stderr and "hint: give the path to a .py file" in r.stderr
    (tmp_path / "net_cli_c.py").write_text(NET_PY.format(name="Net"))
    r = run("load", ckpt, "--model", "./net_cli_c.py:Nett")
    assert r.exit_code == 1
    assert "./net_cli_c.py has no attribute 'Nett'" in r.stderr and "classes defined there: Net" in r.stderr
    (tmp_path / "net_cli_d.py").write_text("import not_a_module_anywhere\n")
    r = run("load", ckpt, "--model", "./net_cli_d.py:Net")
    assert r.exit_code == 1
    assert "ModuleNotFoundError: No module named 'not_a_module_anywhere'" in r.stderr
    assert f"set PYTHONPATH={tmp_path}" in r.stderr and "Traceback" not in r.output


def test_model_args_are_python_literals():
    from ckptfit.specs import parse_model_args

    got = parse_model_args(["n=10", "dims=(64, 128)", "act=gelu", "bias=False", "scale=None", "lr=1e-3",
                            "flag=true", "name='a=b'", "path=./x.py"])
    assert got == {"n": 10, "dims": (64, 128), "act": "gelu", "bias": False, "scale": None, "lr": 1e-3,
                   "flag": True, "name": "a=b", "path": "./x.py"}
    with pytest.raises(CheckpointError, match="not of the form name=value"):
        parse_model_args(["10"])
    with pytest.raises(CheckpointError, match="not of the form name=value"):
        parse_model_args(["num classes=10"])


def test_spec_grammar_is_documented_once_and_help_points_at_it():
    from ckptfit import specs

    doc = specs.__doc__
    for form in ("torchvision:NAME", "timm:NAME", "hf:CONFIG_DIR", "package.module:ATTR", "path/to/file.py:ATTR"):
        assert form in doc
    assert "docs/cli.md" in run("load", "--help").output and "docs/cli.md" in run("--help").output
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert "path/to/file.py:ATTR" in page and "ast.literal_eval" in page


# ------------------------------------------------------------------------------------ --save, --dtype

def test_save_into_a_missing_folder_fails_before_loading(tmp_path):
    page = tmp_path / "page.pth"  # loading it would fail with another message
    page.write_text("<!DOCTYPE html><html></html>")
    r = run("load", page, "--model", "torchvision:resnet18", "--save", tmp_path / "nope" / "x.safetensors")
    assert r.exit_code == EXIT_CODES["usage"] == 2
    assert "the folder" in r.output and "does not exist; create it first (mkdir -p" in r.output
    assert "HTML" not in r.output and not (tmp_path / "nope").exists()


def test_load_and_convert_take_the_same_dtype_names(small, tmp_path):
    net, ckpt = small
    mod = f"{__name__}:Small"
    r = run("load", ckpt, "--model", mod, "--dtype", "float16", "--save", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.output
    r = run("convert", ckpt, tmp_path / "b.safetensors", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a["conv.weight"].dtype == b["conv.weight"].dtype == torch.float16
    for command in (["load", ckpt, "--model", mod], ["convert", ckpt, tmp_path / "c.safetensors"]):
        r = run(*command, "--dtype", "bf17")
        assert r.exit_code == 2 and "unknown dtype 'bf17'; use one of fp32 (float32, float)" in r.output


# ------------------------------------------------------------------------------------ diff and exit codes

def test_diff_exit_codes(small, tmp_path):
    net, ckpt = small
    same = tmp_path / "same.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), same)
    changed = tmp_path / "changed.pth"
    torch.save({k: (v + 1 if k == "fc.bias" else v) for k, v in net.state_dict().items()}, changed)
    r = run("diff", ckpt, same)
    assert r.exit_code == EXIT_CODES["ok"] == 0 and "identical" in r.output
    r = run("diff", ckpt, changed)
    assert r.exit_code == EXIT_CODES["differ"] == 7 and "fc.bias" in r.output
    r = run("diff", ckpt, changed, "--no-values")
    assert r.exit_code == 0
    r = run("diff", ckpt, changed, "--no-such-option")
    assert r.exit_code == 2
    page = tmp_path / "page.pth"
    page.write_text("<!DOCTYPE html><html></html>")
    r = run("diff", ckpt, page)
    assert r.exit_code == 1 and r.stderr.startswith("error: ")


def test_json_errors_for_every_command_with_json(small, tmp_path):
    net, ckpt = small
    page = tmp_path / "page.pth"
    page.write_text("<!DOCTYPE html><html></html>")
    commands = {
        "inspect": ["inspect", page], "load": ["load", page, "--model", f"{__name__}:Small"],
        "plan": ["plan", page, "--model", f"{__name__}:Small"], "diff": ["diff", ckpt, page],
        "convert": ["convert", page, tmp_path / "o.safetensors"], "identify": ["identify", page],
        "scan": ["scan", page], "verify": ["verify", f"{__name__}:Small", page],
    }
    with_json = sorted(n for n, c in main.commands.items() if any("--json" in p.opts for p in c.params))
    assert sorted(commands) == with_json  # every command with --json is checked here
    for name, args in commands.items():
        r = run(*args, "--json")
        assert r.exit_code == 1, (name, r.output)
        err = json.loads(r.stdout)["error"]
        assert set(err) == {"type", "message", "hint"} and err["type"] == "NotACheckpoint", (name, err)
        assert "HTML" in err["message"] and err["hint"], (name, err)
        assert r.stderr == "", (name, r.stderr)  # scripts read stdout; nothing else is printed
    # usage errors too, with exit code 2, also when click itself rejects the arguments
    r = run("load", ckpt, "--model", f"{__name__}:Small", "--dtype", "bf17", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["type"] == "BadParameter"
    r = run("inspect", tmp_path / "missing.pth", "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert "does not exist" in err["message"] and err["hint"] == "run the command with --help for its options"
    r = run("identify", ckpt, "--top", "0", "--json")
    assert r.exit_code == 2 and "--top" in json.loads(r.stdout)["error"]["message"]


def test_a_refused_load_in_json_lists_its_problems(small):
    _net, ckpt = small
    r = run("load", ckpt, "--model", "torchvision:resnet18", "--json")
    err = json.loads(r.stdout)["error"]
    assert r.exit_code == 1 and err["type"] == "LoadError" and "the model was not changed" in err["message"]
    assert err["problems"] and all(isinstance(p, str) for p in err["problems"])


def test_verify_failure_in_json_is_an_error_object(tmp_path):
    net = Small()
    with torch.no_grad():
        net.fc.weight.fill_(float("nan"))
    torch.save(net.state_dict(), tmp_path / "nan.pth")
    r = run("load", tmp_path / "nan.pth", "--model", f"{__name__}:Small", "--verify", "--json",
            "--save", tmp_path / "out.safetensors")
    data = json.loads(r.stdout)
    assert r.exit_code == 1 and data["verify"]["ok"] is False and data["report"]["counts"]["loaded"] == len(net.state_dict())
    assert data["error"]["type"] == "VerifyFailed" and data["error"]["message"].endswith("; not saved")
    assert not (tmp_path / "out.safetensors").exists()


def test_exit_codes_are_one_table_documented_in_help_and_readme():
    from ckptfit.scanning import EXIT_CODES as SCAN

    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)  # distinct per meaning
    assert {v: c for v, c in SCAN.items() if v != "clean"} == {v: EXIT_CODES[v] for v in SCAN if v != "clean"}
    assert SCAN["clean"] == EXIT_CODES["ok"]
    text = " ".join(run("--help", terminal_width=100).output.split())
    for meaning, code in EXIT_CODES.items():
        label = {"ok": "ok", "error": "error or refused", "usage": "usage error"}.get(meaning, meaning)
        assert f"{code} " in text and label.split()[0] in text, meaning
    for label in ("3 scan: not known to be safe", "5 scan: dangerous", "6 identify: unknown", "7 diff: they differ"):
        assert label in text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\d) \| ([^|]+) \|", readme.split("### Exit status", 1)[1], re.M))
    assert sorted(int(c) for c in table) == sorted(EXIT_CODES.values())


# ------------------------------------------------------------------------------------ convert's key options

def test_convert_writes_a_clean_state_dict_from_a_dataparallel_training_checkpoint(small, tmp_path):
    torch.manual_seed(1)
    net = Small()
    dp = nn.DataParallel(net)  # the keys a DataParallel training script really saves
    opt = torch.optim.Adam(dp.parameters())
    dp(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert all(k.startswith("module.") for k in dp.state_dict())
    src = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": dp.state_dict(), "optimizer": opt.state_dict()}, src)
    out = tmp_path / "model.safetensors"
    r = run("convert", src, out, "--strip-prefix", "module.")
    assert r.exit_code == 0, r.output
    assert "names: strip 'module.' (9 keys)" in r.output
    assert "not written: 'optimizer': optimizer/scheduler state" in r.output
    from safetensors.torch import load_file

    sd = load_file(str(out))
    fresh = Small()
    fresh.load_state_dict(sd, strict=True)  # plain PyTorch loads it as it is
    assert set(sd) == set(net.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    r = run("convert", src, tmp_path / "auto.safetensors", "--strip-prefix", "auto", "--exclude", "*.num_batches_tracked",
            "--rename", r"^fc\.=>head.")
    assert r.exit_code == 0, r.output
    got = load_file(str(tmp_path / "auto.safetensors"))
    assert sorted(got) == sorted(["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                  "bn.running_var", "head.weight", "head.bias"])
    assert torch.equal(got["head.weight"], net.fc.weight) and "1 tensors excluded" in r.output


def test_convert_key_options_refuse_what_would_be_wrong(small, tmp_path):
    from ckptfit.conversion import convert

    net, ckpt = small
    with pytest.raises(CheckpointError, match="strip_prefix 'module.': no key starts with it"):
        convert(ckpt, tmp_path / "a.safetensors", strip_prefix="module.")
    with pytest.raises(CheckpointError, match=r"rename r'\^head\\.' -> 'fc.' matches no key"):
        convert(ckpt, tmp_path / "a.safetensors", rename=[(r"^head\.", "fc.")])
    with pytest.raises(CheckpointError, match="two keys would both be written as 'x.weight'"):
        convert(ckpt, tmp_path / "a.safetensors", rename=[(r"^(conv|fc)\.", "x.")])
    with pytest.raises(CheckpointError, match="no tensor is left to write"):
        convert(ckpt, tmp_path / "a.safetensors", include=["nothing.*"])
    with pytest.raises(CheckpointError, match="unknown dtype 'bf17'"):
        convert(ckpt, tmp_path / "a.safetensors", dtype="bf17")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pth"]
    # only fc, renamed: the other keys' collision does not matter when they are left out
    res = convert(ckpt, tmp_path / "fc.pt", include="fc.*", rename=[(r"^(conv|fc)\.", "x.")])
    back = torch.load(tmp_path / "fc.pt", weights_only=True)
    assert sorted(back) == ["x.bias", "x.weight"] and torch.equal(back["x.weight"], net.fc.weight)
    assert res.names == ("rename r'^(conv|fc)\\.' -> 'x.' (4 keys)",)


# ------------------------------------------------------------------------------------ structure

def test_cli_modules_import_in_any_order_and_run_as_a_module():
    out = subprocess.run([sys.executable, "-m", "ckptfit.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "Exit status" in out.stdout
    for path in sorted((ROOT / "src" / "ckptfit").glob("_cli_*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^from \.cli import|^from ckptfit\.cli import|^import ckptfit\.cli", text, re.M), path
        code = f"import ckptfit.{path.stem}"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, (path.name, r.stderr)


# ------------------------------------------------------------------------------------ identify: unknown

def _identification(*scores: float):
    from ckptfit.identification import Candidate, Identification

    names = ["torchvision.models.googlenet", "torchvision.models.resnet18", "timm.convnext_atto"]
    cands = tuple(Candidate(n, {"num_classes": 10} if i == 1 else {}, s, f"{int(s * 100)}/100 model tensors match",
                            n.replace("torchvision.models.", "torchvision:") if "torchvision" in n else None,
                            ("missing from the checkpoint (90): inception{3..5}.*",))
                  for i, (n, s) in enumerate(zip(names, scores)))
    return Identification("odd.pth", "", 12, tuple(sorted(cands, key=lambda c: -c.score)), False,
                          ("torchvision: 113 models",))


def test_identify_unknown_lists_only_candidates_with_real_support():
    from ckptfit._cli_identify import render_identification

    text = render_identification(_identification(0.007, 0.004, 0.001))
    assert text.splitlines()[0] == "odd.pth: unknown architecture (12 tensors); no known architecture fits it"
    assert "closest: torchvision.models.googlenet(), score 0.007: 0/100 model tensors match" in text
    assert "missing from the checkpoint (90)" in text and "too little in common to be a guess" in text
    assert "resnet18" not in text and "convnext" not in text and "0.004" not in text
    text = render_identification(_identification(0.3, 0.91, 0.62))
    assert "candidates sharing at least 50% of their tensors with it:" in text
    assert "0.910  torchvision.models.resnet18(num_classes=10)" in text and "0.620  timm.convnext_atto()" in text
    assert "googlenet" not in text
    assert "to see what differs: ckptfit plan odd.pth --model torchvision:resnet18 --model-arg num_classes=10" in text
    text = render_identification(_identification(0.0, 0.0, 0.0))
    assert "no known architecture shares a tensor name and shape with it" in text


def test_identify_cli_unknown_exit_code(tmp_path, monkeypatch):
    import ckptfit.identification as identify_module

    monkeypatch.setattr(identify_module, "identify", lambda *a, **k: _identification(0.007, 0.004, 0.001))
    torch.save({"w": torch.zeros(2)}, tmp_path / "odd.pth")
    r = run("identify", tmp_path / "odd.pth")
    assert r.exit_code == EXIT_CODES["unknown"] == 6
    assert "closest: torchvision.models.googlenet()" in r.stdout and "0.004" not in r.stdout


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`ckptfit load ... --save F | head -1`: the reader is gone before "saved F" is written; no error text."""
    (tmp_path / "net.py").write_text("import torch.nn as nn\n\n\ndef Net():\n    return nn.Linear(4, 3)\n")
    torch.save(nn.Linear(4, 3).state_dict(), tmp_path / "w.pt")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = (f'cd "{tmp_path}" && "{sys.executable}" -m ckptfit load w.pt --model ./net.py:Net --save out.safetensors '
           '| head -1 >/dev/null; echo "rc=${PIPESTATUS[0]}" >&2')
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert "error" not in res.stderr and "Traceback" not in res.stderr and "Exception" not in res.stderr, res.stderr
    assert res.stderr.strip() in ("rc=0", "rc=1"), res.stderr  # 0 if everything was written before head left
