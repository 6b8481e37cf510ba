"""The bf16 accumulation probe (issue 12): how exactly DeepSpeed sums a step's micro-batch
gradients, measured where nothing else differs.

The parity cells compare whole trainings with a reference, so their tolerances must cover the
bf16 noise of a different batch split (docs/parity.md, the noise floor), and with 4 micro-batches
summing in bf16 stays inside it. Here the reference is the same computation: the same weights, the
same micro-batches in the same order, the same bf16 forward and backward, each micro-batch's bf16
gradient added in fp32. With fp32 accumulation DeepSpeed's accumulated gradient (read at the
accumulation boundary, before the optimizer step, with `safe_get_full_grad`) equals it to fp32
rounding; summing in bf16 leaves it ~2^-9 off. One process (world 1, gloo) runs every ZeRO stage
with the generated config and with DeepSpeed's defaults (`--before-fix`).

    python tests/parity/accum_probe.py [--before-fix] [--zero 0,1,2,3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GRAD_ACCUM = 8  # a power of two: DeepSpeed's loss / grad_accum is exact in bf16
BEFORE_FIX = {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}
"""DeepSpeed's defaults for a bf16 model (what the generated config had before issue 12)."""


def _recipe(zero: int, before_fix: bool) -> Any:
    from launcher.recipe import from_dict

    return from_dict({
        "name": "accum-probe",
        "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128, "tie_word_embeddings": False},
                  "dtype": "bf16"},
        "tokenizer": {"builtin": "bytes"},
        "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 16}, "max_seq_len": 64},
        "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": GRAD_ACCUM, "lr": 1e-3,
                  "chunked_loss": 0},
        "parallelism": {"zero_stage": zero},
        "resources": {"cpu_workers": 1},
        "deepspeed": BEFORE_FIX if before_fix else {},
    })


def _batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of one sequence each, of different lengths (so of different gradient sizes)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (12, 40, 7, 64, 25, 50, 9, 33)[:GRAD_ACCUM]:
        ids = torch.randint(3, vocab, (1, n), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def _full_state(engine: Any) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=hasattr(next(iter(params.values())), "ds_id")):
        return {k: p.detach().clone() for k, p in params.items()}


def _reference_grads(recipe: Any, tok: Any, state: dict[str, torch.Tensor], batches: list) -> dict[str, torch.Tensor]:
    """Each micro-batch's bf16 gradient (of loss / grad_accum, as DeepSpeed scales it), summed in fp32."""
    from launcher.runtime.model import build_model

    model = build_model(recipe.model, tok, seed=recipe.train.seed)
    model.load_state_dict(state)
    total = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in model.named_parameters()}
    for b in batches:
        model.zero_grad(set_to_none=True)
        (model(**b).loss / GRAD_ACCUM).backward()
        for k, p in model.named_parameters():
            total[k] += p.grad.float()
    return total


def probe(zero: int, before_fix: bool, tok: Any) -> dict[str, Any]:
    """DeepSpeed's accumulated gradient against the fp32 sum of the same bf16 gradients."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    recipe = _recipe(zero, before_fix)
    config = build_ds_config(recipe, data_parallel=1, on_gpu=False)
    keep = HfDeepSpeedConfig(config) if zero == 3 else None  # noqa: F841  (zero.Init, as the trainer)
    model = build_model(recipe.model, tok, seed=recipe.train.seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config)
    batches = _batches(len(tok))
    state = _full_state(engine)
    keep = None  # noqa: F841  (the reference model is built whole, outside zero.Init)
    ref = _reference_grads(recipe, tok, state, batches)
    for i, b in enumerate(batches):
        engine.backward(engine(**b).loss)
        if i < len(batches) - 1:
            engine.step()  # not a boundary: only counts the micro-batch
    got = {k: safe_get_full_grad(p).float() for k, p in engine.module.named_parameters()}
    engine.step()
    diff = torch.sqrt(sum(((got[k] - ref[k]) ** 2).sum() for k in ref))
    norm = torch.sqrt(sum((ref[k] ** 2).sum() for k in ref))
    return {"zero": zero, "before_fix": before_fix, "optimizer": type(engine.optimizer).__name__,
            "rel_grad_dev": float(diff / norm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", default="0,1,2,3", help="comma-separated ZeRO stages")
    ap.add_argument("--before-fix", action="store_true", help="also probe DeepSpeed's default accumulation dtypes")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)  # one summation order for every matmul, here and in DeepSpeed's module
    import deepspeed

    from launcher.data import build_tokenizer
    from launcher.recipe.sections import TokenizerConfig
    from launcher.runtime.precision import install_deepspeed_backports
    from launcher.runtime.quiet import quiet_libraries

    quiet_libraries()
    deepspeed.init_distributed(dist_backend="gloo")
    install_deepspeed_backports()
    tok = build_tokenizer(TokenizerConfig(builtin="bytes"), None)
    rows = [probe(int(z), bf, tok) for bf in ([False, True] if args.before_fix else [False])
            for z in args.zero.split(",")]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'config':<12}{'zero':>5}  {'optimizer':<28}{'rel grad dev':>14}")
    for r in rows:
        print(f"{'before-fix' if r['before_fix'] else 'generated':<12}{r['zero']:>5}  {r['optimizer']:<28}"
              f"{r['rel_grad_dev']:>14.2e}")


if __name__ == "__main__":
    main()
