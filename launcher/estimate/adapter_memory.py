"""Model states of LoRA and QLoRA: a frozen base, and adapters that carry all of the training state.

Only the trainable parameters (adapters and `lora.modules_to_save`) have gradients and optimizer
state, so DeepSpeed's 18 bytes per parameter (16-bit weight, fp32 gradient partition, fp32 master
and Adam moments; docs/estimate.md) apply to them alone, partitioned as ZeRO partitions them. The
frozen base costs its weights only: 2 bytes per parameter in bf16/fp16 (partitioned under ZeRO-3,
whole on every GPU below it), or QLoRA's 4-bit storage (`method.quant4_bytes`): the packed weights
are stored in the model dtype (`bnb_4bit_quant_storage`, as PEFT's ZeRO-3 recipe sets it) so ZeRO-3
partitions them like any weight, while the quantization constants live in each layer's quant
state, outside DeepSpeed's view, whole on every GPU. DeepSpeed's estimator functions know no
frozen parameters, so no row here is marked as theirs.
"""

from __future__ import annotations

import math
from typing import Any

from launcher.estimate.layout import Layout
from launcher.estimate.memory import DS_BUFFER_FACTOR, WORKER_PROCESS_BYTES, MemoryEstimate, Row, stage_params
from launcher.estimate.method import Method
from launcher.estimate.params import ModelShape
from launcher.estimate.hardware import GiB


def _share(n: int, shape: ModelShape, lay: Layout) -> int:
    """The largest pipeline stage's share of `n` parameters (all of them without pipelining)."""
    if lay.pipeline_stages == 1:
        return n
    return math.ceil(n * stage_params(shape, lay.pipeline_stages) / shape.total)


def _partition(hist: tuple[tuple[int, int], ...], n: int) -> int:
    """Elements one of `n` ranks holds when each parameter is split into padded parts (ZeRO)."""
    return sum(math.ceil(size / n) * count for size, count in hist)


def base_rows(shape: ModelShape, m: Method, lay: Layout) -> list[Row]:
    """The frozen base on one GPU (none with parameter offload)."""
    if lay.offload_param != "none":
        return []
    w, N = lay.weight_bytes, lay.data_parallel
    z3 = lay.zero_stage == 3
    B, packed = _share(m.base_16bit, shape, lay), _share(m.quantized_bytes - m.quant_constants_bytes, shape, lay)
    if z3 and m.method == "lora" and lay.pipeline_stages == 1:
        b16 = w * shape.partition_numel(N)  # every base parameter split into N padded parts
    else:
        b16 = w * (math.ceil(B / N) if z3 else B)
    what = "embeddings, norms, LM head" if m.method == "qlora" else "the whole base"
    rows = [Row(f"frozen base in {w} B/param ({what}; " + (f"1/{N} partition)" if z3 else "replicated)"),
                "params", b16)]
    if m.method == "qlora":
        rows.append(Row("frozen base in 4 bits, packed weights (0.5 B/param; " +
                        (f"1/{N} partition)" if z3 else "replicated)"), "params", math.ceil(packed / N) if z3 else packed))
        rows.append(Row("4-bit quantization constants (absmax per 64 weights, whole on every GPU)", "params",
                        _share(m.quant_constants_bytes, shape, lay)))
    return rows


def trainable_rows(shape: ModelShape, m: Method, lay: Layout) -> list[Row]:
    """Adapters (and modules_to_save copies): their weights, fp32 gradients and optimizer states."""
    w, N, z = lay.weight_bytes, lay.data_parallel, lay.zero_stage
    opt_off = lay.offload_optimizer != "none"
    T = _share(m.trainable, shape, lay)
    part = _partition(m.numels, N) if lay.pipeline_stages == 1 else math.ceil(T / N)
    label = "adapters" + (" + modules_to_save" if m.trainable != m.adapters else "")
    rows = []
    if not (z == 3 and lay.offload_param != "none"):
        rows.append(Row(f"trainable {label}: {T:,} params in {w} B/param (" +
                        (f"1/{N} partition)" if z == 3 else "replicated)"), "params", w * (part if z == 3 else T)))
    if opt_off:
        return rows
    if z == 0:
        return rows + [Row(f"{label}: fp32 gradient buffer", "grads", 4 * T),
                       Row(f"{label}: optimizer (fp32 master + Adam m, v)", "optimizer", 12 * T)]
    grads = (w + 4) * part if z == 2 else 4 * part
    return rows + [Row(f"{label}: gradients ({'16-bit + ' if z == 2 else ''}fp32 partition, 1/{N})", "grads", grads),
                   Row(f"{label}: optimizer (fp32 master + Adam m, v; 1/{N})", "optimizer", 12 * part)]


def buffer_rows(shape: ModelShape, m: Method, lay: Layout, zcfg: dict[str, Any]) -> list[Row]:
    """ZeRO's buffers: gathered module and prefetch (ZeRO-3), gradient buckets."""
    w = lay.weight_bytes
    bucket = int(zcfg.get("reduce_bucket_size", 5e8))
    overlap = 2 if zcfg.get("overlap_comm") else 1
    rows = []
    if lay.zero_stage == 3:
        gathered = shape.largest_module * w * (2 if m.trainable != m.adapters else 1)
        rows.append(Row("largest module gathered, 16-bit weights (frozen: no gradients)", "buffers", gathered))
        rows.append(Row("ZeRO-3 prefetch bucket (stage3_prefetch_bucket_size)", "buffers",
                        int(zcfg.get("stage3_prefetch_bucket_size", 5e7)) * w))
        threshold = int(zcfg.get("stage3_param_persistence_threshold", 1e5))
        small = sum(n * c for n, c in shape.numels.items() if n < threshold)
        small += sum(n * c for n, c in m.numels if n < threshold)
        rows.append(Row("persistent small parameters kept whole (< param_persistence_threshold; most adapters)",
                        "buffers", small * w))
        rows.append(Row("gradient reduce-scatter bucket (reduce_bucket_size)" + (" x2, overlap_comm" if overlap == 2 else ""),
                        "buffers", bucket * w * overlap))
    elif lay.zero_stage in (1, 2):
        rows.append(Row("gradient reduce bucket (reduce_bucket_size" + (", x2 overlap_comm)" if overlap == 2 else ")"),
                        "buffers", bucket * w * overlap))
        rows.append(Row("weight all-gather bucket (allgather_bucket_size)", "buffers",
                        int(zcfg.get("allgather_bucket_size", 5e8)) * w))
    return rows


def host_rows(shape: ModelShape, m: Method, lay: Layout) -> list[Row]:
    """Host memory per node: DeepSpeed's host terms applied to the trainable parameters, plus the
    base where parameters are offloaded (x1.5, DeepSpeed's buffer factor)."""
    f, g, nodes, w = DS_BUFFER_FACTOR, lay.gpus_per_node, lay.nodes, lay.weight_bytes
    T = _share(m.trainable, shape, lay)
    base = w * m.base_16bit + m.quantized_bytes
    opt_off, par_off = lay.offload_optimizer != "none", lay.offload_param != "none"
    if lay.zero_stage == 3:
        states = shape.largest_module * 4 * g * f if not opt_off else T * 16 / nodes * f
        if par_off:
            states += (base + w * T) / nodes * f
    elif opt_off:
        states = T * max(4 * lay.world, 16) * f
    else:
        states = T * 4 * g * f
    rows = [Row("model states in host memory (DeepSpeed's terms for the trainable parameters" +
                (" + the offloaded base" if par_off else "") + ", x1.5 buffer factor)", "offload", int(states))]
    return rows + [Row(f"{g} worker processes (~{WORKER_PROCESS_BYTES / GiB:.0f} GiB each)", "overhead",
                       g * WORKER_PROCESS_BYTES)]


def adapter_states(shape: ModelShape, m: Method, lay: Layout, ds_config: dict[str, Any]) -> MemoryEstimate:
    """Weights, gradients, optimizer states and ZeRO buffers of a LoRA or QLoRA layout."""
    zcfg = ds_config.get("zero_optimization", {})
    rows = base_rows(shape, m, lay) + trainable_rows(shape, m, lay) + buffer_rows(shape, m, lay, zcfg)
    N = lay.data_parallel
    part = _partition(m.numels, N)
    est = MemoryEstimate(rows, host_rows(shape, m, lay))
    est.partitions = {"params": part if lay.zero_stage == 3 else m.trainable,
                      "grads": part if lay.zero_stage else m.trainable,
                      "optimizer_fp32": part if lay.zero_stage else m.trainable,
                      "adam_states": 2 * (part if lay.zero_stage else m.trainable)}
    nvme = "nvme" in (lay.offload_optimizer, lay.offload_param)
    if nvme:
        est.nvme_bytes_per_node = int(est.cpu_rows[0].bytes / DS_BUFFER_FACTOR)
        est.cpu_rows[0] = Row("model states staged through host memory (NVMe offload; states live on NVMe)",
                              "offload", int(est.cpu_rows[0].bytes / DS_BUFFER_FACTOR / 8))
    return est
