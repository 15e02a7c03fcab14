"""Long mutation-fuzzing run over every reader (not part of the test suite).

    python bench/fuzz.py                 # 500 examples per format and test
    python bench/fuzz.py --examples 5000 -k torch-zip
    python bench/fuzz.py --entrypoints --examples 20000   # generated hostile inputs, every entry point

It runs tests/test_fuzz.py with more examples and a random (not derandomized) seed each
time; a failure prints the minimal mutation that made a reader raise something other than a
ckptfit error, crash or hang.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--deadline-ms", type=int, default=20_000)
    ap.add_argument("-k", default=None, help="pytest -k expression, e.g. 'legacy or dcp'")
    ap.add_argument("--entrypoints", action="store_true",
                    help="generated hostile pickles and folder metadata on every entry point (in a child process "
                         "under a memory cap and a per-example deadline) instead of the reader mutations")
    ap.add_argument("--seed", type=int, default=None, help="with --entrypoints: hypothesis seed (default: random)")
    args = ap.parse_args()
    if args.entrypoints:
        import time

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from _fuzz_entrypoints import run_child

        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        start = time.perf_counter()
        ran, failure = run_child(args.examples, seed=seed, deadline_s=max(1, args.deadline_ms // 1000))
        print(f"seed {seed}: {ran} examples in {time.perf_counter() - start:.0f} s; "
              + ("no failure" if not failure else "FAILURE:\n" + failure))
        sys.exit(1 if failure else 0)
    os.environ["CKPTFIT_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["CKPTFIT_FUZZ_DEADLINE_MS"] = str(args.deadline_ms)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [os.path.join(here, "..", "tests", "test_fuzz.py"), "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "--hypothesis-seed", str(int.from_bytes(os.urandom(4), "little")),
            "--hypothesis-show-statistics"]
    if args.k:
        argv += ["-k", args.k]
    sys.exit(pytest.main(argv))
