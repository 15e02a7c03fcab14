"""Load-speed and memory benchmark: ckptfit.build / ckptfit.load against the usual recipes.

Writes ~SIZE MB checkpoints of two shapes -- "large" (blocks of Linear(2048, 4096) /
Linear(4096, 2048), a few large tensors) and "small" (blocks of 100 Linear(160, 160) modules,
~20,000 small tensors at 1 GB) -- as torch zip and safetensors, fp32 and fp16, then measures each recipe in
a fresh Python process (warm page cache: the file is read once before each run):

- ``usual``: instantiate the model, ``model.load_state_dict(torch.load(path))`` (for a
  safetensors file: ``safetensors.torch.load_file(path)``);
- ``hand``: the best hand-written recipe: build on the meta device,
  ``torch.load(path, mmap=True, weights_only=True)`` (safetensors: ``safe_open`` /
  ``get_tensor``, or ``load_file``, whichever is faster), cast to the model's dtype if the file's
  differs, ``load_state_dict(assign=True)``;
- ``build``: ``ckptfit.build(make_model, path)`` (the default: private memory, CRC-checked);
- ``load``: ``ckptfit.load(model, path)`` into an existing model (the call alone is timed);
- ``build_mmap``: ``ckptfit.build(make_model, path, mmap=True)`` (zero-copy views of the file);
- ``build_nocrc`` / ``load_nocrc``: ``build`` / ``load`` with ``verify=False`` (what checking costs);
- ``hand_copy``: the hand recipe that gives the same guarantee as ``build`` (private memory, no
  view of the file): meta model, ``torch.load(path, weights_only=True)`` without ``mmap``
  (safetensors: ``safetensors.torch.load(open(path, "rb").read())``), ``load_state_dict(assign=True)``.

Time is wall-clock until every weight has been read once (``p.sum()`` over every parameter;
for ``load`` the copy is the read). Peak RSS is the child's high-water mark (``VmHWM``, i.e.
``ru_maxrss`` without what Linux carries over from the parent across ``exec``), reported above
the child's RSS just before the recipe started (imports done; for ``load``, the model made).

Usage::

    python bench/bench_load.py                      # 1 GB files, everything (~10 min on 2 cores)
    python bench/bench_load.py --size 256 --repeat 1 --only large
    python bench/bench_load.py --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.abspath(__file__)
LARGE_BLOCK_BYTES = (2 * 2048 * 4096 + 4096 + 2048) * 4  # one Linear(2048,4096)+Linear(4096,2048), fp32
SMALL_MODULE_BYTES = (160 * 160 + 160) * 4


# ------------------------------------------------------------------------------------------- models

def make_model(shape: str, n: int) -> nn.Module:
    if shape == "large":
        return nn.Sequential(*[nn.Sequential(nn.Linear(2048, 4096), nn.Linear(4096, 2048)) for _ in range(n)])
    # nested like a real network (blocks of 100 layers): torch's load_state_dict filters the whole
    # state dict once per child module, so one flat list of 10,000 children would be quadratic
    return nn.ModuleList(nn.ModuleList(nn.Linear(160, 160) for _ in range(min(100, n - i)))
                         for i in range(0, n, 100))


def count_for(shape: str, size_mb: float) -> int:
    per = LARGE_BLOCK_BYTES if shape == "large" else SMALL_MODULE_BYTES
    return max(1, round(size_mb * 2**20 / per))


# ------------------------------------------------------------------------------------------- files

def write_files(folder: str, shape: str, n: int) -> list[dict]:
    """Write the four files of one shape; returns their descriptions."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = make_model(shape, n)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.rand(v.shape, generator=gen) - 0.5 for k, v in meta.state_dict().items()}
    out = []
    for dname, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        tensors = sd if dtype == torch.float32 else {k: v.to(dtype) for k, v in sd.items()}
        for fmt in ("zip", "safetensors"):
            path = os.path.join(folder, f"{shape}-{dname}.{'pt' if fmt == 'zip' else 'safetensors'}")
            if fmt == "zip":
                torch.save(tensors, path)
            else:
                save_file(tensors, path)
            out.append(dict(path=path, shape=shape, n=n, dtype=dname, fmt=fmt, bytes=os.path.getsize(path),
                            tensors=len(tensors)))
        del tensors
    return out


def warm(path: str) -> None:
    """Read the file once so every recipe starts from a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


# ------------------------------------------------------------------------------------------- child

def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    """Peak RSS of this process: VmHWM where /proc exists, else ru_maxrss.

    (On Linux ``ru_maxrss`` survives ``execve``: a child started from a big parent reports the
    parent's RSS at fork time as its own peak. VmHWM belongs to the new address space only.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _touch(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def child(recipe: str, path: str, shape: str, n: int, fmt: str) -> dict:
    import ckptfit  # imported before the baseline, as torch is; `import ckptfit` is lazy,
    ckptfit.build, ckptfit.load  # noqa: B018 - so touch the verbs to load the library itself
    import safetensors.torch  # noqa: F401

    def make() -> nn.Module:
        return make_model(shape, n)

    existing = None
    if recipe in ("load", "load_nocrc"):  # a model already in memory (its pages touched), made without the slow random init
        with torch.device("meta"):
            existing = make()
        existing.to_empty(device="cpu")
        with torch.no_grad():
            for p in existing.parameters():
                p.zero_()
    torch.empty(1).sum()  # first-op warm-up, outside the timing
    base = _rss()
    t0 = time.perf_counter()
    extra: dict = {}
    if recipe == "usual":
        model = make()
        if fmt == "zip":
            sd = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file

            sd = load_file(path)
        model.load_state_dict(sd)
        del sd
        _touch(model)
    elif recipe in ("hand", "hand_safe_open"):
        with torch.device("meta"):
            model = make()
        if fmt == "zip":
            sd = torch.load(path, mmap=True, weights_only=True)
        elif recipe == "hand":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        want = next(iter(model.parameters())).dtype
        sd = {k: (v.to(want) if v.dtype != want else v) for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)
        del sd
        _touch(model)
    elif recipe == "hand_copy":
        with torch.device("meta"):
            model = make()
        if fmt == "zip":
            sd = torch.load(path, weights_only=True)
        else:
            import safetensors.torch

            with open(path, "rb") as fh:
                sd = safetensors.torch.load(fh.read())
        want = next(iter(model.parameters())).dtype
        sd = {k: (v.to(want) if v.dtype != want else v) for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)
        del sd
        _touch(model)
    elif recipe in ("build", "build_mmap", "build_nocrc"):
        import ckptfit

        model, report = ckptfit.build(make, path, mmap=recipe == "build_mmap", verify=recipe != "build_nocrc")
        _touch(model)
    elif recipe in ("load", "load_nocrc"):
        import ckptfit

        model = existing
        ckptfit.load(model, path, verify=recipe == "load")
    else:
        raise SystemExit(f"unknown recipe {recipe}")
    seconds = time.perf_counter() - t0
    ok = all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    return dict(seconds=seconds, base_rss=base, peak_rss=_peak(), peak_over_base=_peak() - base, ok=ok, **extra)


# ------------------------------------------------------------------------------------------- parent

def run_child(recipe: str, f: dict) -> dict:
    warm(f["path"])
    cmd = [sys.executable, HERE, "--child", recipe, f["path"], f["shape"], str(f["n"]), f["fmt"]]
    env = dict(os.environ, CKPTFIT_PROGRESS="0")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child {recipe} on {f['path']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(recipe: str, f: dict, repeat: int) -> dict:
    runs = [run_child(recipe, f) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_over_base"] = max(r["peak_over_base"] for r in runs)
    best["runs"] = [round(r["seconds"], 3) for r in runs]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1024, help="checkpoint size in MB (fp32), default 1024")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a new temp dir, removed after)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per recipe; the fastest is reported (default 2)")
    ap.add_argument("--only", choices=("large", "small"), default=None, help="one shape only")
    ap.add_argument("--recipes", default="usual,hand,build,load", help="comma-separated subset")
    ap.add_argument("--skip-fp16", action="store_true", help="fp32 files only")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=5, metavar=("RECIPE", "PATH", "SHAPE", "N", "FMT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        recipe, path, shape, n, fmt = args.child
        print(json.dumps(child(recipe, path, shape, int(n), fmt)))
        return

    recipes = args.recipes.split(",")
    folder = args.dir or tempfile.mkdtemp(prefix="ckptfit-bench-")
    os.makedirs(folder, exist_ok=True)
    results: list[dict] = []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, files in {folder}", flush=True)
    try:
        for shape in ([args.only] if args.only else ["large", "small"]):
            n = count_for(shape, args.size)
            t = time.perf_counter()
            files = write_files(folder, shape, n)
            print(f"wrote {shape} files ({files[0]['tensors']} tensors) in {time.perf_counter() - t:.1f}s", flush=True)
            for f in files:
                if args.skip_fp16 and f["dtype"] == "fp16":
                    continue
                for recipe in recipes:
                    todo = [recipe]
                    if recipe == "hand" and f["fmt"] == "safetensors":
                        todo = ["hand", "hand_safe_open"]
                    got = [dict(measure(r, f, args.repeat), recipe=r) for r in todo]
                    r = min(got, key=lambda g: g["seconds"])
                    r.update(recipe=recipe, variant=r["recipe"] if r["recipe"] != recipe else None,
                             **{k: f[k] for k in ("shape", "dtype", "fmt", "bytes", "tensors")})
                    results.append(r)
                    print(f"  {os.path.basename(f['path']):24s} {recipe:6s} {r['seconds']:7.3f}s "
                          f"peak +{r['peak_over_base'] / 2**30:5.2f} GiB  runs {r['runs']}", flush=True)
            for f in files:
                os.remove(f["path"])
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def table(results: list[dict]) -> str:
    """A markdown table with ratios, and the target checks."""
    by = {(r["shape"], r["dtype"], r["fmt"], r["recipe"]): r for r in results}
    lines = ["| file | tensors | size | recipe | time s | vs hand | usual / this | peak RSS over base | / file size |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        key = (r["shape"], r["dtype"], r["fmt"])
        hand = by.get((*key, "hand"))
        hand32 = by.get((r["shape"], "fp32", r["fmt"], "hand"))
        usual = by.get((*key, "usual"))
        name = f"{r['shape']} {r['dtype']} {r['fmt']}"
        label = r["recipe"] + (f" ({r['variant']})" if r.get("variant") else "")
        vs_hand = f"{r['seconds'] / hand['seconds']:.2f}x" if hand else ""
        if r["dtype"] == "fp16" and hand32 and r["recipe"] in ("build", "load"):
            vs_hand += f" ({r['seconds'] / hand32['seconds']:.2f}x fp32 hand)"
        speed = f"{usual['seconds'] / r['seconds']:.1f}x" if usual else ""
        lines.append(f"| {name} | {r['tensors']} | {r['bytes'] / 2**30:.2f} GiB | {label} | {r['seconds']:.3f} | "
                     f"{vs_hand} | {speed} | {r['peak_over_base'] / 2**30:.2f} GiB | "
                     f"{r['peak_over_base'] / r['bytes']:.2f} |")
    notes = []
    for fmt in ("zip", "safetensors"):
        lg, sm = by.get(("large", "fp32", fmt, "build")), by.get(("small", "fp32", fmt, "build"))
        if lg and sm:
            ratio = (sm["seconds"] / sm["bytes"]) / (lg["seconds"] / lg["bytes"])
            notes.append(f"- {fmt}: small-tensor build per byte = {ratio:.2f}x the large-tensor build per byte")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    main()
