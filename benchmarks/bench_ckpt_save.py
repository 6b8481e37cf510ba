#!/usr/bin/env python
"""Checkpoint save throughput against the disk's sequential write speed, and the time training is
blocked by a background save against the whole save, measured in the same run.

Two gloo ranks build a ~374M-parameter Llama under ZeRO-3 (fp32, CPU), take one step, then save
(a) with DeepSpeed's plain `save_checkpoint` (torch.save to the files, nothing else), (b) with the
project's commit protocol in the foreground (`Checkpointer.save`: state copied to host memory,
each file hashed (xxh3) as it is written, fsync, manifest, rename, `latest`), and (c) the same in
the background (`background=True`), training steps running until the save is committed: the time
`save` blocks the caller against the time to the commit. The disk figure is a single-stream write
of the same number of bytes with fsync.

    .venv/bin/python benchmarks/bench_ckpt_save.py [--workdir /tmp/bench-save]
Goals: the protocol saves at >= 0.8x the disk's sequential write speed; a background save blocks
training for <= 0.2x of its duration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ckpt_export import RECIPE, spawn_two_ranks  # noqa: E402  (the same 374M model)


def _worker(workdir: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.checkpoint.checkpointer import Checkpointer
    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = from_dict(RECIPE)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tok = build_tokenizer(recipe.tokenizer, None)
    cfg = build_ds_config(recipe, data_parallel=2, on_gpu=False)
    hf = HfDeepSpeedConfig(cfg)  # noqa: F841
    model = build_model(recipe.model, tok, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    ids = torch.randint(0, 262, (1, 8), generator=torch.Generator().manual_seed(rank))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    results: dict = {}
    plain_engine = engine.checkpoint_engine
    for kind in ("plain", "protocol", "background") * 2:  # alternate; keep the best of two
        target = workdir / f"{kind}-run"
        if rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        dist.barrier()
        t0 = time.perf_counter()
        if kind == "plain":
            engine.checkpoint_engine = plain_engine
            engine.save_checkpoint(str(target / "checkpoints"), tag="step-00000001", save_latest=False)
            dist.barrier()
        else:
            ck = Checkpointer(target, rank=rank, world_size=2, meta={"bench": True}, keep_last=1)
            handle = ck.save(engine, 1, {"step": 1, "rank": rank}, background=kind == "background")
            if kind == "background":
                blocked, steps = time.perf_counter() - t0, 0
                while _all_busy(handle):  # training goes on while the save is written
                    out = engine(input_ids=ids, labels=ids)
                    engine.backward(out.loss)
                    engine.step()
                    steps += 1
                ck.wait()
                best = results.get("blocked_s")
                if best is None or blocked < best:
                    results["blocked_s"], results["steps_during_save"] = blocked, steps
        dt = time.perf_counter() - t0
        results[kind] = min(results.get(kind, dt), dt)
    if rank == 0:
        nbytes = sum(p.stat().st_size for p in (workdir / "plain-run").rglob("*") if p.is_file())
        (workdir / "save.json").write_text(json.dumps({**results, "bytes": nbytes}))
    dist.barrier()


def _all_busy(handle) -> bool:
    """Whether the save is still being written on every rank (one answer for all: each step is
    collective)."""
    import torch
    import torch.distributed as dist

    busy = torch.tensor([0.0 if handle.done() else 1.0])
    dist.all_reduce(busy, op=dist.ReduceOp.MIN)
    return bool(busy.item())


def disk_write_speed(path: Path, nbytes: int, chunk: int = 16 << 20) -> float:
    """Bytes/s of one sequential stream of `nbytes`, fsynced (what a save must beat)."""
    buf = os.urandom(chunk)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(buf[: min(chunk, left)])
            left -= chunk
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-save"))
    ap.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        _worker(a._worker)
        return
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    spawn_two_ranks(__file__, a.workdir, "rank")
    res = json.loads((a.workdir / "save.json").read_text())
    disk = max(disk_write_speed(a.workdir / "dd.bin", res["bytes"]) for _ in range(2))
    mb = 1e6
    print(f"checkpoint size: {res['bytes'] / 1e9:.2f} GB (2 ranks, ZeRO-3, 374M params fp32 + Adam)")
    print(f"disk sequential write (fsync):  {disk / mb:8.0f} MB/s")
    for kind in ("plain", "protocol", "background"):
        speed = res["bytes"] / res[kind]
        print(f"{kind:10s} save: {res[kind]:6.2f} s  {speed / mb:8.0f} MB/s  = {speed / disk:5.2f}x disk")
    print(f"background save: training blocked {res['blocked_s']:.2f} s of {res['background']:.2f} s "
          f"= {res['blocked_s'] / res['background']:.2f} ({res['steps_during_save']} steps trained meanwhile)")
    print(json.dumps({**res, "disk_bytes_per_s": disk}))
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
