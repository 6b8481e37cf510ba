"""A Hugging Face causal LM as a DeepSpeed `PipelineModule` (`parallelism.pipeline_stages > 1`).

The model is cut into layers that pass one tuple of tensors along the pipeline:

    (input_ids, attention_mask, position_ids)          into the first stage
    (hidden_states, attention_mask, position_ids)      between decoder layers
    hidden_states -> logits                            final norm, LM head
    hidden_states -> (hidden_states, head weight)      the same, with `train.chunked_loss`: the
                                                       loss computes the logits a chunk at a time

Only `hidden_states` is floating point (the pipe engine sends gradients back for floating-point
tensors only); the integer mask and positions travel along so that every stage can build its
attention mask (causal + padding, or per-document for packed rows, through transformers' own
`create_causal_mask`) and its rotary embeddings itself. A packed batch has no attention mask:
a one-element tensor stands in for None.

Layers (`pipeline_layers` lists them; checkpoints save one `layer_XX-model_states.pt` each):

| layer | Llama, Mistral, Qwen2 | GPT-2 |
| --- | --- | --- |
| embedding (`EmbeddingPipe`, tied: `TiedLayerSpec`) | `model.embed_tokens` | `transformer.wte` |
| positions (`PositionPipe`) | - | `transformer.wpe` (+ dropout) |
| each decoder layer (`DecoderLayerPipe`) | `model.layers.i` | `transformer.h.i` |
| final norm (`NormPipe`) | `model.norm` | `transformer.ln_f` |
| LM head (`HeadPipe`, or the tied embedding) | `lm_head` | `lm_head` |

The stage modules wrap the very submodules of the Hugging Face model built by
`launcher.runtime.model.build_model` (same seed, same initial weights as without a pipeline);
each stage keeps only its own layers and the rest is freed. The pipeline computes exactly the
Hugging Face forward, and its loss is transformers' `ForCausalLMLoss` with `num_items_in_batch`,
the same token-weighted loss as the non-pipeline path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.runtime.recompute import apply_activation_checkpointing, checkpoint_function, resolve_mode

LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = LLAMA_LIKE + ("gpt2",)
STATE_PREFIX = "mod."
"""Every pipe layer holds its Hugging Face submodule as `mod`: layer file key `mod.X` is `PREFIX.X`."""


@dataclass(frozen=True)
class PipeLayer:
    """One entry of the pipeline: its kind and the Hugging Face name prefix of its weights."""

    kind: str  # embed | positions | decoder | norm | head
    hf_prefix: str
    tied: bool = False  # the head that reuses the embedding's weight (saves nothing)


def family(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"parallelism.pipeline_stages > 1 supports model types {', '.join(FAMILIES)}; this model is "
            f"'{model_type}': set parallelism.pipeline_stages=1 (ZeRO-3 splits any model)"
        )
    return model_type


def tied_embeddings(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def pipeline_layers(config: Any) -> list[PipeLayer]:
    """The pipeline's layers in order, from the model config alone (also used by the export)."""
    fam = family(config)
    tied = tied_embeddings(config)
    if fam == "gpt2":
        layers = [PipeLayer("embed", "transformer.wte."), PipeLayer("positions", "transformer.wpe.")]
        layers += [PipeLayer("decoder", f"transformer.h.{i}.") for i in range(config.n_layer)]
        layers.append(PipeLayer("norm", "transformer.ln_f."))
    else:
        layers = [PipeLayer("embed", "model.embed_tokens.")]
        layers += [PipeLayer("decoder", f"model.layers.{i}.") for i in range(config.num_hidden_layers)]
        layers.append(PipeLayer("norm", "model.norm."))
    layers.append(PipeLayer("head", "lm_head.", tied=tied))
    return layers


def check_stages(config: Any, stages: int) -> None:
    """Refuse more stages than decoder layers (a stage without a decoder layer is pure waste)."""
    n = sum(1 for layer in pipeline_layers(config) if layer.kind == "decoder")
    if stages > n:
        raise UserError(
            f"parallelism.pipeline_stages={stages} is more than the model's {n} decoder layers: "
            f"set parallelism.pipeline_stages to at most {n}"
        )


# --------------------------------------------------------------------------------------------
# the layers


def _mask_fn(config: Any, layer_idx: int) -> Any:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if config.model_type == "mistral":  # as MistralModel.forward: one kind for every layer
        sliding = getattr(config, "sliding_window", None) is not None
    else:  # as Qwen2Model.forward: per layer type
        types = getattr(config, "layer_types", None)
        sliding = bool(types) and types[layer_idx] == "sliding_attention"
    return create_sliding_window_causal_mask if sliding else create_causal_mask


class _Source:
    """Hands the Hugging Face model's submodules to the layer specs while the pipeline is built;
    afterwards it lets go of the model, so the layers of other stages are freed."""

    def __init__(self, model: nn.Module) -> None:
        self.model: nn.Module | None = model

    def get(self, path: str) -> nn.Module:
        assert self.model is not None, "the pipeline was already built"
        return self.model.get_submodule(path)


class EmbeddingPipe(nn.Module):
    """Token embedding: (input_ids, mask, positions) -> (hidden, mask, positions)."""

    def __init__(self, source: _Source, path: str) -> None:
        super().__init__()
        self.mod = source.get(path)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, mask, positions = inputs
        return self.mod(input_ids), mask, positions


def tied_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head of a model with tied embeddings: the embedding matrix, transposed."""
    return nn.functional.linear(hidden, embedding.mod.weight)


def tied_head_for_chunked_loss(embedding: EmbeddingPipe, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tied LM head left to the chunked loss: (hidden, the embedding matrix)."""
    return hidden, embedding.mod.weight


class PositionPipe(nn.Module):
    """GPT-2's learned positions (and embedding dropout), as `GPT2Model.forward`."""

    def __init__(self, source: _Source) -> None:
        super().__init__()
        self.mod = source.get("transformer.wpe")
        self.drop = source.get("transformer.drop")

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, mask, positions = inputs
        hidden = hidden + self.mod(positions).to(hidden.device)
        return self.drop(hidden), mask, positions


class DecoderLayerPipe(nn.Module):
    """One decoder layer; builds its attention mask and rotary embeddings from the integer
    tensors that travel along."""

    def __init__(self, source: _Source, path: str, layer_idx: int) -> None:
        super().__init__()
        assert source.model is not None
        config = source.model.config
        self.mod = source.get(path)
        self.gpt2 = config.model_type == "gpt2"
        # the model's rotary module (non-persistent buffers only: nothing in the state dict)
        self.rotary = None if self.gpt2 else source.get("model.rotary_emb")
        self.config = config
        self.make_mask = _mask_fn(config, layer_idx)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, mask, positions = inputs
        attention_mask = None if mask.dim() == 1 else mask
        causal = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                past_key_values=None, position_ids=positions)
        if self.gpt2:
            hidden = self.mod(hidden, None, causal, None, use_cache=False, position_ids=positions)
        else:
            rope = self.rotary(hidden, positions)
            hidden = self.mod(hidden, attention_mask=causal, position_embeddings=rope,
                              position_ids=positions, past_key_values=None, use_cache=False)
        return hidden, mask, positions


class NormPipe(nn.Module):
    """Final norm: (hidden, mask, positions) -> hidden."""

    def __init__(self, source: _Source, path: str) -> None:
        super().__init__()
        self.mod = source.get(path)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.mod(inputs[0])


class HeadPipe(nn.Module):
    """Untied LM head: hidden -> logits; or, for the chunked loss, hidden -> (hidden, weight[, bias]),
    the loss computing the logits a chunk at a time (the last stage's output goes nowhere else)."""

    def __init__(self, source: _Source, path: str, chunked: bool = False) -> None:
        super().__init__()
        self.mod = source.get(path)
        self.chunked = chunked

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.chunked:
            return self.mod(hidden)
        bias = self.mod.bias
        return (hidden, self.mod.weight) if bias is None else (hidden, self.mod.weight, bias)


def _specs(model: nn.Module, source: _Source, chunked_loss: bool = False) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config = model.config
    gpt2 = family(config) == "gpt2"
    tied = tied_embeddings(config)
    if gpt2:
        embed, norm, blocks = "transformer.wte", "transformer.ln_f", [f"transformer.h.{i}" for i in range(config.n_layer)]
    else:
        embed, norm = "model.embed_tokens", "model.norm"
        blocks = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    if tied:
        specs: list[Any] = [TiedLayerSpec("embed", EmbeddingPipe, source, embed, tied_weight_attr=["mod.weight"])]
    else:
        specs = [LayerSpec(EmbeddingPipe, source, embed)]
    if gpt2:
        specs.append(LayerSpec(PositionPipe, source))
    specs += [LayerSpec(DecoderLayerPipe, source, path, i) for i, path in enumerate(blocks)]
    specs.append(LayerSpec(NormPipe, source, norm))
    if tied:
        head_fn = tied_head_for_chunked_loss if chunked_loss else tied_head
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, source, embed, forward_fn=head_fn,
                                   tied_weight_attr=["mod.weight"]))
    else:
        specs.append(LayerSpec(HeadPipe, source, "lm_head", chunked_loss))
    return specs


def causal_lm_loss(vocab_size: int) -> Any:
    """The last stage's loss: labels = (token labels, num_items_in_batch as a 0-d tensor)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss_fn(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        token_labels, num_items = labels
        # a Python float, as in the non-pipeline path, so that the loss is computed identically
        return ForCausalLMLoss(logits, token_labels, vocab_size, num_items_in_batch=float(num_items))

    return loss_fn


def chunked_causal_lm_loss_fn(chunk_tokens: int) -> Any:
    """The last stage's loss from (hidden, head weight[, bias]): `causal_lm_loss`'s value, with the
    logits of `chunk_tokens` tokens at a time (launcher/runtime/chunked_loss.py)."""
    from launcher.runtime.chunked_loss import chunked_causal_lm_loss

    def loss_fn(outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, weight, *bias = outputs
        token_labels, num_items = labels
        return chunked_causal_lm_loss(hidden, weight, token_labels, float(num_items), chunk_tokens,
                                      bias[0] if bias else None)

    return loss_fn


def _checkpointing(mode: str | bool) -> dict[str, Any]:
    """PipelineModule arguments that checkpoint every decoder layer in `mode` (see recompute.py)."""
    mode = resolve_mode(mode)
    if mode == "none":
        return {}
    return {
        "activation_checkpoint_interval": 1,
        "activation_checkpoint_func": checkpoint_function(mode),  # non-reentrant: integer ids in
        "checkpointable_layers": [DecoderLayerPipe.__name__],
    }


def build_pipeline_module(
    model: nn.Module, *, stages: int, partition: str = "parameters",
    activation_checkpointing: str | bool = "none", chunked_loss: int = 0,
) -> Any:
    """Turn the Hugging Face `model` into a `PipelineModule` over `stages` stages (the
    data-parallel size is the world size / stages). This rank keeps only its stage's layers.
    `activation_checkpointing`: none, selective or full (a boolean: full or none); `chunked_loss`:
    tokens per chunk of the last stage's loss (`train.chunked_loss`; 0: the whole logits)."""
    from deepspeed.pipe import PipelineModule

    config = model.config
    check_stages(config, stages)
    # the pipeline checkpoints whole DecoderLayerPipes itself: the layers must not do it again
    apply_activation_checkpointing(model, "none")
    source = _Source(model)
    method = {"parameters": "parameters", "layers": f"type:{DecoderLayerPipe.__name__}"}[partition]
    ckpt_kwargs = _checkpointing(activation_checkpointing)
    module = PipelineModule(
        layers=_specs(model, source, chunked_loss=chunked_loss > 0),
        num_stages=stages,
        loss_fn=chunked_causal_lm_loss_fn(chunked_loss) if chunked_loss else causal_lm_loss(config.vocab_size),
        partition_method=method,
        dynamic_shape=True,  # sequence lengths vary from batch to batch
        **ckpt_kwargs,
    )
    module._layer_specs = [None] * len(module._layer_specs)  # drop the specs' hold on the model
    # DeepSpeed's gradient norm (for clipping and the logged grad_norm) sums over the stages only
    # the parameters flagged model-parallel, and otherwise only stage 0's: without this flag the
    # clipping would use stage 0's norm alone. The tied copy on the last stage
    # (ds_pipe_replicated) stays unflagged, so it counts once.
    for p in module.parameters():
        if not getattr(p, "ds_pipe_replicated", False):
            p.model_parallel = True
    source.model = None
    module.hf_config = config
    return module


def pipe_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A collated batch as the first stage's input tuple (see the module docstring)."""
    input_ids = batch["input_ids"]
    positions = batch.get("position_ids")
    mask = batch.get("attention_mask")
    if positions is None:  # as the Hugging Face models: 0, 1, ... on every row
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    if mask is None:  # packed rows: documents are found from the position ids
        mask = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    return input_ids, mask, positions.contiguous()


def pipe_micro_batch(batch: dict[str, torch.Tensor], num_items: float) -> tuple[tuple, tuple]:
    """(inputs, labels) for `PipelineEngine.train_batch` / `eval_batch`."""
    return pipe_inputs(batch), (batch["labels"], torch.tensor(num_items, dtype=torch.float64))


def hf_state_name(layer: PipeLayer, key: str) -> str | None:
    """The Hugging Face name of key `key` of a saved pipe layer (None: not a model weight)."""
    if not key.startswith(STATE_PREFIX):
        return None
    return layer.hf_prefix + key[len(STATE_PREFIX) :]


def record_grad_norm(engine: Any) -> None:
    """Without ZeRO, DeepSpeed computes the gradient norm while clipping and drops it: keep it
    (pre-clipping, over all stages) as `engine.launcher_grad_norm` for the metrics."""
    from deepspeed.runtime.utils import clip_grad_norm_

    engine.launcher_grad_norm = None

    def clip() -> None:
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine.launcher_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip
