"""Pipeline parallelism (2 stages) against ZeRO-3 on the same 2 CPU workers, for a model of more
than 100M parameters: steady step rate and peak resident memory of each worker.

Both train the same model (a Llama: hidden 768, 12 layers, vocabulary 32000: 134M parameters,
fp32) on the same global batch (8 sequences of up to 64 tokens per step) through
`launcher.runtime.train_loop.train`, as two gloo ranks started here (no Ray):

- pipeline: `pipeline_stages: 2`, ZeRO-0, 8 micro-batches of 1 per step (1 replica);
- ZeRO-3: 2 data-parallel workers, 4 micro-batches of 1 each per step.

    python benchmarks/bench_pipeline.py [--steps 6] [--warmup 2] [--workdir /tmp/bench-pipeline]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_ckpt_export import spawn_two_ranks  # noqa: E402  (the benchmarks' two-rank launcher)

MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
         "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 256,
         "vocab_size": 32000, "tie_word_embeddings": False}


def recipe(layout: str, steps: int) -> dict:
    pipeline = layout == "pipeline"
    return {
        "name": f"bench-{layout}",
        "model": {"config": MODEL, "dtype": "fp32"},
        "tokenizer": {"builtin": "bytes"},
        "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 2000}, "max_seq_len": 64},
        "train": {"max_steps": steps, "micro_batch_size": 1, "grad_accum": 8 if pipeline else 4, "lr": 1e-4,
                  "schedule": "constant"},
        "parallelism": {"zero_stage": 0 if pipeline else 3, "pipeline_stages": 2 if pipeline else 1},
        "resources": {"cpu_workers": 2},
        "logging": {"tensorboard": False},
    }


def run_two_ranks(run_dir: Path, rec: dict) -> list[int]:
    """Train `rec` as two gloo ranks; their peak RSS in bytes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(rec))
    return spawn_two_ranks(__file__, run_dir, "rank-")


def measure(layout: str, work: Path, steps: int, warmup: int) -> dict:
    run_dir = work / layout
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    rss = run_two_ranks(run_dir, recipe(layout, steps))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    params = next(r["params"] for r in rows if r.get("event") == "start")
    times = [r["time"] for r in rows if "loss" in r and not r.get("eval")]
    t = times[warmup - 1 :]
    return {"layout": layout, "params": params, "steps_per_s": (len(t) - 1) / (t[-1] - t[0]),
            "rss_gib": [x / 2**30 for x in rss], "wall_s": time.time() - start,
            "tokens_per_step": next(r["step_tokens"] for r in rows if "loss" in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-pipeline"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="Steps not timed (the first is the slowest).")
    ap.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        from launcher.recipe import from_dict
        from launcher.runtime.train_loop import train

        train(from_dict(json.loads((args._worker / "recipe.json").read_text())), args._worker, resume=False)
        return
    results = [measure(layout, args.workdir, args.steps, args.warmup) for layout in ("pipeline", "zero3")]
    print(f"model: {results[0]['params'] / 1e6:.0f}M parameters, fp32; 2 CPU workers, 1 thread each; "
          f"{args.steps - args.warmup} timed steps of 8 sequences")
    print(f"{'layout':<10} {'steps/s':>8} {'s/step':>8} {'peak RSS rank 0':>16} {'peak RSS rank 1':>16} {'wall s':>7}")
    for r in results:
        print(f"{r['layout']:<10} {r['steps_per_s']:>8.3f} {1 / r['steps_per_s']:>8.2f} "
              f"{r['rss_gib'][0]:>14.2f}Gi {r['rss_gib'][1]:>14.2f}Gi {r['wall_s']:>7.0f}")


if __name__ == "__main__":
    main()
