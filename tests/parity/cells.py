"""The parity cells (one launcher layout each), their shared recipe, and the tiny model.

Every cell trains the same global batch (8 sequences) per step: only how it is split over
ranks, micro-batches and pipeline stages changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"

GLOBAL_BATCH = 8
STEPS = 8
SEED = 42

MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
"""A 4-layer Llama (4 layers so that 2 pipeline stages each get real decoder layers)."""

TRAIN: dict[str, Any] = {
    "max_steps": STEPS,
    "lr": 1e-3,
    "schedule": "cosine",
    "warmup_steps": 2,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "max_grad_norm": 1.0,
    "seed": SEED,
    "eval_every": 0,
}
"""Hyperparameters shared by every cell and the reference; warmup, cosine decay, weight decay
(on 2-D weights only) and clipping are all exercised. The clip (1.0) binds at most steps."""

DATA: dict[str, Any] = {
    "format": "alpaca",
    "path": [str(ALPACA)],
    # 256 bytes: label counts per example range from ~30 to ~190 and lengths from ~130 to 256,
    # so micro-batches differ in both label tokens and padding
    "max_seq_len": 256,
    "shuffle": False,  # step k trains examples 8(k-1) .. 8k-1 in every layout
}


@dataclass(frozen=True)
class Cell:
    name: str
    world: int
    zero: int
    ga: int
    micro: int
    pp: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world // self.pp


def _cell(world: int, zero: int, ga: int, pp: int = 1) -> Cell:
    micro = GLOBAL_BATCH // (world // pp) // ga
    name = f"w{world}-z{zero}-ga{ga}" + (f"-pp{pp}" if pp > 1 else "")
    return Cell(name, world, zero, ga, micro, pp)


CELLS: list[Cell] = [
    *[_cell(w, z, ga) for w in (1, 2) for z in (0, 1, 2, 3) for ga in (1, 4)],
    _cell(2, 0, 4, pp=2),  # 2 stages, micro-batches of 2 through the pipe
    _cell(4, 1, 4, pp=2),  # 2 stages x 2 data-parallel
]


def select(patterns: list[str] | None) -> list[Cell]:
    """Cells whose name contains any of `patterns` (all without); a pattern ending in "$" must
    match the whole name (`w2-z0-ga4$` without `w2-z0-ga4-pp2`)."""
    if not patterns:
        return list(CELLS)

    def hit(p: str, name: str) -> bool:
        return name == p[:-1] if p.endswith("$") else p in name

    picked = [c for c in CELLS if any(hit(p, c.name) for p in patterns)]
    if not picked:
        raise ValueError(f"no cell matches {patterns}; cells: {', '.join(c.name for c in CELLS)}")
    return picked


def recipe_dict(cell: Cell, model_dir: Path, *, dtype: str = "fp32",
                deepspeed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The launcher recipe for `cell`: same model directory, data, order and hyperparameters;
    `dtype` the model's (bf16: weights and compute in bf16), `deepspeed` the raw block merged last
    into the generated DeepSpeed config."""
    out = {
        "name": f"parity-{cell.name}",
        "model": {"name_or_path": str(model_dir), "dtype": dtype, "attn_implementation": "sdpa"},
        "tokenizer": {"builtin": "bytes"},
        "data": dict(DATA),
        "train": {**TRAIN, "micro_batch_size": cell.micro, "grad_accum": cell.ga},
        "parallelism": {"zero_stage": cell.zero, "pipeline_stages": cell.pp},
        "resources": {"cpu_workers": cell.world},
        # the harness exports every cell's final checkpoint itself, through the same call
        "checkpoint": {"at_end": True},
        "logging": {"tensorboard": False, "sample_ids": True},
        "sample": {"from_eval": 0},
    }
    if deepspeed:
        out["deepspeed"] = deepspeed
    return out


def make_model(model_dir: Path) -> Path:
    """Save a random-init tiny Llama (fp32, seed 0) with the bytes tokenizer's vocabulary:
    every cell and the reference start from these exact weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.data import build_tokenizer
    from launcher.recipe.sections import TokenizerConfig

    tok = build_tokenizer(TokenizerConfig(builtin="bytes"), None)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **MODEL_CONFIG,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(model_dir)
    return model_dir


def cells_json(cells: list[Cell]) -> str:
    return json.dumps([asdict(c) for c in cells])


def cells_from_json(text: str) -> list[Cell]:
    return [Cell(**d) for d in json.loads(text)]
