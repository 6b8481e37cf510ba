"""Estimated ZeRO-3 partitions against what a real DeepSpeed engine holds per rank.

Three processes (gloo, CPU) build the tiny model the way the runtime does (inside zero.Init via
HfDeepSpeedConfig, the project's param groups and DeepSpeed config), take one optimizer step,
and count on each rank: the parameter partitions (`ds_tensor`), the fp32 master partition and the
Adam moments of the optimizer, and the gradient partition.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from conftest import tiny_recipe_dict
from launcher.recipe import from_dict

pytestmark = pytest.mark.slow

# Three ranks and sizes not divisible by 3, so that ZeRO's per-parameter padding
# (ceil(numel / ranks)) matters.
WORLD = 3
CONFIG = {"model_type": "llama", "hidden_size": 40, "intermediate_size": 75, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": False}


def _recipe():
    d = tiny_recipe_dict(name="parts")
    d["model"]["config"] = dict(CONFIG)
    d["train"] = {"max_steps": 1, "micro_batch_size": 2, "lr": 1e-3, "weight_decay": 0.1}
    d["resources"] = {"cpu_workers": WORLD}
    d["parallelism"] = {"zero_stage": 3}
    return from_dict(d)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.data import build_tokenizer
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = _recipe()
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = build_ds_config(recipe, data_parallel=world, on_gpu=False)
    hf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (keeps zero.Init on while building)
    tok = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path)
    model = build_model(recipe.model, tok, seed=0)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                             config=ds_config)
    ids = torch.randint(0, 200, (2, 16))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grad_elems = sum(t.numel() for t in opt.averaged_gradients.values() for t in t) if getattr(
        opt, "averaged_gradients", None) else None
    engine.step()
    params = list(engine.module.parameters())
    fp32 = opt.fp32_partitioned_groups_flat
    inner = opt.optimizer
    adam = sum(inner.state[p][k].numel() for p in fp32 for k in ("exp_avg", "exp_avg_sq"))
    counts = {
        "params_full": sum(p.ds_numel for p in params),
        "params": sum(p.ds_tensor.numel() for p in params),
        "optimizer_fp32": sum(t.numel() for t in fp32),
        "adam_states": adam,
        "grads": grad_elems,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(counts, f)


def test_zero3_partitions_match_a_real_engine(tmp_path):
    from launcher.estimate import estimate_recipe
    from launcher.estimate.catalog import resolve_config
    from launcher.estimate.params import count_on_meta

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(WORLD, port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    est = estimate_recipe(_recipe())
    parts = est.to_json()["partition_elements_per_rank"]
    assert est.to_json()["params_total"] == ranks[0]["params_full"]
    for counts in ranks:
        assert counts["params"] == parts["params"]
        assert counts["optimizer_fp32"] == parts["optimizer_fp32"]
        assert counts["adam_states"] == parts["adam_states"]
        if counts["grads"] is not None:
            assert counts["grads"] == parts["grads"]
    # independently of the estimator's code: every parameter split into WORLD padded parts
    _, cfg = resolve_config(None, {**CONFIG, "vocab_size": _vocab()})
    shape = count_on_meta(cfg)
    assert ranks[0]["params"] == sum(-(-n // WORLD) * c for n, c in shape.numels.items())
    assert ranks[0]["params"] * WORLD > ranks[0]["params_full"]  # padding is exercised
    # bytes per rank in the breakdown (fp32 run): 4 B weights, 4 B gradient, 4 B master + 8 B Adam per element
    per_gpu = est.to_json()["per_gpu_bytes"]
    assert per_gpu["params"] == 4 * ranks[0]["params"]
    assert per_gpu["grads"] == 4 * ranks[0]["grads"]
    assert per_gpu["optimizer"] == 4 * ranks[0]["optimizer_fp32"] + 4 * ranks[0]["adam_states"]


def _vocab() -> int:
    from launcher.data.tokenizer import BYTES_VOCAB_SIZE

    return BYTES_VOCAB_SIZE
