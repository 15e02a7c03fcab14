"""Long mutation-fuzzing run over every reader (not part of the test suite).

    python bench/fuzz.py                 # 500 examples per format and test
    python bench/fuzz.py --examples 5000 -k torch-zip

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
    args = ap.parse_args()
    os.environ["CKPTFIT_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["CKPTFIT_FUZZ_DEADLINE_MS"] = str(args.deadline_ms)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [os.path.join(here, "..", "tests", "test_fuzz.py"), "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "--hypothesis-seed", str(int.from_bytes(os.urandom(4), "little")),
            "--hypothesis-show-statistics"]
    if args.k:
        argv += ["-k", args.k]
    sys.exit(pytest.main(argv))
