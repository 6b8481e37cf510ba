"""Background saves with a real DeepSpeed engine (one gloo rank, ZeRO-2, a tiny Llama): `save`
returns once the state is in host memory, training may change the weights meanwhile, and the
committed checkpoint holds the weights of the step it was taken at, with checksums computed while
writing that a full verify confirms; the next save waits for the one in flight."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(run_dir: Path) -> None:
    import deepspeed
    import torch

    from conftest import tiny_recipe_dict
    from launcher.checkpoint.checkpointer import Checkpointer
    from launcher.data import build_tokenizer
    from launcher.recipe import from_dict
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = from_dict(tiny_recipe_dict(parallelism={"zero_stage": 2}))
    deepspeed.init_distributed(dist_backend="gloo")
    tok = build_tokenizer(recipe.tokenizer, None)
    model = build_model(recipe.model, tok, seed=0)
    cfg = build_ds_config(recipe, data_parallel=1, on_gpu=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    ids = torch.arange(32).reshape(2, 16) % 250

    def step() -> None:
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()

    step()
    ck = Checkpointer(run_dir, rank=0, world_size=1, meta={"test": True}, keep_last=2)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    handle = ck.save(engine, 1, {"step": 1, "rank": 0}, background=True)
    step()  # training goes on: the weights change while the save is written
    changed = any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    second = ck.save(engine, 2, {"step": 2, "rank": 0}, background=True)  # waits for the first
    first_done = handle.done()
    ck.wait()
    json.dump({"changed": changed, "first_done_before_second": first_done, "committed": str(handle.wait()),
               "second": str(second.wait()), "blocked_s": handle.blocked_s, "total_s": handle.total_s},
              open(run_dir / "result.json", "w"))
    torch.save(before, run_dir / "before.pt")


def _run(run_dir: Path) -> dict:
    run_dir.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run([sys.executable, __file__, str(run_dir)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
def test_a_background_save_commits_the_state_it_was_taken_at(tmp_path):
    import torch

    from launcher.checkpoint.layout import latest_committed, list_step_dirs
    from launcher.checkpoint.manifest import read_manifest, verify
    from launcher.checkpoint.zero_reader import iter_full_params

    run_dir = tmp_path / "run"
    res = _run(run_dir)
    assert res["changed"] and res["first_done_before_second"]
    assert res["committed"].endswith("step-00000001") and res["second"].endswith("step-00000002")
    assert [s.step for s in list_step_dirs(run_dir) if s.committed] == [1, 2]
    assert latest_committed(run_dir).step == 2
    step1 = run_dir / "checkpoints" / "step-00000001"
    files = read_manifest(step1)["files"]
    assert files and all("xxh3_128" in f for f in files.values())
    assert verify(step1, checksums=True) == []
    before = torch.load(run_dir / "before.pt", weights_only=True)
    saved = dict(iter_full_params(step1))
    assert saved and all(torch.equal(saved[n], before[n].float()) for n in saved)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
