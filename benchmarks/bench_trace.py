"""`launcher estimate --trace` against the analytic estimate, and how long a trace takes.

    .venv/bin/python benchmarks/bench_trace.py              # the acceptance table (about 30-60 min)
    .venv/bin/python benchmarks/bench_trace.py --quick      # 1B, micro-batch 1, 2048 tokens
    .venv/bin/python benchmarks/bench_trace.py --time-8b    # seconds for one 8B trace
    .venv/bin/python benchmarks/bench_trace.py --cache traced.json   # keep traces; rerun compares only

Cells (the runtime's default chunked loss, 1024 tokens): Llama-3.2-1B and Llama-3.1-8B x micro-batch {1, 2} x sequence {2048, 4096} x activation
checkpointing {none, selective, full} x attention {sdpa, eager} x (ZeRO-0 on 1 GPU, ZeRO-3 on 8).
One trace per cell serves both layouts (the peak is taken per layout from the traced timeline).
Compared: what both see (weights, gradients, optimizer states, activations); buffers and the CUDA
context are the analytic figures on both sides, so the full totals are printed too. Goal: within
+-5%. Markdown on stdout (docs/estimate.md keeps a copy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.estimate import memory  # noqa: E402
from launcher.estimate.catalog import CATALOG  # noqa: E402
from launcher.estimate.layout import Layout  # noqa: E402
from launcher.estimate.params import model_shape  # noqa: E402
from launcher.estimate.trace import per_gpu, trace_step  # noqa: E402

GiB = 1024**3
MODELS = {"1B": "meta-llama/Llama-3.2-1B", "8B": "meta-llama/Llama-3.1-8B"}
LAYOUTS = {"ZeRO-0 x1": (0, 1), "ZeRO-3 x8": (3, 8)}
SEEN = ("params", "grads", "optimizer", "activations")


def layout(mb: int, seq: int, ckpt: str, attn: str, zero: int, gpus: int) -> Layout:
    return Layout(nodes=1, gpus_per_node=gpus, pipeline_stages=1, zero_stage=zero, offload_optimizer="none",
                  offload_param="none", dtype="bf16", micro_batch=mb, grad_accum=1, seq_len=seq, ckpt=ckpt,
                  attn=attn, chunked_loss=True, chunk_tokens=1024)


def ds_config(zero: int) -> dict:
    z = {"stage": zero}
    if zero == 3:
        z.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5)
    return {"zero_optimization": z}


def cells(quick: bool):
    models = ["1B"] if quick else list(MODELS)
    mbs, seqs = ([1], [2048]) if quick else ([1, 2], [2048, 4096])
    return itertools.product(models, mbs, seqs, ("none", "selective", "full"), ("sdpa", "eager"))


def traced_cell(name: str, mb: int, seq: int, ckpt: str, attn: str) -> dict:
    """One trace, its peak in both layouts: {layout: {seen, total, phase, seconds}}."""
    cfg = CATALOG[MODELS[name]]
    shape = model_shape(cfg)
    tr = trace_step(cfg, layout(mb, seq, ckpt, attn, 0, 1))
    out = {}
    for lname, (zero, gpus) in LAYOUTS.items():
        lay = layout(mb, seq, ckpt, attn, zero, gpus)
        t, phase = per_gpu(tr, lay, memory.estimate_memory(shape, lay, ds_config(zero)).per_gpu)
        out[lname] = {"seen": sum(t[k] for k in SEEN), "total": t["total"], "phase": phase,
                      "seconds": round(tr.seconds, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-8b", action="store_true")
    ap.add_argument("--cache", type=Path, help="JSON file keeping traced cells (reruns trace only what is missing)")
    ap.add_argument("--models", default=",".join(MODELS), help="e.g. 1B or 1B,8B")
    ap.add_argument("--cached-only", action="store_true", help="print the cells in --cache, trace nothing")
    args = ap.parse_args()
    if args.time_8b:
        t0 = time.perf_counter()
        tr = trace_step(CATALOG[MODELS["8B"]], layout(1, 4096, "none", "sdpa", 3, 8))
        print(f"8B trace (micro-batch 1 x 4096, sdpa): {tr.seconds:.1f} s in the trace, "
              f"{time.perf_counter() - t0:.1f} s with imports")
        return
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    print("| model | mb | seq | ckpt | attn | layout | analytic GiB | traced GiB | diff | total a/t GiB "
          "| phase a/t | trace s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for name, mb, seq, ckpt, attn in cells(args.quick):
        if name not in args.models.split(","):
            continue
        key = f"{name} {mb} {seq} {ckpt} {attn}"
        if key not in cache and args.cached_only:
            continue
        if key not in cache:
            cache[key] = traced_cell(name, mb, seq, ckpt, attn)
            if args.cache:
                args.cache.write_text(json.dumps(cache, indent=1))
        shape = model_shape(CATALOG[MODELS[name]])
        for lname, (zero, gpus) in LAYOUTS.items():
            est = memory.estimate_memory(shape, layout(mb, seq, ckpt, attn, zero, gpus), ds_config(zero))
            a, t = est.per_gpu, cache[key][lname]
            sa, st = sum(a[k] for k in SEEN), t["seen"]
            diff = (sa - st) / st
            worst = max(worst, abs(diff))
            print(f"| {name} | {mb} | {seq} | {ckpt} | {attn} | {lname} | {sa / GiB:.2f} | {st / GiB:.2f} "
                  f"| {diff:+.1%} | {a['total'] / GiB:.1f} / {t['total'] / GiB:.1f} | {est.peak_phase} / "
                  f"{t['phase']} | {t['seconds']:.0f} |", flush=True)
    print(f"\nlargest difference: {worst:.1%}")


if __name__ == "__main__":
    main()
