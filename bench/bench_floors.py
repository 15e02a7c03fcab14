"""Each of ckptfit's load paths against its floor: the simplest code that does the same unavoidable work.

A floor is measured in the same run as the path it judges, in the same kind of process (a fresh
Python process per run, warm page cache, imports done before the clock starts), best of
``--repeat`` runs interleaved (path, floor, path, floor, ...), so a busy machine slows both alike.
The ratio ``path / floor`` is the figure; absolute times on a shared VM vary 3-10x between runs.

| path | what ckptfit does | floor |
|---|---|---|
| ``build`` | meta model, every value copied into private memory, CRC-32 of every record | meta model + ``torch.empty`` per tensor + ``os.preadv`` of the same bytes (2 threads) + assign |
| ``build_mmap`` | meta model, copy-on-write views of the file (``mmap=True``), CRC checked | meta model + ``torch.load(mmap=True)`` / ``safe_open`` + ``load_state_dict(assign=True)`` |
| ``build_mmap_nocrc`` | the same with ``verify=False`` | the same floor |
| ``load`` | into an existing model, CRC checked, all or nothing | ``os.preadv`` into each parameter's own memory (2 threads) |
| ``load_atomic_false`` | the same with ``atomic=False`` (no undo copy; every record checked before the writes) | the same floor |
| ``build`` of the fp16 file into the fp32 model | private fp32 memory, converted while read | meta model + mapped file + ``torch.empty`` fp32 + ``copy_`` (torch's threads) |
| small tensors | ckptfit's own time per tensor | ``build`` minus constructing the same model on meta, per tensor |

Usage::

    python bench/bench_floors.py                         # 1 GiB files, best of 5 (~10 min on 2 cores)
    python bench/bench_floors.py --size 256 --repeat 3   # quicker
    python bench/bench_floors.py --json floors.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_load import _peak, _rss, count_for, warm, write_files  # noqa: E402
from bench_load import make_model as _bench_load_model  # noqa: E402


def make_model(shape: str, n: int) -> nn.Module:
    """bench_load's "large" and "small" models, and "tiny": ``n`` ``Linear(4, 4)`` in blocks of 100."""
    if shape == "tiny":
        return nn.ModuleList(nn.ModuleList(nn.Linear(4, 4) for _ in range(min(100, n - i))) for i in range(0, n, 100))
    return _bench_load_model(shape, n)

HERE = os.path.abspath(__file__)
TARGET = 1.2

# path -> its floor; the fp16 rows are measured on the fp16 file into the fp32 model
PAIRS = [
    ("build", "floor_alloc_read"),
    ("build_mmap", "floor_mmap_assign"),
    ("build_mmap_nocrc", "floor_mmap_assign"),
    ("load", "floor_read_existing"),
    ("load_atomic_false", "floor_read_existing"),
]
CAST_PAIRS = [("build", "floor_alloc_cast"), ("load", "floor_cast_existing"), ("load_atomic_false", "floor_cast_existing")]


# ------------------------------------------------------------------------------------------- floors

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_layout(path: str) -> dict[str, tuple[int, int, list[int], torch.dtype]]:
    """name -> (file offset, nbytes, shape, dtype), read from the safetensors header (no tensor bytes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0], v["shape"],
                _ST_DTYPES[v["dtype"]]) for k, v in header.items()}


def _read_into(fd: int, items: list[tuple[torch.Tensor, int, int]]) -> None:
    """``os.preadv`` each (tensor, offset, nbytes) into the tensor's own memory, on 2 threads."""
    def one(chunk: list[tuple[torch.Tensor, int, int]]) -> None:
        for t, off, nbytes in chunk:
            view = memoryview(t.view(torch.uint8).reshape(-1).numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], off + done)
                if got <= 0:
                    raise OSError("short read")
                done += got

    halves: list[list] = [[], []]
    loads = [0, 0]
    for item in sorted(items, key=lambda it: -it[2]):
        i = 0 if loads[0] <= loads[1] else 1
        halves[i].append(item)
        loads[i] += item[2]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, halves))


def floor(recipe: str, st_path: str, make) -> nn.Module:
    layout = safetensors_layout(st_path)
    if recipe == "floor_alloc_read":
        with torch.device("meta"):
            model = make()
        sd = {k: torch.empty(shape, dtype=dt) for k, (_, _, shape, dt) in layout.items()}
        fd = os.open(st_path, os.O_RDONLY)
        try:
            _read_into(fd, [(sd[k], off, nb) for k, (off, nb, _, _) in layout.items()])
        finally:
            os.close(fd)
        model.load_state_dict(sd, assign=True)
        return model
    if recipe == "floor_mmap_assign":
        from safetensors import safe_open

        with torch.device("meta"):
            model = make()
        with safe_open(st_path, framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(sd, assign=True)
        return model
    if recipe in ("floor_alloc_cast", "floor_cast_existing"):
        from safetensors import safe_open

        if recipe == "floor_alloc_cast":
            with torch.device("meta"):
                model = make()
            want = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
        else:
            model = _existing(make)
            want = model.state_dict()
        with safe_open(st_path, framework="pt") as f, torch.no_grad():
            for k in f.keys():
                want[k].copy_(f.get_tensor(k))
        if recipe == "floor_alloc_cast":
            model.load_state_dict(want, assign=True)
        return model
    raise SystemExit(f"unknown floor {recipe}")


def _existing(make) -> nn.Module:
    """A model already in memory, its pages touched, made without the slow random init."""
    with torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# ------------------------------------------------------------------------------------------- child

def child(recipe: str, path: str, st_path: str, shape: str, n: int) -> dict:
    import ckptfit

    ckptfit.build, ckptfit.load  # noqa: B018 - `import ckptfit` is lazy: load the library before the clock
    import safetensors.torch  # noqa: F401

    def make() -> nn.Module:
        return make_model(shape, n)

    existing = _existing(make) if recipe in ("load", "load_nocrc", "load_atomic_false", "floor_read_existing",
                                             "floor_cast_existing") else None
    torch.empty(1).sum()
    base = _rss()
    t0 = time.perf_counter()
    if recipe == "meta":
        with torch.device("meta"):
            make()
    elif recipe == "floor_read_existing":
        layout = safetensors_layout(st_path)
        sd = existing.state_dict()
        fd = os.open(st_path, os.O_RDONLY)
        try:
            _read_into(fd, [(sd[k], off, nb) for k, (off, nb, _, _) in layout.items()])
        finally:
            os.close(fd)
    elif recipe == "floor_cast_existing":
        floor(recipe, st_path, lambda: existing)
    elif recipe.startswith("floor_"):
        floor(recipe, st_path, make)
    elif recipe in ("build", "build_mmap", "build_mmap_nocrc", "build_nocrc"):
        ckptfit.build(make, path, mmap=recipe.startswith("build_mmap"), verify=not recipe.endswith("nocrc"))
    elif recipe in ("load", "load_nocrc"):
        ckptfit.load(existing, path, verify=recipe == "load")
    elif recipe == "load_atomic_false":
        ckptfit.load(existing, path, atomic=False)
    else:
        raise SystemExit(f"unknown recipe {recipe}")
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_over_base=_peak() - base)


def run_child(recipe: str, f: dict, st_path: str) -> dict:
    warm(f["path"])
    warm(st_path)
    cmd = [sys.executable, HERE, "--child", recipe, f["path"], st_path, f["shape"], str(f["n"])]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CKPTFIT_PROGRESS="0"))
    if res.returncode != 0:
        raise SystemExit(f"child {recipe} on {f['path']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def interleaved(recipes: list[str], f: dict, st_path: str, repeat: int) -> dict[str, dict]:
    """Best of ``repeat`` runs of each recipe, the recipes taking turns within each round."""
    runs: dict[str, list[dict]] = {r: [] for r in recipes}
    for _ in range(repeat):
        for r in recipes:
            runs[r].append(run_child(r, f, st_path))
    out = {}
    for r, rs in runs.items():
        best = dict(min(rs, key=lambda x: x["seconds"]))
        best["runs"] = [round(x["seconds"], 3) for x in rs]
        best["peak_over_base"] = max(x["peak_over_base"] for x in rs)
        out[r] = best
    return out


# ------------------------------------------------------------------------------------------- parent

def measure_all(size_mb: float, repeat: int, folder: str, shapes=("large", "small"), fmts=("zip", "safetensors")) -> list[dict]:
    rows = []
    for shape in shapes:
        n = count_for(shape, size_mb)
        files = write_files(folder, shape, n)
        st = {f["dtype"]: f["path"] for f in files if f["fmt"] == "safetensors"}
        for f in files:
            if f["fmt"] not in fmts:
                continue
            pairs = PAIRS if f["dtype"] == "fp32" else CAST_PAIRS
            recipes = sorted({r for pair in pairs for r in pair})
            if shape == "small" and f["dtype"] == "fp32":
                recipes.append("meta")
            got = interleaved(recipes, f, st[f["dtype"]], repeat)
            for path_recipe, floor_recipe in pairs:
                a, b = got[path_recipe], got[floor_recipe]
                rows.append(dict(shape=shape, dtype=f["dtype"], fmt=f["fmt"], tensors=f["tensors"], bytes=f["bytes"],
                                 path=path_recipe, floor=floor_recipe, seconds=a["seconds"], floor_seconds=b["seconds"],
                                 ratio=a["seconds"] / b["seconds"], peak=a["peak_over_base"],
                                 floor_peak=b["peak_over_base"], runs=a["runs"], floor_runs=b["runs"]))
            if "meta" in got:
                own = got["build"]["seconds"] - got["meta"]["seconds"]
                rows.append(dict(shape=shape, dtype=f["dtype"], fmt=f["fmt"], tensors=f["tensors"], bytes=f["bytes"],
                                 path="build: own time per tensor", floor="meta construction", seconds=own,
                                 floor_seconds=got["meta"]["seconds"], ratio=None, per_tensor_us=own / f["tensors"] * 1e6,
                                 peak=0, floor_peak=0, runs=got["build"]["runs"], floor_runs=got["meta"]["runs"]))
            print(f"  measured {os.path.basename(f['path'])}", file=sys.stderr, flush=True)
        for f in files:
            os.remove(f["path"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| file | tensors | size | path | s | floor | floor s | ratio | target | peak RSS over base (path / floor) |",
             "|---|---:|---:|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        name = f"{r['shape']} {r['dtype']} {r['fmt']}"
        if r["ratio"] is None:
            ratio, verdict = f"{r['per_tensor_us']:.1f} us/tensor", ("met" if r["per_tensor_us"] <= 12 else "missed") + " (<= 12 us)"
        else:
            ratio = f"{r['ratio']:.2f}x"
            verdict = ("met" if r["ratio"] <= TARGET else "missed") + f" (<= {TARGET}x)"
        lines.append(f"| {name} | {r['tensors']} | {r['bytes'] / 2**30:.2f} GiB | {r['path']} | {r['seconds']:.3f} | "
                     f"{r['floor']} | {r['floor_seconds']:.3f} | {ratio} | {verdict} | "
                     f"{r['peak'] / 2**30:.2f} / {r['floor_peak'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1024, help="checkpoint size in MiB (fp32), default 1024")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs per recipe; the best is reported")
    ap.add_argument("--only", choices=("large", "small"), default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        recipe, path, st_path, shape, n = args.child
        print(json.dumps(child(recipe, path, st_path, shape, int(n))))
        return
    folder = tempfile.mkdtemp(prefix="ckptfit-floors-")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
          f"best of {args.repeat} interleaved, files in {folder}", flush=True)
    try:
        rows = measure_all(args.size, args.repeat, folder, shapes=[args.only] if args.only else ("large", "small"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
