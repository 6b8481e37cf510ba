"""Time: FLOPs per token, tokens per step and in total, an efficiency, communication.

FLOPs per token = 6 x N (N: parameters in matrix multiplies, i.e. without the input embedding
lookup) + 12 x layers x attention width x sequence length (attention scores and values, forward
and backward); activation checkpointing adds one more forward: x 4/3. Step time = FLOPs per step
/ (GPUs x peak x efficiency), or the communication time when that is longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from launcher.estimate.hardware import Gpu
from launcher.estimate.layout import Layout
from launcher.estimate.params import ModelShape

DEFAULT_NETWORK_GBPS = 800.0
"""Inter-node bandwidth per node in Gbit/s (e.g. 8 x 100 Gb/s or 2 x 400 Gb/s NICs)."""
NETWORK_EFFICIENCY = 0.7
"""Fraction of link bandwidth collectives achieve."""


def default_mfu(lay: Layout) -> float:
    """Efficiency (achieved / peak FLOP/s, counting recompute) assumed when none is given.

    HF + DeepSpeed: 0.40 for ZeRO 0-2, 0.35 for ZeRO-3 (torchtitan reports 33-39% MFU for
    Llama-3.1-8B FSDP on 8 H100s); optimizer offload x0.7 (CPU Adam step), parameter offload
    x0.5 (PCIe transfers). Pipeline bubbles are applied separately.
    """
    mfu = 0.35 if lay.zero_stage == 3 else 0.40
    if lay.offload_optimizer != "none":
        mfu *= 0.7
    if lay.offload_param != "none":
        mfu *= 0.5
    return mfu


@dataclass
class TimeEstimate:
    flops_per_token: float
    tokens_per_step: int
    steps: int | None
    total_tokens: int | None
    mfu: float
    mfu_source: str
    compute_s: float
    comm_bytes_per_gpu: float
    comm_s: float
    step_time_s: float
    tokens_per_s: float
    total_hours: float | None
    bubble: float = 0.0
    warnings: list[str] = field(default_factory=list)


def flops_per_token(shape: ModelShape, lay: Layout) -> float:
    n_matmul = shape.total - (0 if shape.tied else shape.vocab * shape.hidden)
    attn = 12 * shape.num_layers * shape.heads * shape.head_dim * lay.seq_len
    base = 6 * n_matmul + attn
    if lay.ckpt == "selective":  # recomputes the attention core's forward (a third of its term)
        return base + attn / 3
    return base * 4 / 3 if lay.grad_ckpt else base


def comm_bytes_per_gpu(shape: ModelShape, lay: Layout) -> float:
    """Bytes each GPU sends per optimizer step in ZeRO's collectives (ring algorithms)."""
    N = lay.data_parallel
    if N == 1:
        return 0.0
    w = lay.weight_bytes
    ring = (N - 1) / N
    P = shape.total / lay.pipeline_stages
    if lay.zero_stage == 3:
        # every micro-batch: all-gather weights for forward and backward (and the recompute),
        # reduce-scatter gradients
        per_micro = (3 + (1 if lay.ckpt == "full" else 0)) * w * P * ring  # selective recomputes no matmul
        return per_micro * lay.grad_accum
    if lay.zero_stage == 2:
        return lay.grad_accum * w * P * ring + w * P * ring  # reduce-scatter per micro-batch + all-gather
    return 2 * w * P * ring  # all-reduce of the gradients once per step


def estimate_time(shape: ModelShape, lay: Layout, gpu: Gpu, *, steps: int | None, avg_seq_len: int | None = None,
                  mfu: float | None = None, network_gbps: float | None = None) -> TimeEstimate:
    seq = avg_seq_len or lay.seq_len
    tokens_per_step = lay.micro_batch * lay.grad_accum * lay.data_parallel * seq
    fpt = flops_per_token(shape, lay.with_(seq_len=seq))
    source = "given" if mfu is not None else "default for this layout"
    eff = mfu if mfu is not None else default_mfu(lay)
    bubble = 0.0
    if lay.pipeline_stages > 1:
        bubble = (lay.pipeline_stages - 1) / (lay.grad_accum + lay.pipeline_stages - 1)
    compute = tokens_per_step * fpt / (lay.world * gpu.peak_tflops * 1e12 * eff) / (1 - bubble)
    comm_bytes = comm_bytes_per_gpu(shape, lay)
    if lay.nodes > 1:
        per_gpu_bw = (network_gbps or DEFAULT_NETWORK_GBPS) / 8 * 1e9 / lay.gpus_per_node
        link = "inter-node network"
    else:
        per_gpu_bw = gpu.intra_node_gbps * 1e9
        link = "intra-node links"
    comm = comm_bytes / (per_gpu_bw * NETWORK_EFFICIENCY) if comm_bytes else 0.0
    step = max(compute, comm)  # DeepSpeed overlaps communication with compute
    warnings = []
    if comm > compute:
        warnings.append(
            f"communication would dominate: {comm_bytes / 1e9:.1f} GB per GPU per step over the {link} "
            f"takes {comm:.1f} s against {compute:.1f} s of compute; use fewer nodes, more accumulation "
            "per step (larger micro-batches), ZeRO-2, or a faster network"
        )
    if not gpu.bf16 and lay.dtype == "bf16":
        warnings.append(f"{gpu.name} has no bf16: use model.dtype=fp16 on it")
    total_tokens = steps * tokens_per_step if steps is not None else None
    hours = steps * step / 3600 if steps is not None else None
    return TimeEstimate(
        flops_per_token=fpt, tokens_per_step=tokens_per_step, steps=steps, total_tokens=total_tokens,
        mfu=eff, mfu_source=source, compute_s=compute, comm_bytes_per_gpu=comm_bytes, comm_s=comm,
        step_time_s=step, tokens_per_s=tokens_per_step / step, total_hours=hours, bubble=bubble,
        warnings=warnings,
    )


def total_steps(examples: int | None, max_steps: int | None, epochs: float | None, lay: Layout) -> int | None:
    """Optimizer steps the run makes (as the runtime counts them)."""
    if max_steps is not None:
        return max_steps
    if examples is None or epochs is None:
        return None
    per_step = lay.micro_batch * lay.grad_accum * lay.data_parallel
    return max(1, math.floor(epochs * (examples // per_step)))
