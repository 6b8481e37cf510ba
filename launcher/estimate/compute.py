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
from launcher.estimate.method import Method
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


def flops_per_token(shape: ModelShape, lay: Layout, method: Method | None = None) -> float:
    """Per token of a sequence trained with gradients (DPO: each of chosen and rejected).

    Full: forward 2N, backward 4N (activation and weight gradients). LoRA and QLoRA: the frozen
    base needs no weight gradients: forward 2N, backward 2N, plus 6 per trainable parameter (the
    adapters train fully). Forward-only sequences (the reference policy, KTO's KL completions)
    add 2N and the attention forward each, per trained sequence."""
    n_matmul = shape.total - (0 if shape.tied else shape.vocab * shape.hidden)
    attn = 12 * shape.num_layers * shape.heads * shape.head_dim * lay.seq_len
    full = method is None or method.full
    forward = 2 * n_matmul + attn / 3 + (0 if full else 2 * method.trainable)
    base = 6 * n_matmul + attn if full else 4 * n_matmul + 6 * method.trainable + attn
    if lay.ckpt == "selective":  # recomputes the attention core's forward (a third of its term)
        base += attn / 3
    elif lay.grad_ckpt:  # one more forward
        base += forward
    if method is not None and method.no_grad_sequences:
        base += method.no_grad_sequences / method.sequences * (2 * n_matmul + attn / 3)
    return base


def dequant_passes(lay: Layout, method: Method | None) -> int:
    """QLoRA: how often each micro-batch dequantizes the 4-bit base to the model dtype (bitsandbytes
    does it for every matmul, forward and backward): forward, backward, the recompute of full
    checkpointing, and each forward-only pass (reference with adapters off, KTO's KL forward)."""
    if method is None or method.method != "qlora":
        return 0
    passes = 2 + (1 if lay.ckpt == "full" else 0)
    if method.reference in ("base", "copy"):
        passes += 1
    return passes + (1 if method.task == "kto" else 0)


def comm_bytes_per_gpu(shape: ModelShape, lay: Layout, method: Method | None = None) -> float:
    """Bytes each GPU sends per optimizer step in ZeRO's collectives (ring algorithms)."""
    N = lay.data_parallel
    if N == 1:
        return 0.0
    w = lay.weight_bytes
    ring = (N - 1) / N
    P = shape.total / lay.pipeline_stages
    if method is not None and (not method.full or method.reference == "copy"):
        return _method_comm(lay, method, ring, w) / lay.pipeline_stages
    if lay.zero_stage == 3:
        # every micro-batch: all-gather weights for forward and backward (and the recompute),
        # reduce-scatter gradients
        per_micro = (3 + (1 if lay.ckpt == "full" else 0)) * w * P * ring  # selective recomputes no matmul
        return per_micro * lay.grad_accum
    if lay.zero_stage == 2:
        return lay.grad_accum * w * P * ring + w * P * ring  # reduce-scatter per micro-batch + all-gather
    return 2 * w * P * ring  # all-reduce of the gradients once per step


def _method_comm(lay: Layout, m: Method, ring: float, w: int) -> float:
    """ZeRO's traffic when not every parameter trains, or with a reference copy: ZeRO-3 gathers the
    frozen base (as stored: 16-bit, or QLoRA's packed 4-bit) for every forward and backward (and the
    recompute) and reduce-scatters only the trainable gradients; ZeRO 0-2 move only those."""
    T = m.trainable
    base = w * m.base_16bit + (m.quantized_bytes - m.quant_constants_bytes) if not m.full else 0
    weights = base + w * T
    per_micro = 0.0
    if lay.zero_stage == 3:
        passes = 2 + (1 if lay.ckpt == "full" else 0)
        per_micro = passes * weights * ring + w * T * ring
        if m.reference == "base":
            per_micro += weights * ring
        per_micro += m.reference_bytes * ring  # a partitioned reference copy is gathered for its forward
        return per_micro * lay.grad_accum
    if lay.zero_stage == 2:
        return lay.grad_accum * w * T * ring + w * T * ring
    return 2 * w * T * ring


def estimate_time(shape: ModelShape, lay: Layout, gpu: Gpu, *, steps: int | None, avg_seq_len: int | None = None,
                  mfu: float | None = None, network_gbps: float | None = None,
                  method: Method | None = None) -> TimeEstimate:
    seq = avg_seq_len or lay.seq_len
    seqs = method.sequences if method else 1
    tokens_per_step = lay.micro_batch * lay.grad_accum * lay.data_parallel * seq * seqs
    fpt = flops_per_token(shape, lay.with_(seq_len=seq), method)
    source = "given" if mfu is not None else "default for this layout"
    eff = mfu if mfu is not None else default_mfu(lay)
    bubble = 0.0
    if lay.pipeline_stages > 1:
        bubble = (lay.pipeline_stages - 1) / (lay.grad_accum + lay.pipeline_stages - 1)
    compute = tokens_per_step * fpt / (lay.world * gpu.peak_tflops * 1e12 * eff) / (1 - bubble)
    dequant = dequant_seconds(shape, lay, gpu, method)
    compute += dequant
    comm_bytes = comm_bytes_per_gpu(shape, lay, method)
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
    if dequant:
        warnings.append(f"QLoRA: dequantizing the 4-bit base adds {dequant:.2f} s per step (memory traffic "
                        f"at {gpu.memory_gbps:,.0f} GB/s; bitsandbytes' kernels may be slower, --calibrate)")
    return TimeEstimate(
        flops_per_token=fpt, tokens_per_step=tokens_per_step, steps=steps, total_tokens=total_tokens,
        mfu=eff, mfu_source=source, compute_s=compute, comm_bytes_per_gpu=comm_bytes, comm_s=comm,
        step_time_s=step, tokens_per_s=tokens_per_step / step, total_hours=hours, bubble=bubble,
        warnings=warnings,
    )


DEQUANT_BYTES_PER_PARAM = 2.5
"""Bytes moved per 4-bit weight each time it is dequantized: the packed half byte read, the
16-bit weight written (the matmul's own read of it is in the efficiency, as for any weight)."""
MEMORY_EFFICIENCY = 0.7
"""Fraction of the GPU's memory bandwidth an elementwise dequantization kernel reaches."""


def dequant_seconds(shape: ModelShape, lay: Layout, gpu: Gpu, method: Method | None) -> float:
    """QLoRA's dequantization time per step on one GPU: every pass over the base, every micro-batch."""
    passes = dequant_passes(lay, method)
    if not passes or not gpu.memory_gbps:
        return 0.0
    q = method.quantized / lay.pipeline_stages
    return passes * lay.grad_accum * q * DEQUANT_BYTES_PER_PARAM / (gpu.memory_gbps * 1e9 * MEMORY_EFFICIENCY)


def total_steps(examples: int | None, max_steps: int | None, epochs: float | None, lay: Layout) -> int | None:
    """Optimizer steps the run makes (as the runtime counts them)."""
    if max_steps is not None:
        return max_steps
    if examples is None or epochs is None:
        return None
    per_step = lay.micro_batch * lay.grad_accum * lay.data_parallel
    return max(1, math.floor(epochs * (examples // per_step)))
