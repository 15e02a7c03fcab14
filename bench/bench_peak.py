"""Peak memory of loading a large file: ``load`` into an existing model (all or nothing, and
``atomic=False``), the safe ``build``, and the floor that reads into existing memory.

Each recipe runs in a fresh process (``bench_floors.py --child``); "peak over base" is the
child's high-water mark (``VmHWM``) above its RSS just before the recipe started, so for the loads
the existing model is in the base. Targets (issue #16): a load into an existing model peaks at
most 128 MiB over the model; a safe build at most 1.1x the checkpoint.

Usage::

    python bench/bench_peak.py --size 8192        # one 8 GiB safetensors file (~3 min to write here)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_load import count_for, make_model  # noqa: E402

RECIPES = ("floor_read_existing", "load_atomic_false", "load", "build")


def write(path: str, n: int) -> int:
    """The "large" model's tensors (``n`` blocks), random, in a safetensors file written one tensor at a
    time (``save_file`` would hold every tensor, and maybe its bytes, in memory at once); returns its size."""
    import struct

    with torch.device("meta"):
        meta = make_model("large", n)
    shapes = {k: list(v.shape) for k, v in meta.state_dict().items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write((torch.rand(shape, generator=gen) - 0.5).numpy().tobytes())
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=8192, help="checkpoint size in MiB (fp32), default 8192")
    ap.add_argument("--folder", default=None, help="where to write the file (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = count_for("large", args.size)
    folder = args.folder or tempfile.mkdtemp(prefix="ckptfit-peak-")
    path = os.path.join(folder, "large.safetensors")
    t0 = time.perf_counter()
    # written by a child, so this process stays small
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import bench_peak; "
                    f"bench_peak.write({path!r}, {n})"], check=True)
    size = os.path.getsize(path)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{size / 2**30:.2f} GiB file of {n} blocks written in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    try:
        for recipe in RECIPES:
            res = subprocess.run([sys.executable, os.path.join(HERE, "bench_floors.py"), "--child", recipe, path, path,
                                  "large", str(n)], capture_output=True, text=True,
                                 env=dict(os.environ, CKPTFIT_PROGRESS="0"))
            if res.returncode != 0:
                rows.append(dict(recipe=recipe, error=res.stderr.strip().splitlines()[-1][:300]))
                print(f"{recipe}: failed: {rows[-1]['error']}", flush=True)
                continue
            got = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(dict(recipe=recipe, **got))
            print(f"{recipe}: {got['seconds']:.2f} s, peak over base {got['peak_over_base'] / 2**30:.3f} GiB", flush=True)
    finally:
        if args.folder is None:
            os.remove(path)
            os.rmdir(folder)
    print("\n| recipe | s | peak RSS over base | target |\n|---|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | — | — | failed: {r['error']} |")
            continue
        peak = r["peak_over_base"]
        if r["recipe"] == "build":
            target = f"<= 1.1x the file: {peak / size:.2f}x ({'met' if peak <= 1.1 * size else 'missed'})"
        else:
            target = f"<= model + 128 MiB: {'met' if peak <= 128 << 20 else 'missed'}"
        print(f"| {r['recipe']} | {r['seconds']:.2f} | {peak / 2**30:.3f} GiB | {target} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(size=size, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
