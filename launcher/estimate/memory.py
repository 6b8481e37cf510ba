"""Memory per GPU and CPU memory per node for a layout.

Model states follow DeepSpeed's own estimators (`estimate_zero{2,3}_model_states_mem_needs` in
deepspeed.runtime.zero): the rows marked `deepspeed=True` add up to exactly their figures. Every
other row (activations, communication buckets, prefetch, partition padding, CUDA context,
allocator slack) is what those estimators leave out, shown on its own line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from launcher.estimate import activations as act
from launcher.estimate.hardware import GiB
from launcher.estimate.layout import Layout
from launcher.estimate.method import Method
from launcher.estimate.params import ModelShape

CATEGORIES = ("params", "grads", "optimizer", "activations", "buffers", "overhead")

DS_BUFFER_FACTOR = 1.5
"""DeepSpeed's `additional_buffer_factor` for host memory."""
CUDA_CONTEXT_BYTES = 1 * GiB
"""CUDA context, cuBLAS workspaces and NCCL buffers per GPU process (typically 0.5-1.5 GiB)."""
ALLOCATOR_SLACK = 0.10
"""Caching-allocator fragmentation, as a fraction of activations and buffers."""
WORKER_PROCESS_BYTES = 3 * GiB
"""Host memory of one training worker process (Python, torch, CUDA libraries, data)."""


@dataclass
class Row:
    name: str
    category: str
    bytes: int
    deepspeed: bool = False
    """Part of DeepSpeed's model-states estimate (the others are what it leaves out)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "category": self.category, "bytes": self.bytes, "deepspeed": self.deepspeed}


@dataclass
class MemoryEstimate:
    rows: list[Row]
    cpu_rows: list[Row]
    nvme_bytes_per_node: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    """Elements per rank of the ZeRO partitions (params, grads, optimizer states)."""
    notes: list[str] = field(default_factory=list)
    peak_phase: str = "backward"
    """The phase of the step at the peak: forward, backward (or optimizer: the trace can say so)."""

    @property
    def per_gpu(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for r in self.rows:
            out[r.category] += r.bytes
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def cpu_per_node(self) -> int:
        return sum(r.bytes for r in self.cpu_rows)

    @property
    def deepspeed_gpu(self) -> int:
        return sum(r.bytes for r in self.rows if r.deepspeed)

    @property
    def deepspeed_cpu(self) -> int:
        return sum(r.bytes for r in self.cpu_rows if r.deepspeed)


def stage_params(shape: ModelShape, stages: int) -> int:
    """Parameters of the largest pipeline stage: its share of the blocks plus the embeddings
    (both ends hold a copy of tied embeddings; otherwise input and output head are split)."""
    if stages == 1:
        return shape.total
    other = shape.total - shape.num_layers * shape.per_layer
    return math.ceil(shape.num_layers / stages) * shape.per_layer + (other if shape.tied else math.ceil(other / 2))


_States = tuple[list[Row], float, dict[str, int]]
"""Rows on the GPU, DeepSpeed's host-memory figure, per-rank partition sizes."""


def _zero3_states(shape: ModelShape, lay: Layout, zcfg: dict[str, Any], P: int) -> _States:
    """ZeRO-3: every state partitioned 1/N, the gathered largest module, prefetch and persistence."""
    w = lay.weight_bytes
    N = lay.data_parallel
    g, nodes = lay.gpus_per_node, lay.nodes
    f = DS_BUFFER_FACTOR
    opt_off = lay.offload_optimizer != "none"
    par_off = lay.offload_param != "none"
    grad_copy = 4  # DeepSpeed keeps an fp32 gradient partition next to the master weights
    rows: list[Row] = []
    Lg = shape.largest_module
    # DeepSpeed: GPU 4*Lg + 18P/N (no offload), 4*Lg + 2P/N (optimizer offload), 4*Lg (both)
    states = int((w + grad_copy + 12) * P / N)
    p_b, o_b = int(w * P / N), int(12 * P / N)
    if not opt_off and not par_off:
        rows += [Row(f"weights ({w} B/param, 1/{N} partition)", "params", p_b, True),
                 Row("gradients (fp32 partition)", "grads", states - p_b - o_b, True),
                 Row("optimizer (fp32 master + Adam m, v; 1/N)", "optimizer", o_b, True)]
        cpu_ds = Lg * 4 * g * f  # zero_init: the project builds ZeRO-3 models inside zero.Init
    elif opt_off and not par_off:
        rows.append(Row(f"weights ({w} B/param, 1/{N} partition)", "params", int(w * P / N), True))
        cpu_ds = P * 16 * (1 / nodes) * f
    elif opt_off and par_off:
        cpu_ds = P * (16 + w) * (1 / nodes) * f
    else:  # parameters offloaded, optimizer on GPU: not covered by DeepSpeed's estimator
        rows += [Row("gradients (fp32 partition)", "grads", int(grad_copy * P / N)),
                 Row("optimizer (fp32 master + Adam m, v; 1/N)", "optimizer", o_b)]
        cpu_ds = P * w * (1 / nodes) * f
    rows.append(Row("largest module gathered, 16-bit weights + grads (DeepSpeed's 4 x largest layer)",
                    "buffers", 4 * Lg, True))
    # per-parameter padding: each parameter is split into N parts of ceil(numel/N) elements
    part = shape.partition_numel(N) if lay.pipeline_stages == 1 else math.ceil(P / N)
    exact = {"params": 0 if par_off else w, "grads": 0 if opt_off else grad_copy,
             "optimizer": 0 if opt_off else 12}
    for cat, per_elem in exact.items():
        have = sum(r.bytes for r in rows if r.category == cat)
        if per_elem and per_elem * part > have:
            rows.append(Row(f"partition padding, {cat} (each parameter rounded up to a multiple of N)",
                            cat, per_elem * part - have))
    prefetch = int(zcfg.get("stage3_prefetch_bucket_size", 5e7))
    rows.append(Row("ZeRO-3 prefetch bucket (stage3_prefetch_bucket_size)", "buffers", prefetch * w))
    threshold = int(zcfg.get("stage3_param_persistence_threshold", 1e5))
    persistent = sum(n * c for n, c in shape.numels.items() if n < threshold)
    if persistent:
        rows.append(Row("persistent small parameters kept whole (< param_persistence_threshold)",
                        "buffers", int(persistent * w)))
    bucket = int(zcfg.get("reduce_bucket_size", 5e8))
    rows.append(Row("gradient reduce-scatter bucket (reduce_bucket_size)" +
                    (" x2, overlap_comm" if zcfg.get("overlap_comm") else ""),
                    "buffers", bucket * w * (2 if zcfg.get("overlap_comm") else 1)))
    partitions = {"params": part, "grads": part, "optimizer_fp32": part, "adam_states": 2 * part}
    return rows, cpu_ds, partitions


def _zero12_states(shape: ModelShape, lay: Layout, zcfg: dict[str, Any], P: int) -> _States:
    """ZeRO-1/2: replicated weights, partitioned optimizer (and ZeRO-2 gradients), the buckets."""
    w, N, g, f = lay.weight_bytes, lay.data_parallel, lay.gpus_per_node, DS_BUFFER_FACTOR
    opt_off = lay.offload_optimizer != "none"
    grad_copy = 4  # DeepSpeed keeps an fp32 gradient partition next to the master weights
    rows: list[Row] = []
    # DeepSpeed ZeRO-2: GPU 2P + 18P/N; optimizer offload: GPU 2P, CPU P*max(4*GPUs, 16)*1.5
    rows.append(Row(f"weights ({w} B/param, replicated)", "params", w * P, True))
    if not opt_off:
        states = int((w + grad_copy + 12) * P / N)
        o_b = int(12 * P / N)
        if lay.zero_stage == 2:
            rows.append(Row(f"gradients ({w}-bit + fp32 partition, 1/{N})", "grads", states - o_b, True))
        else:  # the full 16-bit gradients: a phase of the step (activation_rows)
            rows.append(Row(f"gradients (fp32 partition 1/{N})", "grads", int(grad_copy * P / N)))
        rows.append(Row("optimizer (fp32 master + Adam m, v; 1/N)", "optimizer", o_b, True))
        cpu_ds = P * 4 * g * f
    else:
        cpu_ds = P * max(4 * lay.world, 16) * f
    zcfg_bucket = int(zcfg.get("reduce_bucket_size", 5e8))
    overlap = 2 if zcfg.get("overlap_comm") else 1
    rows.append(Row("gradient reduce bucket (reduce_bucket_size" + (", x2 overlap_comm)" if overlap == 2 else ")"),
                    "buffers", zcfg_bucket * w * overlap))
    rows.append(Row("weight all-gather bucket (allgather_bucket_size)", "buffers",
                    int(zcfg.get("allgather_bucket_size", 5e8)) * w))
    part = math.ceil(P / N)
    partitions = {"params": P, "grads": part, "optimizer_fp32": part, "adam_states": 2 * part}
    return rows, cpu_ds, partitions


def _zero0_states(shape: ModelShape, lay: Layout, zcfg: dict[str, Any], P: int) -> _States:
    """No ZeRO: everything replicated on every GPU."""
    w, g, f = lay.weight_bytes, lay.gpus_per_node, DS_BUFFER_FACTOR
    rows: list[Row] = []
    fp32_grads = 4 if w < 4 else 0  # bf16/fp16 optimizer accumulates fp32 gradients
    master = 4 if w < 4 else 0
    rows += [Row(f"weights ({w} B/param, replicated)", "params", w * P)]
    if fp32_grads:
        rows.append(Row("fp32 gradient accumulation buffer (replicated)", "grads", fp32_grads * P))
    rows.append(Row("optimizer (Adam m, v" + (" + fp32 master" if master else "") + ", replicated)",
                    "optimizer", (8 + master) * P))
    cpu_ds = P * 4 * g * f
    partitions = {"params": P, "grads": P, "optimizer_fp32": P, "adam_states": 2 * P}
    return rows, cpu_ds, partitions


def model_states(shape: ModelShape, lay: Layout, ds_config: dict[str, Any]) -> MemoryEstimate:
    """Weights, gradients and optimizer states (DeepSpeed's terms) plus ZeRO's buffers."""
    P = stage_params(shape, lay.pipeline_stages)
    g, f = lay.gpus_per_node, DS_BUFFER_FACTOR
    zcfg = ds_config.get("zero_optimization", {})
    # each returns its rows, DeepSpeed's host-memory figure and the per-rank partition sizes
    states = {3: _zero3_states, 2: _zero12_states, 1: _zero12_states}.get(lay.zero_stage, _zero0_states)
    rows, cpu_ds, partitions = states(shape, lay, zcfg, P)
    cpu: list[Row] = []
    nvme = 0
    nvme_off = "nvme" in (lay.offload_optimizer, lay.offload_param)
    if nvme_off:
        nvme = int(cpu_ds / f)
        cpu.append(Row("model states staged through host memory (NVMe offload; states live on NVMe)",
                       "offload", int(cpu_ds / f / 8)))
    else:
        cpu.append(Row("model states in host memory (DeepSpeed's estimate, x1.5 buffer factor)",
                       "offload", int(cpu_ds), True))
    cpu.append(Row(f"{g} worker processes (~{WORKER_PROCESS_BYTES / GiB:.0f} GiB each)", "overhead",
                   g * WORKER_PROCESS_BYTES))
    est = MemoryEstimate(rows, cpu, nvme_bytes_per_node=nvme, partitions=partitions)
    return est


def transient_grads(shape: ModelShape, lay: Layout, trainable: int | None = None) -> int:
    """16-bit gradients that exist only from backward until the optimizer step: ZeRO-0/1 keep them
    whole (ZeRO-2/3 reduce-scatter them through the buckets as backward makes them). `trainable`:
    the parameters with gradients when not all of them (LoRA), before the pipeline split."""
    if lay.zero_stage > 1:
        return 0
    P = stage_params(shape, lay.pipeline_stages)
    if trainable is not None:
        P = math.ceil(trainable * P / shape.total)
    return lay.weight_bytes * P


def activation_rows(shape: ModelShape, lay: Layout, method: Method | None = None) -> tuple[list[Row], str]:
    """The activation rows (and ZeRO-0/1's 16-bit gradients) at the step's peak, and its phase.

    Peak = the largest of: forward (kept activations + the loss), the start of backward (kept
    activations + the loss's gradients, or one block's backward) and the end of backward (every
    16-bit gradient + the last block's backward). The 16-bit gradients are not all live at the
    activation peak: adding them to it overstated 8B by 15 GiB. Terms: launcher/estimate/activations.py.
    """
    seqs = method.sequences if method else 1
    extra = act.lora_bytes(method.adapter_inputs, method.rank, method.dropout, lay) if method and not method.full \
        else (0, 0)
    t = act.terms(shape, lay.with_(micro_batch=lay.micro_batch * seqs), extra, method is None or method.head_trains)
    layers = math.ceil(shape.num_layers / lay.pipeline_stages)
    label = {"none": "all block activations", "full": "block inputs (full checkpointing)",
             "selective": "matmul outputs + block inputs (selective checkpointing)"}[lay.ckpt]
    if extra[0]:
        label += " + LoRA's rank-sized outputs" + (" and dropout copies" if lay.ckpt == "none" and method.dropout
                                                   else "")
    pairs = f" x {seqs} sequences (chosen + rejected)" if seqs > 1 else ""
    what = f"{label}: {layers} layers x micro-batch {lay.micro_batch}{pairs} x {lay.seq_len} tokens"
    working = ("backward of one block: recomputed + its gradients" if lay.grad_ckpt
               else "backward of one block: its gradients")
    hg = act.hidden_grad_bytes(shape, lay)
    loss = (f"logits of one {lay.chunk_tokens}-token chunk of the chunked loss (fp32, log-softmax, gradients)"
            if lay.chunked_loss else
            f"logits over the {shape.vocab:,}-token vocabulary (16-bit + fp32, log-softmax, gradients)")
    loss_rows = [Row(loss, "activations", t.loss_backward - hg)]
    if hg:
        loss_rows.append(Row("gradient of the final hidden states (chunked loss)", "activations", hg))
    stored = [Row(what, "activations", t.stored)]
    if lay.pipeline_stages > 1:
        in_flight = min(lay.pipeline_stages, lay.grad_accum)
        if in_flight * t.stored + t.working > t.stored + t.loss_backward:
            stored = [Row(f"{what} x {in_flight} micro-batches in flight (first stage)", "activations",
                          in_flight * t.stored)]
    grads16 = transient_grads(shape, lay, None if method is None or method.full else method.trainable)
    phases = [
        ("forward", stored + [Row(loss + ", forward", "activations", t.loss_forward)]),
        ("backward", stored + loss_rows if t.loss_backward >= t.working
         else stored + [Row(working, "activations", t.working)]),
        ("backward", [Row("16-bit gradients, all live at the end of backward (freed by the step)", "grads",
                          grads16), Row(working, "activations", t.working)]),
    ]
    if method and method.reference_sequences:
        kept = lay.micro_batch * seqs * lay.seq_len * shape.vocab * 4
        phases.append(("forward", stored + [Row("policy log-probs kept for backward (fp32 logits)", "activations",
                                                kept)] + reference_rows_forward(shape, lay, method)))
    phase, rows = max(phases, key=lambda pr: sum(r.bytes for r in pr[1]))
    if lay.attn == "eager":
        rows = rows + [Row("  of which eager attention scores (s x s per head, per layer)", "info",
                           (layers if not lay.grad_ckpt else 1) * t.scores)]
    return [r for r in rows if r.bytes or r.category == "activations"], phase


def reference_rows_forward(shape: ModelShape, lay: Layout, method: Method) -> list[Row]:
    """The reference's forward without gradients, right after the policy's (launcher.runtime.
    preference): one block at a time, then its logits over the whole vocabulary (16-bit, the fp32
    copy and logsumexp's temporary)."""
    n = method.reference_sequences
    tok = lay.micro_batch * lay.seq_len * n
    t = act.terms(shape, lay.with_(micro_batch=lay.micro_batch * n, ckpt="none"))
    a = lay.weight_bytes
    return [Row(f"reference forward, one block at a time ({n} sequence{'s' if n > 1 else ''} per example)",
                "activations", t.per_block),
            Row(f"reference log-probs over the {shape.vocab:,}-token vocabulary (16-bit + fp32 logits)",
                "activations", tok * shape.vocab * (a + 8))]


def reference_rows(method: Method, lay: Layout) -> list[Row]:
    """A frozen copy of the starting model as DPO/KTO's reference (`preference.reference: copy`)."""
    if method.reference != "copy" or not method.reference_bytes:
        return []
    z3 = lay.zero_stage == 3
    share = math.ceil(method.reference_bytes / lay.data_parallel) if z3 else method.reference_bytes
    if lay.pipeline_stages > 1:
        share = math.ceil(share / lay.pipeline_stages)
    return [Row("reference policy: frozen copy of the starting model (" +
                (f"1/{lay.data_parallel} partition)" if z3 else "whole on every GPU)"), "params", share)]


def estimate_memory(shape: ModelShape, lay: Layout, ds_config: dict[str, Any],
                    method: Method | None = None) -> MemoryEstimate:
    """Memory per GPU and host memory per node; `method` (None: full fine-tuning of SFT/pretraining)
    adds what LoRA, QLoRA and the preference tasks change (launcher/estimate/method.py)."""
    if method is not None and not method.full:
        from launcher.estimate.adapter_memory import adapter_states

        est = adapter_states(shape, method, lay, ds_config)
    else:
        est = model_states(shape, lay, ds_config)
    if method is not None:
        est.rows += reference_rows(method, lay)
    rows, est.peak_phase = activation_rows(shape, lay, method)
    est.rows += [r for r in rows if r.category != "info"]
    dynamic = sum(r.bytes for r in est.rows if r.category in ("activations", "buffers"))
    est.rows.append(Row("CUDA context, cuBLAS workspace, NCCL", "overhead", CUDA_CONTEXT_BYTES))
    est.rows.append(Row(f"allocator fragmentation ({ALLOCATOR_SLACK:.0%} of activations + buffers)",
                        "overhead", int(ALLOCATOR_SLACK * dynamic)))
    return est
