"""Launcher overhead: the same tiny ZeRO-3 training through `launcher run` and plain torchrun.

Prints, for each: time to first step (process start to the first optimizer step done) and the
steady-state step rate (steps after the first `--warmup` ones). Goal: launcher >= 0.97x plain.

    python benchmarks/bench_overhead.py [--steps 120] [--warmup 20] [--repeats 2] [--recipe recipes/examples/tiny-sft.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps per second between the end of step `warmup` and the last step."""
    t = times[warmup - 1 :]
    return (len(t) - 1) / (t[-1] - t[0])


def run_launcher(recipe: str, steps: int, work: Path) -> tuple[float, list[float]]:
    run_dir = work / "launcher-run"
    start = time.time()
    subprocess.run(
        [str(BIN / "launcher"), "run", recipe, f"train.max_steps={steps}", "data.eval_fraction=0",
         "sample.from_eval=0", "logging.tensorboard=false", "--run-dir", str(run_dir), "--json"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [x for x in lines if "loss" in x and not x.get("eval")]
    return steps_[0]["time"] - start, [s["time"] for s in steps_]


def run_plain(recipe: str, steps: int, work: Path, workers: int) -> tuple[float, list[float]]:
    out = work / "plain.jsonl"
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={workers}",
         str(ROOT / "benchmarks" / "plain_deepspeed.py"), recipe, "--steps", str(steps), "--out", str(out)],
        check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    return rows[0]["time"] - start, [r["time"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/examples/tiny-sft.yaml")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate the two this many times and compare each one's fastest run "
                         "(another process's burst of CPU slows one run, not every run)")
    args = ap.parse_args()
    plain, launcher = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            first, t = run_plain(args.recipe, args.steps, work, args.workers)
            plain.append((first, steady_rate(t, args.warmup)))
            first, t = run_launcher(args.recipe, args.steps, work)
            launcher.append((first, steady_rate(t, args.warmup)))
    (plain_first, plain_rate), (l_first, l_rate) = max(plain, key=lambda r: r[1]), max(launcher, key=lambda r: r[1])
    result = {
        "steps": args.steps,
        "repeats": args.repeats,
        "plain_torchrun": {"first_step_s": round(plain_first, 2), "steps_per_s": round(plain_rate, 3),
                           "all_steps_per_s": [round(r, 3) for _, r in plain]},
        "launcher_run": {"first_step_s": round(l_first, 2), "steps_per_s": round(l_rate, 3),
                         "all_steps_per_s": [round(r, 3) for _, r in launcher]},
        "ratio": round(l_rate / plain_rate, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"steady-state step rate: launcher {l_rate:.3f}/s vs plain {plain_rate:.3f}/s "
          f"= {l_rate / plain_rate:.3f}x (goal >= 0.97x)")
    print(f"time to first step: launcher {l_first:.1f}s vs plain {plain_first:.1f}s")


if __name__ == "__main__":
    main()
