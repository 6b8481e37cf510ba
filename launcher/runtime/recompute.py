"""Activation checkpointing (`model.activation_checkpointing`): what a decoder layer keeps for the
backward pass, and what it recomputes.

- `full`: the layer keeps only its input; the backward pass runs its forward again.
- `selective` (Korthikanti et al. 2022, as torchtitan's op-level selective checkpointing): the layer
  still runs under `torch.utils.checkpoint`, but the outputs of its matrix multiplications (the
  q/k/v, output and MLP projections: `aten.mm` / `aten.addmm`) are saved during the forward and
  handed back during the recompute, which therefore redoes only the attention core (scores,
  softmax, dropout, the product with V: `bmm` or the SDPA kernel) and the elementwise operations
  (norms, rotary embeddings, activations, residual adds).

Both are non-reentrant checkpoints (the pipeline's first stage feeds integer ids that cannot
require grad; selective needs it), and both preserve the RNG state, so dropout draws the same
masks again and the losses equal those of `none`.

The same checkpoint function serves a Hugging Face model (each `GradientCheckpointingLayer`, i.e.
each decoder layer of Llama, Mistral, Qwen2, GPT-2, ...) and the pipeline's `DecoderLayerPipe`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from launcher.errors import RecipeError

MODES = ("none", "selective", "full")

SAVED_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})
"""What `selective` keeps: the linear layers' matmuls. `bmm` is left out on purpose: in these models
it is the attention core (QK^T and the product with V), which Korthikanti et al. recompute."""


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict[str, Any]:
    """Keyword arguments of `torch.utils.checkpoint.checkpoint` for `mode` (selective or full)."""
    if mode not in ("selective", "full"):
        raise ValueError(f"no checkpoint for activation_checkpointing={mode!r}")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        # a fresh pair of contexts per checkpointed call (the cache of saved outputs lives in them)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    return kwargs


def checkpoint_function(mode: str) -> Callable[..., Any]:
    """`checkpoint(fn, *args)` for `mode`, e.g. for the pipeline's `activation_checkpoint_func`."""
    return functools.partial(checkpoint, **checkpoint_kwargs(mode))


def resolve_mode(mode: str | bool) -> str:
    """`mode` as one of MODES (the old boolean: true is full)."""
    if isinstance(mode, bool):  # the old boolean (`gradient_checkpointing`)
        return "full" if mode else "none"
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def apply_activation_checkpointing(model: torch.nn.Module, mode: str | bool) -> torch.nn.Module:
    """Checkpoint every decoder layer of the Hugging Face `model` in `mode` (`none` turns it off).
    Checkpointing acts in training mode only; `model.eval()` runs plainly."""
    mode = resolve_mode(mode)
    if mode == "none":
        if getattr(model, "is_activation_checkpointing", False):
            model.activation_checkpointing_disable()
        return model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError("model.activation_checkpointing", f"{type(model).__name__} cannot recompute its "
                          "activations: set model.activation_checkpointing=none")
    # transformers wraps each GradientCheckpointingLayer's forward in this checkpoint function
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(mode))
    return model
