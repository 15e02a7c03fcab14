"""Follow every refusal's advice on the shared corpus, literally, and say where it leads.

Not a timing: a check of the promise "advice that works" on real files. For each corpus
scenario (../shared/corpus, read in place, never copied) ckptfit.load runs with the options the
scenario names and with none (the user who did not know them). Every refusal's suggestions are
read back as Python keyword arguments (tests/_advice_follow.py: the same reader the test-suite
uses), applied on top of what was passed, and run again on a fresh target, to the end of the chain:

- a load must hold, for every tensor the report says it loaded, the file's tensor it names
  (read with torch.load, or with ckptfit's own reader for folders), and leave at init only what
  the advice allowed (``partial=True``, ``exclude=``) or harmless buffers;
- a refusal must differ from the one before.

    python bench/advice_corpus.py [--corpus ../shared/corpus] [--only NAME,NAME]

Prints one line per refusal followed and a summary; exit status 1 if any advice led to the same
refusal or to a wrong or unintended load.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import ckptfit  # noqa: E402
from _advice_follow import check_load, flat_tensors, merged, python_alternatives  # noqa: E402

MAX_DEPTH = 4


def _file_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return flat_tensors(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - folders, safetensors, files with other globals: ckptfit's reader
        out: dict[str, torch.Tensor] = {}
        with ckptfit.open(path) as ckpt:
            for cand in ckpt.state_dicts():
                for k, t in cand.tensors.items():
                    out[f"{cand.name}.{k}" if cand.name else k] = t.load()
        return out


class Tally:
    def __init__(self) -> None:
        self.refusals = self.followed = self.loads = self.more_specific = 0
        self.failures: list[str] = []


def _follow(scenario, path: str, options: dict, flat: dict, depth: int, seen: set, trail: list[str],
            tally: Tally) -> None:
    model = scenario.target()
    try:
        report = ckptfit.load(model, path, **options)
    except ckptfit.LoadError as e:
        key = (tuple(e.problems), tuple(e.plan.suggestions) if e.plan is not None else ())
        if key in seen:
            tally.failures.append(f"{' -> '.join(trail)}: the same refusal again")
            return
        if depth:
            tally.more_specific += 1
        tally.refusals += 1
        if not e.hint:
            tally.failures.append(f"{' -> '.join(trail)}: a refusal without a hint")
        alternatives = [alt for s in (e.plan.suggestions if e.plan is not None else ()) for alt in python_alternatives(s)]
        print(f"  {' -> '.join(trail)}: refused ({len(e.problems)} problems); {len(alternatives)} alternatives: "
              + ", ".join(repr(a) for a in alternatives)[:300])
        if depth >= MAX_DEPTH:
            return
        for alt in alternatives:
            tally.followed += 1
            _follow(scenario, path, merged(options, alt), flat, depth + 1, seen | {key}, [*trail, repr(alt)], tally)
        return
    except ckptfit.CheckpointError as e:
        if depth:
            tally.failures.append(f"{' -> '.join(trail)}: advice led to {type(e).__name__}: {e.summary}")
        return
    if not depth:
        return  # loaded without advice: nothing to follow
    got = model.state_dict()
    wrong = check_load([(d.target, d.source, d.transform is not None) for d in report.loaded], got, flat,
                       report.container)
    asked = {"harmless"} | ({"user"} if options.get("exclude") else set())
    if not options.get("partial") and (report.skipped_shape or any(d.stage not in asked for d in report.left_at_init)):
        wrong.append("left at init what the advice did not ask for")
    if wrong:
        tally.failures.append(f"{' -> '.join(trail)}: " + "; ".join(wrong[:3]))
        return
    tally.loads += 1
    print(f"  {' -> '.join(trail)}: loaded {report.num_loaded}/{report.num_targets}, checked against the file")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    sys.path.insert(0, args.corpus)
    os.environ.setdefault("CKPT_CANARY", os.path.join(tempfile.mkdtemp(), "canary"))
    from scenarios_public import SCENARIOS

    only = {s for s in args.only.split(",") if s}
    tally = Tally()
    for scenario in SCENARIOS:
        if only and scenario.name not in only:
            continue
        with tempfile.TemporaryDirectory() as d:
            try:
                path, _expected = scenario.make(d)
            except Exception as e:  # noqa: BLE001 - a scenario this machine cannot write (no CUDA ...)
                print(f"{scenario.name}: skipped ({type(e).__name__}: {e})")
                continue
            print(f"{scenario.name}:")
            try:
                flat = _file_tensors(path)
            except Exception:  # noqa: BLE001 - files that must be refused (truncated, not a checkpoint)
                flat = {}
            for options in ([scenario.options, {}] if scenario.options else [{}]):
                _follow(scenario, path, dict(options), flat, 0, set(), [f"options={options!r}"], tally)
    print(f"\n{tally.refusals} refusals, {tally.followed} suggestions followed: {tally.loads} correct loads, "
          f"{tally.more_specific} more specific refusals, {len(tally.failures)} failures")
    for f in tally.failures:
        print(f"FAIL {f}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
