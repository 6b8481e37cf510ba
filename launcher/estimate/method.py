"""What a training method changes in the estimate: which parameters train, how the frozen base is
stored, and how many sequences each example runs through the model.

- `full`: every parameter trains (the DeepSpeed-equal model states of memory.py).
- `lora`: PEFT adapters on the target linear layers, rank x (in + out) parameters each, plus the
  `lora.modules_to_save` copies; the base stays frozen in the model dtype.
- `qlora`: the same adapters on a bitsandbytes 4-bit base (`quant4_bytes`); embeddings, norms,
  biases and the LM head stay in the model dtype, as bitsandbytes leaves them.
- `dpo`, `orpo`: chosen and rejected sequences per pair (two sequences through the model);
  DPO adds a reference policy: a frozen copy (`copy`), the base with its adapters off (`base`, no
  memory), or log-probs computed before training (`precomputed`). ORPO needs none.
- `kto`: one sequence per example with gradients, plus TRL's KL estimate: a forward of a
  mismatched completion without gradients, and the reference on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.errors import RecipeError
from launcher.estimate.params import ModelShape

NF4_BLOCK = 64
"""bitsandbytes' 4-bit blocksize: one absmax constant per 64 weights (`quantize_4bit`, CUDA)."""
NESTED_BLOCK = 256
"""Double quantization: the absmax constants are quantized to 8 bits in blocks of 256, each
block with one fp32 constant (`quantize_blockwise(absmax, blocksize=256)`)."""
QUANT_CODE_BYTES = 16 * 4
"""The nf4/fp4 code book stored with each weight's quant state (16 fp32 values)."""


def quant4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes keeps for one weight of `numel` elements in 4 bits.

    The packed weight: two 4-bit values per byte, ceil(numel / 2) bytes (stored as the model's
    dtype with `bnb_4bit_quant_storage`, same bytes). One absmax per 64-element block: fp32 (4 bytes);
    with double quantization 1 byte each plus one fp32 per 256 blocks and the fp32 mean subtracted
    first (`offset`). Plus the 16-value fp32 code book. bitsandbytes' shared 256-value map for the
    8-bit constants is one per process and is left out.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4
    else:
        constants = 4 * blocks
    return packed + constants + QUANT_CODE_BYTES


@dataclass(frozen=True)
class Method:
    """The method's counts for one model (all per whole model, before any partitioning)."""

    method: str
    task: str
    trainable: int
    """Parameters that train (with gradients and optimizer state)."""
    adapters: int
    """Of `trainable`: LoRA's A and B matrices."""
    base_16bit: int
    """Frozen parameters kept in the model dtype (LoRA: the whole base; QLoRA: what is not quantized)."""
    quantized: int
    """QLoRA: parameters stored in 4 bits."""
    quantized_bytes: int
    """QLoRA: their packed weights and quantization constants."""
    quant_constants_bytes: int
    """Of `quantized_bytes`: the constants (absmax, nested absmax, code books), kept whole on every GPU."""
    numels: tuple[tuple[int, int], ...]
    """Trainable parameter sizes -> count (ZeRO partitions and persistence)."""
    adapter_inputs: tuple[tuple[int, int, int], ...] = ()
    """(in features, out features, adapted layers per block of that shape) of the adapted linear
    layers in the blocks: what LoRA's dropout copies and A and B outputs are kept for."""
    head_trains: bool = True
    """The LM head has gradients (full fine-tuning, or LoRA with it in the targets or modules_to_save)."""
    rank: int = 0
    dropout: float = 0.0
    sequences: int = 1
    """Sequences with gradients per example (DPO/ORPO: chosen and rejected)."""
    reference: str = "none"
    """`copy`, `base`, `precomputed` or `none`."""
    no_grad_sequences: int = 0
    """Forward-only sequences per example through the policy or the reference (DPO: 2 through the
    reference; KTO: 1 KL completion through the policy and 2 through the reference)."""
    reference_sequences: int = 0
    """Of those: sequences per example the reference scores right after the policy's forward, while
    the policy's activations and log-probs wait for backward (DPO 2, KTO 1; KTO's KL pass runs
    before the step, with nothing kept)."""
    reference_bytes: int = 0
    """Bytes of a reference copy (`copy`: the starting model in the model dtype, or as QLoRA
    stores its base)."""

    @property
    def full(self) -> bool:
        return self.method == "full"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "task": self.task, "trainable_params": self.trainable,
                "adapter_params": self.adapters, "frozen_16bit_params": self.base_16bit,
                "quantized_params": self.quantized, "quantized_bytes": self.quantized_bytes,
                "sequences_per_example": self.sequences, "reference": self.reference,
                "forward_only_sequences_per_example": self.no_grad_sequences,
                "reference_bytes": self.reference_bytes}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of names: the module's full name or its last dotted components (the
    block index is `*` here, so a target naming one block's module counts for every block)."""
    return name == target or name.endswith("." + target)


def default_targets(shape: ModelShape) -> list[str]:
    """Every linear layer but the LM head: for Llama, Mistral and Qwen2 exactly the attention and
    MLP projections (q/k/v/o, gate/up/down) the runtime defaults to, elsewhere its fallback."""
    return sorted({name.rsplit(".", 1)[-1] for name, kind, *_ in shape.modules if kind == "linear"})


def _targeted(shape: ModelShape, targets: list[str], key: str) -> list[tuple[str, str, int, int, int, int]]:
    if not shape.modules:
        raise RecipeError(key, "this model's module table is unknown (an old cache entry): "
                          "rerun with XDG_CACHE_HOME set to an empty directory")
    out = []
    for t in targets:
        hits = [m for m in shape.modules if _matches(m[0], t)]
        if not hits:
            names = sorted({m[0].rsplit(".", 1)[-1] for m in shape.modules if m[1] in ("linear", "embedding")})
            raise RecipeError(key, f"'{t}' matches no module of the model; its linear layers and embeddings "
                              f"are named {', '.join(names[:14])}")
        out += [m for m in hits if m not in out]
    return out


def lora_counts(shape: ModelShape, rank: int, targets: list[str],
                modules_to_save: list[str]) -> tuple[int, int, dict[int, int], list[tuple[int, int]]]:
    """(adapter parameters, modules_to_save parameters, trainable sizes histogram, adapted block
    inputs) for LoRA of `rank` on `targets` (empty: the default targets)."""
    adapted = _targeted(shape, targets or default_targets(shape), "lora.target_modules")
    saved = _targeted(shape, modules_to_save, "lora.modules_to_save") if modules_to_save else []
    adapters, hist, inputs = 0, {}, {}
    for name, kind, _numel, fin, fout, count in adapted:
        if kind not in ("linear", "embedding", "head"):
            raise RecipeError("lora.target_modules", f"'{name}' is not a linear layer or an embedding: "
                              "LoRA adapts linear layers (and embeddings)")
        adapters += rank * (fin + fout) * count
        for n in (rank * fin, rank * fout):
            hist[n] = hist.get(n, 0) + count
        if ".*." in name and kind in ("linear", "head"):
            inputs[(fin, fout)] = inputs.get((fin, fout), 0) + 1
    saved_params = 0
    for _name, _kind, numel, _fin, _fout, count in saved:
        saved_params += numel * count
        hist[numel] = hist.get(numel, 0) + count
    return adapters, saved_params, hist, sorted((fin, fout, n) for (fin, fout), n in inputs.items())


def quantized_modules(shape: ModelShape) -> list[tuple[str, str, int, int, int, int]]:
    """What bitsandbytes quantizes: every linear layer but the output head (transformers' default
    `llm_int8_skip_modules`); embeddings and norms stay in the model dtype."""
    return [m for m in shape.modules if m[1] == "linear"]


def method_for(recipe: Any, shape: ModelShape, method: str | None = None) -> Method:
    """The method's counts for `recipe` on `shape` (`method`: another than the recipe's, for the
    layout search)."""
    method, task = method or recipe.train.method, recipe.train.task
    seqs, no_grad, reference, ref_seqs = 1, 0, "none", 0
    lora = recipe.lora
    if task in ("dpo", "orpo"):
        seqs = 2
    if task in ("dpo", "kto"):
        reference = recipe.preference.reference
        if reference == "auto":
            reference = "base" if method != "full" else "copy"
        if reference != "precomputed":
            ref_seqs = seqs if task == "dpo" else 1
            no_grad = 2 + (1 if task == "kto" else 0)  # KTO: the example and its KL completion, + the KL policy pass
        elif task == "kto":
            no_grad = 1
    if method == "full":
        hist = dict(shape.numels)
        ref_bytes = (2 if recipe.model.dtype != "fp32" else 4) * shape.total if reference == "copy" else 0
        return Method("full", task, shape.total, 0, 0, 0, 0, 0, tuple(sorted(hist.items())), sequences=seqs,
                      reference=reference, no_grad_sequences=no_grad, reference_sequences=ref_seqs,
                      reference_bytes=ref_bytes)
    adapters, saved, hist, inputs = lora_counts(shape, lora.rank, list(lora.target_modules),
                                                list(lora.modules_to_save))
    head = [m[0] for m in shape.modules if m[1] == "head"]
    head_trains = any(_matches(h, t) for h in head for t in list(lora.target_modules) + list(lora.modules_to_save))
    quantized = q_bytes = q_consts = 0
    if method == "qlora":
        for _n, _k, numel, fin, fout, count in quantized_modules(shape):
            weight = fin * fout
            quantized += weight * count
            q_bytes += quant4_bytes(weight, lora.double_quant) * count
            q_consts += (quant4_bytes(weight, lora.double_quant) - math.ceil(weight / 2)) * count
    w = 2 if recipe.model.dtype != "fp32" else 4
    base16 = shape.total - quantized
    ref_bytes = (w * base16 + q_bytes) if reference == "copy" else 0
    return Method(method, task, adapters + saved, adapters, base16, quantized, q_bytes, q_consts,
                  tuple(sorted(hist.items())), tuple(inputs), head_trains, rank=lora.rank, dropout=lora.dropout,
                  sequences=seqs, reference=reference, no_grad_sequences=no_grad, reference_sequences=ref_seqs,
                  reference_bytes=ref_bytes)
