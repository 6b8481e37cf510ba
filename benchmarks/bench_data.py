#!/usr/bin/env python
"""Prepared data at scale: prepare throughput, a cache hit, and a training job's memory and time
to first step on a large corpus against a small one.

Generates a text corpus of `--size-mb` (paragraphs of random words, blank-line separated), then

1. raw batch-encode throughput of the recipe's tokenizer on the same documents (the `tokenizers`
   Rust batch encoder, all cores: TOKENIZERS_PARALLELISM=true), in tokens/s;
2. `launcher data prepare` throughput on that corpus (datasets read + tokenizing processes on
   every core + packing + writing the token files), in tokens/s;   goal >= 0.8x of (1)
3. a second prepare of the same recipe: a cache hit;                  goal: seconds
4. `launcher run` (tiny-pretrain, 2 CPU workers, a few steps) on that corpus and on a 10 MB one,
   both prepared: peak RSS of the whole job (the launcher and every process under it, Ray
   included, summed, sampled every 0.2 s) and time from start to the first step's metrics line.
                                                                      goals: <= 1.2x, within 10%

    .venv/bin/python benchmarks/bench_data.py [--size-mb 1024] [--workdir /tmp/bench-data] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a story little went to and was happy dog cat sun tree house ran big red blue friend said "
         "under over river mountain quickly slowly because after before garden window light dark found "
         "lost thought remembered morning evening rain snow warm cold bright quiet loud").split()
RECIPE = ROOT / "recipes" / "examples" / "tiny-pretrain.yaml"


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """Paragraphs of 40-400 random words, blank-line separated, about `size_mb` MB."""
    if path.exists() and abs(path.stat().st_size - size_mb * 1e6) < 1e6:
        return path
    rng = random.Random(seed)
    block = []
    for _ in range(2000):  # a pool of paragraphs, recombined: generation must not dominate
        block.append(" ".join(rng.choices(WORDS, k=rng.randint(40, 400))))
    target = int(size_mb * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            para = block[rng.randrange(len(block))] + f" {written}\n\n"
            f.write(para)
            written += len(para)
    return path


def documents(path: Path) -> list[str]:
    return [p for p in path.read_text().split("\n\n") if p.strip()]


def raw_encode(tokenizer, path: Path, batch: int = 10_000) -> dict:
    """The tokenizer's own batch encoder on the corpus' documents (read beforehand, not timed)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    docs = documents(path)
    backend = tokenizer.backend_tokenizer
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(docs), batch):
        tokens += sum(len(e.ids) for e in backend.encode_batch(docs[i : i + batch], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def prepare(corpus: Path, cache: Path) -> dict:
    """`launcher data prepare` in a fresh process (as a user runs it): its --json summary."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "data", "prepare", str(RECIPE), f"data.path={corpus}",
         f"data.cache_dir={cache}", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(out.stdout)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    return summary


def train(corpus: Path, cache: Path, run_dir: Path, steps: int) -> dict:
    """A short `launcher run` on prepared data: the job's peak RSS (summed over every process
    under it) and the time to the first step's metrics line."""
    import psutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "launcher", "run", str(RECIPE), f"data.path={corpus}", f"data.cache_dir={cache}",
           f"train.max_steps={steps}", "train.eval_every=0", "checkpoint.at_end=false", "sample.prompts=[]",
           "--run-dir", str(run_dir)]  # fmt: skip
    start = time.perf_counter()
    log = open(run_dir.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak, first_step = 0, None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        rss = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, rss)
        if first_step is None and metrics.exists() and '"step"' in metrics.read_text():
            if any('"loss"' in line for line in metrics.read_text().splitlines()):
                first_step = time.perf_counter() - start
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"launcher run failed ({proc.returncode}); see {log.name}")
    return {"peak_rss_mb": round(peak / 2**20), "first_step_s": round(first_step or float("nan"), 2),
            "total_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024.0, help="the large corpus (default ~1 GB)")
    ap.add_argument("--small-mb", type=float, default=10.0, help="the small corpus (default 10 MB)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-data"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true", help="only the prepare figures")
    args = ap.parse_args()
    from launcher.data import build_tokenizer
    from launcher.recipe import load_recipe

    args.workdir.mkdir(parents=True, exist_ok=True)
    cache = args.workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    big = make_corpus(args.workdir / f"corpus-{args.size_mb:g}mb.txt", args.size_mb)
    small = make_corpus(args.workdir / f"corpus-{args.small_mb:g}mb.txt", args.small_mb, seed=1)
    tokenizer = build_tokenizer(load_recipe(RECIPE).tokenizer, None)
    results: dict = {"corpus_mb": round(big.stat().st_size / 1e6, 1), "cores": os.cpu_count(),
                     "load_avg": os.getloadavg()}  # fmt: skip
    def report(key: str, value) -> None:  # each figure as soon as it is measured (stderr)
        results[key] = value
        print(f"{key}: {json.dumps(value)}", file=sys.stderr, flush=True)

    report("raw_encode", raw_encode(tokenizer, big))
    first = prepare(big, cache)
    report("prepare", {k: first[k] for k in ("rows", "tokens", "bytes", "seconds", "wall_s")}
           | {"tokens_per_s": round(first["tokens"] / first["seconds"])})
    report("prepare_vs_raw", round(results["prepare"]["tokens_per_s"] / results["raw_encode"]["tokens_per_s"], 3))
    again = prepare(big, cache)
    report("cache_hit", {"hit": all(s["cache_hit"] for s in again["sources"]), "seconds": again["seconds"],
                         "wall_s": again["wall_s"]})  # fmt: skip
    if not args.skip_train:
        prepare(small, cache)
        for name, corpus in (("train_large", big), ("train_small", small)):
            for attempt in range(2):  # a Ray start that times out on a busy machine: once more
                try:
                    report(name, train(corpus, cache, args.workdir / name, args.steps))
                    break
                except RuntimeError as e:
                    print(f"{name}: {e}", file=sys.stderr)
            else:
                raise SystemExit(f"{name} failed twice")
        lg, sm = results["train_large"], results["train_small"]
        results["rss_ratio"] = round(lg["peak_rss_mb"] / sm["peak_rss_mb"], 3)
        results["first_step_ratio"] = round(lg["first_step_s"] / sm["first_step_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
