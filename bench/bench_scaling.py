"""How load cost grows with file size and with tensor count, for ckptfit's paths and their floors.

Writes ``bench/scaling.png`` (log-log, two panels) and prints the points as a markdown table:

- against file size: the "large" model of ``bench_load.py`` (blocks of ``Linear(2048, 4096)`` /
  ``Linear(4096, 2048)``), safetensors fp32, from 64 MiB up to ``--max-size`` MiB;
- against tensor count: ``n`` tiny ``Linear(4, 4)`` layers (``2 n`` tensors, a few bytes each),
  100 to ``--max-tensors`` tensors: ckptfit's cost per tensor with the bytes taken away.

Paths: ``build`` (private memory, CRC checked), ``build_mmap`` (views of the file), ``load`` (into an
existing model, all or nothing); floors as in ``bench_floors.py`` (allocate + ``preadv``, meta +
mapped file + assign, ``preadv`` into the existing memory). Each point: best of ``--repeat``
fresh processes, the recipes taking turns.

Usage::

    python bench/bench_scaling.py                                  # 64 MiB..2 GiB, 100..100k tensors
    python bench/bench_scaling.py --max-size 8192 --repeat 3       # up to 8 GiB (needs ~10 GiB free memory)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_floors import interleaved, make_model  # noqa: E402
from bench_load import LARGE_BLOCK_BYTES  # noqa: E402

RECIPES = ["build", "floor_alloc_read", "build_mmap", "floor_mmap_assign", "load", "load_atomic_false",
           "floor_read_existing"]
STYLE = {"build": ("C0", "-", "o"), "floor_alloc_read": ("C0", ":", "o"),
         "build_mmap": ("C1", "-", "s"), "floor_mmap_assign": ("C1", ":", "s"),
         "load": ("C2", "-", "^"), "load_atomic_false": ("C3", "--", "v"), "floor_read_existing": ("C2", ":", "^")}
LABEL = {"build": "ckptfit.build (private, CRC)", "floor_alloc_read": "floor: allocate + preadv",
         "build_mmap": "ckptfit.build(mmap=True)", "floor_mmap_assign": "floor: meta + mmap + assign",
         "load": "ckptfit.load (existing model, all or nothing)", "load_atomic_false": "ckptfit.load(atomic=False)",
         "floor_read_existing": "floor: preadv into existing"}


def write(folder: str, shape: str, n: int) -> dict:
    from safetensors.torch import save_file

    if shape == "large":  # written a tensor at a time: an 8 GiB file without 8 GiB of tensors in memory
        from bench_peak import write as write_large

        path = os.path.join(folder, f"{shape}-{n}.safetensors")
        size = write_large(path, n)
        with torch.device("meta"):
            tensors = len(make_model(shape, n).state_dict())
        return dict(path=path, shape=shape, n=n, bytes=size, tensors=tensors)
    with torch.device("meta"):
        meta = make_model(shape, n)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.rand(v.shape, generator=gen) for k, v in meta.state_dict().items()}
    path = os.path.join(folder, f"{shape}-{n}.safetensors")
    save_file(sd, path)
    return dict(path=path, shape=shape, n=n, bytes=os.path.getsize(path), tensors=len(sd))


def series(points: list[tuple[str, int]], repeat: int, folder: str) -> list[dict]:
    rows = []
    for shape, n in points:
        f = write(folder, shape, n)
        got = interleaved(RECIPES, f, f["path"], repeat)
        rows.append(dict(f, **{r: got[r]["seconds"] for r in RECIPES}))
        os.remove(f["path"])
        print(f"  {shape} n={n}: {f['tensors']} tensors, {f['bytes'] / 2**20:.0f} MiB  "
              + "  ".join(f"{r}={got[r]['seconds']:.3f}" for r in RECIPES), file=sys.stderr, flush=True)
    return rows


def plot(by_size: list[dict], by_count: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, rows, xkey, xlabel in ((axes[0], by_size, "bytes", "file size (MiB)"),
                                   (axes[1], by_count, "tensors", "tensors in the file")):
        xs = [r[xkey] / (2**20 if xkey == "bytes" else 1) for r in rows]
        for rec in RECIPES:
            color, ls, marker = STYLE[rec]
            ax.plot(xs, [r[rec] for r in rows], color=color, linestyle=ls, marker=marker, label=LABEL[rec])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds (best of runs, fresh process, warm cache)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("large tensors, fp32 safetensors")
    axes[1].set_title("tiny tensors (Linear(4, 4)), fp32 safetensors")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(rows: list[dict]) -> str:
    head = ("| tensors | size | " + " | ".join(RECIPES)
            + " | build / floor | mmap / floor | load / floor | atomic=False / floor |")
    lines = [head, "|" + "---:|" * (len(RECIPES) + 6)]
    for r in rows:
        lines.append(f"| {r['tensors']} | {r['bytes'] / 2**20:.0f} MiB | " + " | ".join(f"{r[k]:.3f}" for k in RECIPES)
                     + f" | {r['build'] / r['floor_alloc_read']:.2f}x | {r['build_mmap'] / r['floor_mmap_assign']:.2f}x"
                     + f" | {r['load'] / r['floor_read_existing']:.2f}x"
                     + f" | {r['load_atomic_false'] / r['floor_read_existing']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-size", type=int, default=2048, help="largest file in MiB (default 2048)")
    ap.add_argument("--max-tensors", type=int, default=100_000, help="most tensors (default 100,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png"))
    args = ap.parse_args()
    sizes, s = [], 64
    while s <= args.max_size:
        sizes.append(s)
        s *= 4 if s * 4 <= args.max_size or s == args.max_size else args.max_size // s
    counts, c = [], 100
    while c <= args.max_tensors:
        counts.append(c)
        c *= 10
    folder = tempfile.mkdtemp(prefix="ckptfit-scaling-")
    try:
        by_size = series([("large", max(1, round(mb * 2**20 / LARGE_BLOCK_BYTES))) for mb in sizes], args.repeat, folder)
        by_count = series([("tiny", max(1, c // 2)) for c in counts], args.repeat, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    title = (f"ckptfit load cost vs floors: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}, best of {args.repeat}")
    plot(by_size, by_count, args.out, title)
    print(title)
    print(table(by_size))
    print()
    print(table(by_count))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
