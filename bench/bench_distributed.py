"""Bytes read per rank when loading into an FSDP2-sharded model on 2 and 4 CPU ranks (gloo).

A model of ``--mb`` megabytes (float32 Linear layers) is saved as one safetensors file, one
torch zip file and a DCP directory written by 2 ranks; each is then loaded with
``ckptfit.load`` into a model sharded with ``fully_shard`` (built on meta, then
``to_empty``) on every world size asked. For each rank it prints:

- ``report``: ``LoadReport.bytes_read``, the tensor bytes ckptfit read for this rank;
- ``mapped``: the checkpoint pages this process actually has mapped afterwards (``Rss`` of the
  checkpoint's mappings in ``/proc/self/smaps``: a measurement, page granular, including the
  kernel's fault-around);
- the load time.

Run: ``python bench/bench_distributed.py [--mb 150] [--ranks 2 4]``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

WIDTH = 2048


def make_model(mb: float, device: str | None = None) -> nn.Module:
    layers = max(1, round(mb * 1e6 / (4 * (WIDTH * WIDTH + WIDTH))))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, device=device) for _ in range(layers)])


def _mapped_bytes(prefix: str) -> int:
    """Resident bytes of every mapping of a file under ``prefix`` in this process."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                current = len(head) == 6 and head[5].strip().startswith(prefix)
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def _worker(rank: int, ws: int, port: int, d: str, mb: float, what: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckptfit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,))

    def sharded() -> nn.Module:
        model = make_model(mb, device="meta")
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model.to_empty(device="cpu")

    results = {}
    if what == "save-dcp":
        model = sharded()
        ckptfit.load(model, f"{d}/model.safetensors")
        dcp.save({"model": model.state_dict()}, checkpoint_id=f"{d}/dcp{ws}")
    else:
        for name in ("model.safetensors", "model.pt", "dcp2"):
            model = sharded()
            path = f"{d}/{name}"
            ckpt = ckptfit.open(path)  # kept open so that its mappings can be measured after the load
            dist.barrier()
            t0 = time.perf_counter()
            report = ckptfit.load(model, ckpt)
            seconds = time.perf_counter() - t0
            results[name] = {"report": report.bytes_read, "mapped": _mapped_bytes(path), "seconds": seconds}
            ckpt.close()
            del model, ckpt
        with open(f"{d}/result.{ws}.{rank}.json", "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _launch(ws: int, d: str, mb: float, what: str, timeout: float = 600) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(ws), str(port), d, str(mb), what],
                              env=env) for r in range(ws)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"{what} on {ws} ranks failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=150.0, help="checkpoint size in MB (default 150)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes (default 2 4)")
    args = ap.parse_args()
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        sd = make_model(args.mb).state_dict()
        save_file(sd, f"{d}/model.safetensors")
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, f"{d}/model.pt")
        total = sum(v.numel() * v.element_size() for v in sd.values())
        del sd
        _launch(2, d, args.mb, "save-dcp")
        print(f"checkpoint: {total / 1e6:.1f} MB of tensors, {len(make_model(args.mb, 'meta'))} Linear({WIDTH}, "
              f"{WIDTH}) layers; DCP saved by 2 ranks; torch {torch.__version__}, CPU, gloo")
        print(f"{'format':<18}{'ranks':>6}{'rank':>6}{'report MB':>11}{'mapped MB':>11}{'share':>8}{'s':>7}")
        for ws in args.ranks:
            _launch(ws, d, args.mb, "load")
            for r in range(ws):
                with open(f"{d}/result.{ws}.{r}.json") as f:
                    res = json.load(f)
                for name, v in res.items():
                    print(f"{name:<18}{ws:>6}{r:>6}{v['report'] / 1e6:>11.1f}{v['mapped'] / 1e6:>11.1f}"
                          f"{v['mapped'] / total:>8.3f}{v['seconds']:>7.2f}")
        print("share = mapped / total; ideal 1/world size. 'mapped' is page-cache pages the kernel mapped into the\n"
              "rank, in its own units (up to a 2 MB large folio around each block's edges on this machine's\n"
              "filesystem; a plain mmap reading 8.0 MB maps 10.5 MB here too); 'report' is what ckptfit asked for.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, d, mb, what = sys.argv[2:8]
        _worker(int(r), int(w), int(port), d, float(mb), what)
    else:
        main()
