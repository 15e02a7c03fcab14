"""Loading straight to the GPU: ckptfit.build / ckptfit.load with device="cuda" against hand recipes.

Needs a CUDA machine (exits with a message otherwise). Writes a ~SIZE MB checkpoint of
blocks of Linear(2048, 4096)/Linear(4096, 2048) as torch zip and safetensors, fp32 and fp16,
and times, each in a fresh process with a warm page cache, until the model is on the GPU
(``torch.cuda.synchronize()`` included):

- ``hand``: meta model, ``torch.load(mmap=True)`` (safetensors: ``load_file(device="cuda")``),
  cast to fp32, ``load_state_dict(assign=True)``, ``.to("cuda")``;
- ``build``: ``ckptfit.build(make, path, device="cuda")`` (pinned staging buffers, copies on a
  side stream overlapping the reads);
- ``load``: ``ckptfit.load(model_on_gpu, path)`` (the call alone).

It also checks that every weight arrived exactly (a checksum against the file).

Usage::

    python bench/bench_cuda.py                 # 1 GB
    python bench/bench_cuda.py --size 4096 --repeat 3
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
BLOCK_BYTES = (2 * 2048 * 4096 + 4096 + 2048) * 4


def make_model(n: int) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(2048, 4096), nn.Linear(4096, 2048)) for _ in range(n)])


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum().item() for p in model.parameters()))


def child(recipe: str, path: str, n: int) -> dict:
    import ckptfit

    import psutil

    torch.cuda.init()
    torch.empty(1, device="cuda").sum()
    existing = None
    if recipe == "load":
        with torch.device("cuda"):
            existing = make_model(n)
        torch.cuda.synchronize()
    base = psutil.Process().memory_info().rss
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if recipe == "hand":
        with torch.device("meta"):
            model = make_model(n)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cuda")
        else:
            sd = torch.load(path, mmap=True, weights_only=True)
        sd = {k: v.to(device="cuda", dtype=torch.float32) for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)
        del sd
    elif recipe == "build":
        model, _ = ckptfit.build(lambda: make_model(n), path, device="cuda")
    else:
        model = existing
        ckptfit.load(model, path)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())
    return dict(seconds=seconds, rss_over_base=_peak_rss() - base, gpu_peak=torch.cuda.max_memory_allocated(),
                checksum=_checksum(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1024, help="checkpoint size in MB (fp32)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        recipe, path, n = args.child
        print(json.dumps(child(recipe, path, int(n))))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from safetensors.torch import save_file

    n = max(1, round(args.size * 2**20 / BLOCK_BYTES))
    folder = tempfile.mkdtemp(prefix="ckptfit-cuda-")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {n} blocks", flush=True)
    rows = []
    try:
        with torch.device("meta"):
            meta = make_model(n)
        gen = torch.Generator().manual_seed(0)
        sd32 = {k: torch.rand(v.shape, generator=gen) - 0.5 for k, v in meta.state_dict().items()}
        for dname, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            sd = sd32 if dtype == torch.float32 else {k: v.to(dtype) for k, v in sd32.items()}
            expect = float(sum(v.double().sum().item() for v in sd.values()))
            for fmt, ext in (("zip", "pt"), ("safetensors", "safetensors")):
                path = os.path.join(folder, f"m-{dname}.{ext}")
                torch.save(sd, path) if fmt == "zip" else save_file(sd, path)
                for recipe in ("hand", "build", "load"):
                    best = None
                    for _ in range(args.repeat):
                        with open(path, "rb", buffering=0) as f:
                            while f.read(16 << 20):
                                pass
                        res = subprocess.run([sys.executable, HERE, "--child", recipe, path, str(n)],
                                             capture_output=True, text=True, env=dict(os.environ, CKPTFIT_PROGRESS="0"))
                        if res.returncode:
                            raise SystemExit(f"{recipe} {path}:\n{res.stderr[-3000:]}")
                        r = json.loads(res.stdout.strip().splitlines()[-1])
                        if best is None or r["seconds"] < best["seconds"]:
                            best = r
                    exact = abs(best["checksum"] - expect) <= 1e-6 * max(1.0, abs(expect))
                    rows.append(dict(best, file=f"{dname} {fmt}", recipe=recipe, bytes=os.path.getsize(path), exact=exact))
                    print(f"  {dname} {fmt:11s} {recipe:6s} {best['seconds']:.3f}s "
                          f"{os.path.getsize(path) / best['seconds'] / 1e9:.2f} GB/s  host RSS +"
                          f"{best['rss_over_base'] / 2**30:.2f} GiB  GPU peak {best['gpu_peak'] / 2**30:.2f} GiB  "
                          f"exact={exact}", flush=True)
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| file | recipe | time s | vs hand | file GB/s | host RSS over base | GPU peak | exact |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    hand = {r["file"]: r["seconds"] for r in rows if r["recipe"] == "hand"}
    for r in rows:
        print(f"| {r['file']} | {r['recipe']} | {r['seconds']:.3f} | {r['seconds'] / hand[r['file']]:.2f}x | "
              f"{r['bytes'] / r['seconds'] / 1e9:.2f} | {r['rss_over_base'] / 2**30:.2f} GiB | "
              f"{r['gpu_peak'] / 2**30:.2f} GiB | {r['exact']} |")


if __name__ == "__main__":
    main()
