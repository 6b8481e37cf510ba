"""Run `launcher.runtime.train_loop.train` as N gloo ranks on this machine, without Ray.

Used by the token-weighting and pipeline tests: `train_ranks(recipe_dict, run_dir, world=2)`
starts `python tests/train_spawn.py` once per rank with torchrun-style variables and waits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_ranks(recipe: dict, run_dir: Path, *, world: int, timeout: float = 600, stop: bool = False,
                patch: str | None = None) -> None:
    """Train `recipe` (a dict) with `world` ranks into `run_dir` (resuming from its newest
    checkpoint, if any); raise with the failing rank's log tail. `stop`: a stop request (what the
    driver writes on SIGTERM) is there from the start, so every rank stops after step 1 of this
    leg, saves and returns; without, a leftover request is cleared first (as the driver does).
    `patch`: "module:function" (a module of tests/) that each rank calls before training."""
    from launcher.checkpoint import preempt

    run_dir.mkdir(parents=True, exist_ok=True)
    preempt.clear(run_dir)
    if stop:
        import signal

        preempt.request_stop(run_dir, signal.SIGTERM, 600.0)
    (run_dir / "recipe.json").write_text(json.dumps(recipe))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
               **({"TRAIN_SPAWN_PATCH": patch} if patch else {})}
        log = open(run_dir / f"spawn-rank-{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, str(run_dir)], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    failed = []
    for rank, p in enumerate(procs):
        try:
            if p.wait(timeout) != 0:
                failed.append(rank)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            failed.append(rank)
    if failed:
        tail = (run_dir / f"spawn-rank-{failed[0]}.log").read_text()[-4000:]
        raise RuntimeError(f"ranks {failed} failed; rank {failed[0]}'s log ends:\n{tail}")


def _worker(run_dir: Path) -> None:
    from launcher.recipe import from_dict

    # A test may change the worker before training (an injected fault, a slow export): the
    # named function, "module:function" importable from tests/, is called first.
    patch = os.environ.get("TRAIN_SPAWN_PATCH")
    if patch:
        import importlib

        sys.path.insert(0, str(ROOT / "tests"))
        module, func = patch.split(":")
        getattr(importlib.import_module(module), func)()
    from launcher.runtime.train_loop import train

    recipe = from_dict(json.loads((run_dir / "recipe.json").read_text()))
    train(recipe, run_dir, resume=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
