"""What checking every byte costs: CRC-32 fused with the copy, per GiB, ISA-L against zlib.

Reads a SIZE MB file (warm page cache) into one preallocated buffer with ``pread`` in pieces of
``ckptfit.lazy.CRC_CHUNK`` bytes, as ``ckptfit.load`` does, once without a checksum and once
hashing each piece right after reading it (ISA-L's ``crc32``, then zlib's); also the CRC alone
over memory. Prints seconds per GiB, best of ``--repeat``.

Usage::

    python bench/bench_crc.py --size 1024 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1024, help="file size in MB (default 1024)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from ckptfit._crc import CRC_IMPL, crc32
    from ckptfit.lazy import CRC_CHUNK

    n = int(args.size * 2**20)
    gib = n / 2**30
    with tempfile.NamedTemporaryFile(prefix="ckptfit-crc-", delete=False) as f:
        for _ in range(0, n, 64 << 20):
            f.write(os.urandom(min(64 << 20, n - f.tell())))
        path = f.name
    buf = bytearray(n)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)

    def read(fn=None) -> None:
        crc = 0
        for start in range(0, n, CRC_CHUNK):
            piece = view[start:start + CRC_CHUNK]
            os.preadv(fd, [piece], start)
            if fn is not None:
                crc = fn(piece, crc)

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) / gib

    try:
        read()  # warm the page cache and the buffer
        plain = best(read)
        fast = best(lambda: read(crc32))
        slow = best(lambda: read(zlib.crc32))
        alone = best(lambda: crc32(view))
        alone_zlib = best(lambda: zlib.crc32(view))
    finally:
        os.close(fd)
        os.remove(path)
    print(f"{args.size:.0f} MB, pieces of {CRC_CHUNK >> 20} MiB, crc32 from {CRC_IMPL}; seconds per GiB, best of "
          f"{args.repeat}:")
    print(f"  pread, no check          {plain:.3f}")
    print(f"  pread + CRC-32 (isal)    {fast:.3f}   (+{fast - plain:.3f} s/GiB, {fast / plain:.2f}x)")
    print(f"  pread + CRC-32 (zlib)    {slow:.3f}   (+{slow - plain:.3f} s/GiB, {slow / plain:.2f}x)")
    print(f"  CRC-32 alone, isal/zlib  {alone:.3f} / {alone_zlib:.3f}")


if __name__ == "__main__":
    main()
