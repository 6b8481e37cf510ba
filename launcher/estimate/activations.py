"""Activation memory per phase of a training step, from what the kernels keep for backward.

Every term is per token (s x b of them per micro-batch), a = 2 bytes in bf16/fp16 and 4 in fp32,
checked against `launcher estimate --trace` (docs/estimate.md has the table):

- RMSNorm (Llama, Mistral, Qwen2) keeps its input upcast to fp32 and two 16-bit copies (the
  normalized input, the scaled output the next matmul keeps): (4 + 2a) x hidden. LayerNorm (GPT-2)
  keeps its input and output: 2a x hidden.
- Attention keeps q, k, v and its output. Under sdpa and eager, transformers repeats k and v to
  all heads whenever it builds a 4D mask (always for padded batches), so k and v take the width of
  q; flash_attention_2 keeps them grouped. Flash/SDPA write the output in the layout o_proj reads
  (no copy) and keep an fp32 logsumexp per head; eager keeps the s x s probabilities per head in
  fp32 and 16-bit, and copies the output to o_proj's layout.
- The MLP keeps gate, up, act(gate) and their product (SwiGLU) or the fc output and its GELU.
- Checkpointing: `full` keeps each block's input and recomputes the block in backward; `selective`
  keeps the matmul outputs (q, k, v, o, gate, up, down) and the block input and recomputes the rest.
- The loss upcasts the 16-bit logits (kept in the model's output until the step ends) to fp32;
  cross-entropy keeps its log-softmax, and backward adds two fp32 gradients of the same size. The
  chunked loss (launcher.runtime.chunked_loss) holds that for `chunk_tokens` tokens at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher.estimate.layout import Layout
from launcher.estimate.params import ModelShape


@dataclass(frozen=True)
class Terms:
    """Activation bytes of one micro-batch (not per token)."""

    stored: int
    """Kept from forward for backward by all of the (stage's) blocks, plus the final norm and mask."""
    per_block: int
    """Everything one block keeps without checkpointing (what a recomputed block holds again)."""
    loss_forward: int
    loss_backward: int
    working: int
    """One block's backward: its recomputed activations (with checkpointing) and its gradients."""
    scores: int
    """Of `per_block`: eager attention's s x s probabilities."""


def _bytes(lay: Layout) -> int:
    return 4 if lay.dtype == "fp32" else 2


def norm_bytes(shape: ModelShape, a: int) -> int:
    return (4 + 2 * a) * shape.hidden if shape.gated_mlp else 2 * a * shape.hidden


def attention_bytes(shape: ModelShape, lay: Layout) -> int:
    """Per token of one block: q, k, v, output, and the kernel's softmax statistics or scores."""
    a, s = _bytes(lay), lay.seq_len
    qd = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim if lay.attn == "flash_attention_2" else qd
    if lay.attn == "eager":
        return a * qd + 2 * a * kv + a * qd + shape.heads * s * (4 + (a if a < 4 else 0))
    return a * qd + 2 * a * kv + a * qd + 4 * shape.heads


def mlp_bytes(shape: ModelShape, a: int) -> int:
    return (4 if shape.gated_mlp else 2) * a * shape.intermediate


def kept_per_block(shape: ModelShape, lay: Layout) -> int:
    """Per token of one block, in the recipe's checkpointing mode."""
    a, h = _bytes(lay), shape.hidden
    if lay.ckpt == "full":
        return a * h
    if lay.ckpt == "selective":
        qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        mlp_mm = (2 if shape.gated_mlp else 1) * shape.intermediate + h
        return a * (h + qd + 2 * kvd + h + mlp_mm)
    return 2 * norm_bytes(shape, a) + attention_bytes(shape, lay) + mlp_bytes(shape, a)


def loss_bytes(shape: ModelShape, lay: Layout, head_trains: bool = True) -> tuple[int, int]:
    """(forward peak, backward peak) of the logits and cross-entropy for one micro-batch.

    Unchunked: the 16-bit logits (kept by the model's output), their fp32 copy and the log-softmax,
    plus a 16-bit copy on the loss's path (measured by the trace), then in backward two fp32
    gradients. Chunked: one chunk's fp32 logits and log-softmax in forward; in backward the chunk
    recomputed (fp32 logits, log-softmax) with its two fp32 gradients, and the gradient of the
    final hidden states of the whole micro-batch (`hidden_grad_bytes`).
    """
    a, tok, V = _bytes(lay), lay.seq_len * lay.micro_batch, shape.vocab
    if lay.chunked_loss:
        c = min(lay.chunk_tokens, tok)
        # a frozen head (LoRA) needs no weight gradient: one fp32 chunk fewer (measured by --trace)
        return c * V * 8, c * V * (16 if head_trains else 12) + hidden_grad_bytes(shape, lay)
    up = 4 if a < 4 else 0  # the fp32 copy of 16-bit logits
    return tok * V * (a + up + 4 + 2), tok * V * (a + 12)


def hidden_grad_bytes(shape: ModelShape, lay: Layout) -> int:
    """The chunked loss's gradient of the final hidden states (filled chunk by chunk)."""
    return lay.seq_len * lay.micro_batch * _bytes(lay) * shape.hidden if lay.chunked_loss else 0


def lora_bytes(inputs: tuple[tuple[int, int, int], ...], rank: int, dropout: float, lay: Layout) -> tuple[int, int]:
    """(kept, whole) bytes per token and block that PEFT's LoRA adds for the adapted linear layers
    of a block, `inputs` being (in features, out features, layers): each keeps its rank-sized A
    output for B's backward and, with dropout, its own dropped-out copy of the input and the
    dropout mask (a + 1 bytes per input feature). `whole`: without checkpointing (a recomputed
    block holds this); `kept`: in the recipe's mode. Selective checkpointing keeps every matmul
    output, B's full-width one too (checked against --trace); full keeps none."""
    a = _bytes(lay)
    ranks = sum(a * rank * n for _fin, _fout, n in inputs)
    drop = sum((a + 1) * fin * n for fin, _fout, n in inputs) if dropout > 0 else 0
    outs = sum(a * fout * n for _fin, fout, n in inputs)
    whole = ranks + drop
    return {"none": whole, "selective": ranks + outs, "full": 0}[lay.ckpt], whole


def terms(shape: ModelShape, lay: Layout, extra: tuple[int, int] = (0, 0), head_trains: bool = True) -> Terms:
    """`extra`: (kept, whole) bytes per token and block a method adds (`lora_bytes`); `head_trains`:
    the LM head has a weight gradient."""
    a, s, b = _bytes(lay), lay.seq_len, lay.micro_batch
    tok = s * b
    layers = math.ceil(shape.num_layers / lay.pipeline_stages)
    block = 2 * norm_bytes(shape, a) + attention_bytes(shape, lay) + mlp_bytes(shape, a) + extra[1]
    mask = b * s * s * (1 if lay.attn == "sdpa" else 0)  # sdpa keeps the boolean 4D mask
    stored = tok * (layers * (kept_per_block(shape, lay) + extra[0]) + norm_bytes(shape, a)) + mask
    scores = tok * shape.heads * s * (4 + (a if a < 4 else 0)) if lay.attn == "eager" else 0
    # a block's activation gradients; eager adds the gradients of its s x s probabilities (fp32 + 16-bit)
    grads = tok * a * (2 * shape.intermediate + 2 * shape.hidden) + scores
    working = grads + (tok * block if lay.grad_ckpt else 0)
    fwd, bwd = loss_bytes(shape, lay, head_trains)
    return Terms(stored=stored, per_block=tok * block, loss_forward=fwd, loss_backward=bwd, working=working,
                 scores=scores)
