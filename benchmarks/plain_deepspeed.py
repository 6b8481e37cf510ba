"""The baseline for bench_overhead.py: a plain torchrun + DeepSpeed loop, nothing else.

It trains the same model (built by the launcher's `build_model`, with the recipe's chunked loss)
on the same tokenized data with the same DeepSpeed config as `launcher run` would, and appends one JSON line per step (with its unix `time`) to --out.
Run with: torchrun --nproc_per_node 2 benchmarks/plain_deepspeed.py RECIPE --steps N --out FILE
"""

from __future__ import annotations

import argparse
import json
import time

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from launcher.data import build_datasets, build_tokenizer, collate
from launcher.recipe import load_recipe
from launcher.runtime.chunked_loss import recipe_chunk_tokens
from launcher.runtime.ds_config import build_ds_config
from launcher.runtime.model import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    recipe = load_recipe(args.recipe, [f"train.max_steps={args.steps}"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(recipe.train.seed)
    tok = build_tokenizer(recipe.tokenizer, None)
    data = build_datasets(recipe, tok)
    ds_config = build_ds_config(recipe, data_parallel=world, on_gpu=False)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (ZeRO-3 init, as in the launcher)
    # the same network and loss computation as the launcher's (the chunked loss is the model's
    # forward, not launcher overhead): what differs is everything around the engine calls
    model = build_model(recipe.model, tok, seed=recipe.train.seed, chunked_loss=recipe_chunk_tokens(recipe))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    micro = recipe.train.micro_batch_size
    g = torch.Generator().manual_seed(recipe.train.seed)
    order = torch.randperm(len(data.train), generator=g).tolist()[rank::world]
    out = open(args.out, "a") if rank == 0 else None
    pos = 0
    for step in range(1, args.steps + 1):
        for _ in range(recipe.train.grad_accum):
            idx = [order[(pos + i) % len(order)] for i in range(micro)]
            pos += micro
            batch = collate([data.train[i] for i in idx], pad_id=tok.pad_token_id)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        if out:
            out.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
