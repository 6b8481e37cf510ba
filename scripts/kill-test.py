#!/usr/bin/env python
"""Kill test: SIGKILL a 2-worker ZeRO-3 CPU run at random moments (a third of the trials at any
moment, a third in the middle of a save, a third while a background save is being written and
training has already gone on), resume it, and check that every resume starts from the newest
committed checkpoint and that the per-step losses equal those of an uninterrupted run. Each
trial says where its kill landed (`in save`: a `.tmp` directory existed; `in background save`: and
a step after it had been logged).

    .venv/bin/python scripts/kill-test.py --trials 20 [--seed 0] [--workdir /tmp/kill-test]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckpt_harness import (  # noqa: E402
    background_save,
    interrupt,
    losses,
    run,
    saving_now,
    step_records,
    write_recipe,
)

from launcher.checkpoint.layout import list_step_dirs  # noqa: E402


def _where(run_dir: Path) -> str:
    if background_save(run_dir) is not None:
        return "in background save"
    return "in save" if saving_now(run_dir) else "anywhere"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kill-test"))
    ap.add_argument("--modes", default="kill,kill-in-save,kill-in-background-save",
                    help="Kill modes, taken in turn (comma-separated).")
    a = ap.parse_args()
    # a tiny model's save takes milliseconds: hold each background save open for a moment so that
    # kills can land in it (the files are written, nothing is committed yet)
    os.environ.setdefault("LAUNCHER_CKPT_TEST_WRITE_DELAY_S", "0.5")
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    recipe = write_recipe(a.workdir / "recipe.yaml")
    base = a.workdir / "base"
    assert run(["run", str(recipe), "--run-dir", str(base)], a.workdir / "base.log") == 0
    want = losses(base)
    rng = random.Random(a.seed)
    failures = 0
    landed = {"anywhere": 0, "in save": 0, "in background save": 0}
    for i in range(a.trials):
        run_dir, log = a.workdir / f"trial-{i}", a.workdir / f"trial-{i}.log"
        modes = a.modes.split(",")
        how = modes[i % len(modes)]
        after = rng.randint(1, 28)
        t0 = time.time()
        seen: list[str] = []
        interrupt(["run", str(recipe), "--run-dir", str(run_dir)], run_dir, log, after_step=after, how=how,
                  before_kill=lambda: seen.append(_where(run_dir)))
        where = seen[0] if seen else "anywhere"
        landed[where] += 1
        dirs = list_step_dirs(run_dir)
        newest = max((s.step for s in dirs if s.committed), default=0)
        partial = [s.path.name for s in dirs if not s.committed]
        rc = run(["run", str(recipe), "--run-dir", str(run_dir)], log)
        resumes = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
        resumed_from = resumes[0] if resumes else 0
        ok = rc == 0 and resumed_from == newest and losses(run_dir) == want and len(step_records(run_dir)) == len(want)
        failures += not ok
        print(f"trial {i:2d}: {how:23s} after step {after:2d}  landed {where:18s}  partial={partial or '-'}  newest commit={newest:2d}  "
              f"resumed from={resumed_from:2d}  losses equal={losses(run_dir) == want}  "
              f"{'OK' if ok else 'FAIL'}  ({time.time() - t0:.0f}s)", flush=True)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{a.trials - failures}/{a.trials} trials passed; kills landed: " +
          ", ".join(f"{k} {v}" for k, v in landed.items()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
