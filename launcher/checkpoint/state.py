"""Per-rank training state (sampler, RNG, counters) as JSON, and the recipe fingerprint that
decides whether a checkpoint may be resumed by a (possibly edited) recipe."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.checkpoint.layout import atomic_write_text
from launcher.recipe.load import to_dict
from launcher.recipe.sections import Recipe


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# --- RNG -------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --- per-rank state files --------------------------------------------------------------------

def write_rank_state(step_dir: Path, rank: int, state: dict[str, Any]) -> None:
    atomic_write_text(step_dir / rank_file(rank), json.dumps(state) + "\n")


def read_rank_state(step_dir: Path, rank: int) -> dict[str, Any]:
    from launcher.errors import UserError

    path = step_dir / rank_file(rank)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable rank state ({e}); run `launcher ckpt verify`") from None


# --- recipe fingerprint ----------------------------------------------------------------------

# Keys whose change makes a checkpoint meaningless for the recipe: another model, other tokens,
# other examples or another order of them. Everything else (logging, max_steps, lr, checkpoint
# interval, eval, sampling) may change between a save and a resume.
BREAKING_KEYS = (
    "model.name_or_path",
    "model.config",
    "model.dtype",
    "tokenizer",
    "data",
    "train.task",
    "train.seed",
    "parallelism.pipeline_stages",
)


ADAPTER_KEYS = ("train.method", "lora.rank", "lora.alpha", "lora.target_modules", "lora.modules_to_save",
                "lora.quant_type", "lora.double_quant")
"""What shapes (or scales) a LoRA run's adapters: breaking too, recorded only for LoRA runs so that
the fingerprints of full fine-tuning runs, and their checkpoints' manifests, stay as they were."""


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    d = to_dict(recipe)
    out = {}
    keys = BREAKING_KEYS + (ADAPTER_KEYS if getattr(recipe.train, "method", "full") != "full" else ())
    for key in keys:
        node: Any = d
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _flatten(prefix: str, v: Any) -> dict[str, Any]:
    if isinstance(v, dict) and v:
        out: dict[str, Any] = {}
        for k, x in v.items():
            out.update(_flatten(f"{prefix}.{k}", x))
        return out
    return {prefix: v}


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every leaf that differs."""
    a, b = {}, {}
    for k in set(saved) | set(current):
        a.update(_flatten(k, saved.get(k)))
        b.update(_flatten(k, current.get(k)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
