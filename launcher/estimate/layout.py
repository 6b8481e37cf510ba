"""The layout an estimate is made for: world size, data/pipeline parallel split, ZeRO, batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from launcher.errors import UserError


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    pipeline_stages: int
    zero_stage: int
    offload_optimizer: str
    offload_param: str
    dtype: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    ckpt: str
    """Activation checkpointing: `none`, `selective` (keep matmul outputs) or `full` (block inputs)."""
    attn: str
    chunked_loss: bool = False
    """Cross-entropy computed `chunk_tokens` tokens at a time (the logits never whole in fp32)."""
    chunk_tokens: int = 1024
    method: str = "full"
    """`train.method`: full, lora or qlora (the search may suggest another)."""
    task: str = "sft"
    """`train.task`: sft, pretrain, dpo, orpo or kto."""

    @property
    def grad_ckpt(self) -> bool:
        return self.ckpt != "none"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world // self.pipeline_stages

    @property
    def weight_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def describe(self) -> str:
        off = []
        if self.offload_optimizer != "none":
            off.append(f"optimizer->{self.offload_optimizer}")
        if self.offload_param != "none":
            off.append(f"params->{self.offload_param}")
        pp = f", {self.pipeline_stages} pipeline stages" if self.pipeline_stages > 1 else ""
        method = {"full": "", "lora": "LoRA, ", "qlora": "QLoRA (4-bit base), "}.get(self.method, "")
        task = f"{self.task.upper()}, " if self.task in ("dpo", "orpo", "kto") else ""
        return (
            task + method + f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s), ZeRO-{self.zero_stage}"
            + (f" (offload {', '.join(off)})" if off else "") + pp
            + f", {self.dtype}, micro-batch {self.micro_batch} x {self.seq_len} tokens, accumulation {self.grad_accum}"
            + (f", {self.ckpt} activation checkpointing" if self.grad_ckpt else "") + f", {self.attn} attention"
            + (f", chunked loss ({self.chunk_tokens} tokens)" if self.chunked_loss else "")
        )


def check_layout(layout: Layout, num_layers: int) -> None:
    """Refuse layouts that cannot run, with the reason."""
    lay = layout
    if lay.world < 1:
        raise UserError("the layout has no GPUs: set resources.gpus_per_node or --gpus-per-node")
    if lay.pipeline_stages > num_layers:
        raise UserError(
            f"parallelism.pipeline_stages: {lay.pipeline_stages} pipeline stages but the model has only "
            f"{num_layers} layers: use at most {num_layers} stages"
        )
    if lay.world % lay.pipeline_stages:
        raise UserError(
            f"parallelism.pipeline_stages: {lay.world} GPUs cannot be split into {lay.pipeline_stages} "
            "pipeline stages: use a divisor of the GPU count"
        )
    if lay.pipeline_stages > 1 and lay.zero_stage >= 2:
        raise UserError(
            f"parallelism.zero_stage: ZeRO-{lay.zero_stage} cannot be combined with pipeline stages "
            "(DeepSpeed's pipeline engine supports ZeRO 0 or 1)"
        )
    if lay.offload_param != "none" and lay.zero_stage != 3:
        raise UserError("parallelism.offload_param: parameter offload needs ZeRO-3")


def check_data_parallel(layout: Layout, train_examples: int | None) -> None:
    """More data-parallel ranks than one global batch of examples allows cannot train."""
    if train_examples is None:
        return
    per_step = layout.micro_batch * layout.grad_accum * layout.data_parallel
    if per_step > train_examples:
        most = max(1, train_examples // (layout.micro_batch * layout.grad_accum))
        raise UserError(
            f"{layout.data_parallel} data-parallel ranks x micro-batch {layout.micro_batch} x accumulation "
            f"{layout.grad_accum} = {per_step} sequences per step, more than the {train_examples} training "
            f"examples: use at most {most * layout.pipeline_stages} GPUs or a smaller batch"
        )


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
