"""Inspecting a checkpoint costs the same whatever its size: ckptfit.open + listing vs torch.load.

Writes torch zip and safetensors files of the same 64 tensors at two sizes (default 100 MB and
1 GB: only the tensors' sizes differ), then, each in a fresh process with a warm page cache,
times ``ckptfit.open(path)`` plus listing every tensor's name, shape and dtype, against
``torch.load(path)`` (reads every byte) and ``torch.load(path, mmap=True)``.

Then the whole command, as a user waits for it (wall-clock of a fresh process, interpreter start
included): ``python -m ckptfit inspect FILE`` (which never imports torch) against
``python -c "import torch; torch.load(FILE)"`` (``safetensors.torch.load_file`` for a
safetensors file) and against ``python -c pass``, the interpreter alone; the ratio is printed.

Usage::

    python bench/bench_inspect.py                     # 100 MB and 1024 MB
    python bench/bench_inspect.py --size 100 --size 2048 --repeat 5
    python bench/bench_inspect.py --size 1024 --repeat 5 --cli-only   # just the commands
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

HERE = os.path.abspath(__file__)
N_TENSORS = 64


def write(folder: str, size_mb: float) -> list[str]:
    from safetensors.torch import save_file

    per = int(size_mb * 2**20 / N_TENSORS / 4)
    cols = 1024
    rows = max(1, per // cols)
    gen = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.rand(rows, cols, generator=gen) for i in range(N_TENSORS)}
    pt = os.path.join(folder, f"m{int(size_mb)}.pt")
    st = os.path.join(folder, f"m{int(size_mb)}.safetensors")
    torch.save(sd, pt)
    save_file(sd, st)
    return [pt, st]


def child(how: str, path: str) -> dict:
    import ckptfit

    t = time.perf_counter()
    if how == "ckptfit":
        with ckptfit.open(path) as ck:
            listing = [(k, t_.shape, t_.dtype) for k, t_ in ck.tensors()]
    elif how == "torch.load":
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, weights_only=True)
        listing = [(k, v.shape, v.dtype) for k, v in sd.items()]
    else:  # torch.load mmap / safe_open
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                listing = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]
        else:
            sd = torch.load(path, weights_only=True, mmap=True)
            listing = [(k, v.shape, v.dtype) for k, v in sd.items()]
    seconds = time.perf_counter() - t
    assert len(listing) == N_TENSORS
    return {"seconds": seconds}


def run(how: str, path: str, repeat: int) -> float:
    with open(path, "rb", buffering=0) as f:  # warm page cache
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    best = float("inf")
    for _ in range(repeat):
        res = subprocess.run([sys.executable, HERE, "--child", how, path], capture_output=True, text=True,
                             env=dict(os.environ, CKPTFIT_PROGRESS="0"))
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        best = min(best, json.loads(res.stdout.strip().splitlines()[-1])["seconds"])
    return best


def wall(cmd: list[str], repeat: int) -> float:
    """Best wall-clock of ``cmd`` in a fresh process (interpreter start and imports included)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CKPTFIT_PROGRESS="0"))
        seconds = time.perf_counter() - t
        if res.returncode:
            raise SystemExit(f"{cmd}: {res.stderr[-2000:]}")
        best = min(best, seconds)
    return best


def cli_row(path: str, repeat: int) -> dict:
    with open(path, "rb", buffering=0) as f:  # warm page cache
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    if path.endswith(".safetensors"):
        load = f"from safetensors.torch import load_file; load_file({path!r})"
        load_name = "load_file"
    else:
        load = f"import torch; torch.load({path!r}, weights_only=True)"
        load_name = "torch.load"
    # interleaved, so a busy machine slows each command alike
    runs: dict[str, list[float]] = {"inspect": [], "load": [], "python": []}
    for _ in range(repeat):
        runs["inspect"].append(wall([sys.executable, "-m", "ckptfit", "inspect", path], 1))
        runs["load"].append(wall([sys.executable, "-c", load], 1))
        runs["python"].append(wall([sys.executable, "-c", "pass"], 1))
    return {"size": os.path.getsize(path), "fmt": "safetensors" if path.endswith(".safetensors") else "torch zip",
            "load_name": load_name, **{k: min(v) for k, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, action="append", help="file size in MB (repeatable; default 100 and 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cli-only", action="store_true", help="time only the commands (ckptfit inspect vs torch.load)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sizes = args.size or [100, 1024]
    folder = tempfile.mkdtemp(prefix="ckptfit-inspect-")
    rows = []
    cli_rows = []
    try:
        for size in sizes:
            for path in write(folder, size):
                c = cli_row(path, args.repeat)
                cli_rows.append(c)
                print(f"  {os.path.basename(path):18s} ckptfit inspect {c['inspect']:.3f}s  python -c {c['load_name']} "
                      f"{c['load']:.3f}s  python -c pass {c['python']:.3f}s", flush=True)
                if args.cli_only:
                    os.remove(path)
                    continue
                fmt = "safetensors" if path.endswith(".safetensors") else "torch zip"
                other = "safe_open" if fmt == "safetensors" else "torch.load(mmap=True)"
                full = "load_file" if fmt == "safetensors" else "torch.load"
                r = dict(size=os.path.getsize(path), fmt=fmt,
                         ckptfit=run("ckptfit", path, args.repeat),
                         full=run("torch.load", path, args.repeat), full_name=full,
                         lazy=run("mmap", path, args.repeat), lazy_name=other)
                rows.append(r)
                print(f"  {os.path.basename(path):18s} ckptfit.open+list {r['ckptfit']:.3f}s  {full} {r['full']:.3f}s  "
                      f"{other} {r['lazy']:.3f}s", flush=True)
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| file | size | `ckptfit inspect FILE` | `python -c \"import torch; torch.load(FILE)\"` | inspect / load | "
          "`python -c pass` |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in cli_rows:
        print(f"| {c['fmt']} | {c['size'] / 2**20:.0f} MiB | {c['inspect']:.3f} s | {c['load_name']}: {c['load']:.3f} s | "
              f"{c['inspect'] / c['load']:.2f} | {c['python']:.3f} s |")
    if not rows:
        return
    print()
    print("| file | size | ckptfit.open + list | full load (same listing) | lazy torch/safetensors |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fmt']} | {r['size'] / 2**20:.0f} MiB | {r['ckptfit'] * 1000:.1f} ms | "
              f"{r['full_name']}: {r['full'] * 1000:.0f} ms | {r['lazy_name']}: {r['lazy'] * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
