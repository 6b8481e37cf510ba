"""The layout search: when a recipe does not fit, the cheapest layouts that do.

It searches ZeRO stage, offload (optimizer, then parameters too), activation checkpointing mode,
micro-batch (gradient accumulation keeping the global batch) and the number of GPUs (1-8 on one
node, then whole nodes of 8), re-estimates each candidate in full (GPU memory, host RAM per node,
step time) and keeps only those that fit, cheapest first: dollars per token at the GPU type's
price (cheapest on-demand offer, or the on-prem $/GPU-hour), else GPU-hours per token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from launcher.errors import UserError
from launcher.estimate.layout import Layout

SLOW_FACTOR = 3.0
"""A suggestion more than this many times slower (tokens/s) than the recipe's layout is marked."""
MAX_SUGGESTIONS = 8


@dataclass(frozen=True)
class Check:
    """What one layout needs and how fast it runs (made by the estimator for each candidate)."""

    per_gpu_total_bytes: int
    gpu_fits: bool
    cpu_bytes_per_node: int
    host_fits: bool
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    total_hours: float | None = None

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits


@dataclass
class Suggestion:
    change: str
    """Recipe overrides (key=value ...) that make the change."""
    description: str
    per_gpu_total_bytes: int
    fits: bool
    """GPU memory and the node's host RAM both hold it (the search returns only these)."""
    gpu_fits: bool = True
    cpu_bytes_per_node: int = 0
    host_fits: bool = True
    step_time_s: float | None = None
    total_hours: float | None = None
    slowdown: float | None = None
    """Recipe layout's tokens/s over this one's (2.0: takes twice as long per token)."""
    gpus: int = 0
    usd_per_million_tokens: float | None = None
    total_usd: float | None = None
    """The whole run at the GPU type's price (None: steps or price unknown)."""
    gpu_seconds_per_token: float | None = None
    layout: Layout | None = None

    @property
    def slow(self) -> bool:
        return self.slowdown is not None and self.slowdown > SLOW_FACTOR

    def overrides(self) -> list[str]:
        return self.change.split()

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "overrides": self.overrides(), "description": self.description,
                "per_gpu_total_bytes": self.per_gpu_total_bytes, "fits": self.fits, "gpu_fits": self.gpu_fits,
                "cpu_bytes_per_node": self.cpu_bytes_per_node, "host_fits": self.host_fits,
                "step_time_s": self.step_time_s, "total_hours": self.total_hours, "slowdown": self.slowdown,
                "slow": self.slow, "gpus": self.gpus, "usd_per_million_tokens": self.usd_per_million_tokens,
                "total_usd": self.total_usd, "gpu_seconds_per_token": self.gpu_seconds_per_token}


METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA (trains adapters, base frozen in 16-bit)",
                "qlora": "QLoRA (trains adapters, base in 4 bits)"}
METHOD_SUGGESTIONS = 3
"""At most this many of the listed layouts change `train.method` (they train something else)."""


def _diff(base: Layout, lay: Layout) -> tuple[str, str]:
    keys, words = [], []
    if lay.method != base.method:
        keys.append(f"train.method={lay.method}")
        words.append(f"{METHOD_WORDS[lay.method]} instead of {METHOD_WORDS[base.method].split(' (')[0]}")
    if lay.ckpt != base.ckpt:
        keys.append(f"model.activation_checkpointing={lay.ckpt}")
        words.append(f"{lay.ckpt} activation checkpointing" if lay.grad_ckpt else "no activation checkpointing")
    if lay.zero_stage != base.zero_stage:
        keys.append(f"parallelism.zero_stage={lay.zero_stage}")
        words.append(f"ZeRO-{lay.zero_stage}")
    if lay.offload_optimizer != base.offload_optimizer:
        keys.append(f"parallelism.offload_optimizer={lay.offload_optimizer}")
        words.append("optimizer states in CPU memory" if lay.offload_optimizer != "none" else "optimizer on GPU")
    if lay.offload_param != base.offload_param:
        keys.append(f"parallelism.offload_param={lay.offload_param}")
        words.append("parameters in CPU memory" if lay.offload_param != "none" else "parameters on GPU")
    if lay.micro_batch != base.micro_batch:
        keys.append(f"train.micro_batch_size={lay.micro_batch}")
    if lay.grad_accum != base.grad_accum:
        keys.append(f"train.grad_accum={lay.grad_accum}")
    if (lay.micro_batch, lay.grad_accum) != (base.micro_batch, base.grad_accum):
        words.append(f"micro-batch {lay.micro_batch} with {lay.grad_accum}x accumulation")
    if lay.gpus_per_node != base.gpus_per_node:
        keys.append(f"resources.gpus_per_node={lay.gpus_per_node}")
    if lay.nodes != base.nodes:
        keys.append(f"resources.nodes={lay.nodes}")
    if lay.world != base.world:
        words.append(f"{lay.world} GPUs ({lay.nodes} x {lay.gpus_per_node})")
    g0 = base.micro_batch * base.grad_accum * base.data_parallel
    g1 = lay.micro_batch * lay.grad_accum * lay.data_parallel
    if g1 != g0:
        words.append(f"global batch {g0} -> {g1} sequences")
    return " ".join(keys), ", ".join(words)


def _gpu_counts(base: Layout, max_nodes: int) -> list[tuple[int, int]]:
    """(nodes, GPUs per node): the recipe's, 1-8 GPUs on one node, then whole nodes."""
    per_node = max(8, base.gpus_per_node)
    counts = [(base.nodes, base.gpus_per_node)] + [(1, g) for g in (1, 2, 4, 8) if g <= per_node]
    n = 2
    while n <= max_nodes:
        counts.append((n, per_node))
        n *= 2
    return list(dict.fromkeys(counts))


def _batches(base: Layout, dp: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) keeping the global batch on `dp` data-parallel ranks; where it
    cannot be kept (more ranks than sequences per step), accumulation 1 (the batch grows)."""
    glob = base.micro_batch * base.grad_accum * base.data_parallel
    out = []
    for mb in sorted({1, 2, 4, 8, 16, base.micro_batch}):
        if mb > base.micro_batch:
            continue
        if glob % (mb * dp) == 0:
            out.append((mb, glob // (mb * dp)))
        elif mb * dp > glob and mb == 1:
            out.append((1, 1))
    return out


def candidates(base: Layout, *, max_nodes: int = 64, methods: tuple[str, ...] = ()) -> list[Layout]:
    """Every layout the search considers (the recipe's own included); `methods`: other values of
    `train.method` to try, on the recipe's own GPU count only (the question is then "can these
    GPUs train it at all")."""
    zeros = (0, 1) if base.pipeline_stages > 1 else (0, 1, 2, 3)
    offloads = [("none", "none"), ("cpu", "none"), ("cpu", "cpu")]
    out = []
    counts = [(m, c) for m in (base.method,) for c in _gpu_counts(base, max_nodes)]
    counts += [(m, (base.nodes, base.gpus_per_node)) for m in methods]
    for (method, (nodes, gpn)), z, (oo, op), ckpt in itertools.product(
            counts, zeros, offloads, ("none", "selective", "full")):
        if (oo != "none" and z == 0) or (op != "none" and z != 3):
            continue
        if (nodes * gpn) % base.pipeline_stages:
            continue
        lay = base.with_(nodes=nodes, gpus_per_node=gpn, zero_stage=z, offload_optimizer=oo, offload_param=op,
                         ckpt=ckpt, method=method)
        for mb, acc in _batches(base, lay.data_parallel):
            out.append(lay.with_(micro_batch=mb, grad_accum=acc))
    return list(dict.fromkeys(out))


def suggest(base: Layout, check: Callable[[Layout], Check], *, usd_per_gpu_hour: float | None = None,
            max_nodes: int = 64, limit: int = MAX_SUGGESTIONS, methods: tuple[str, ...] = ()) -> list[Suggestion]:
    """The cheapest layouts that fit (never one that does not), each re-estimated by `check`:
    those of the recipe's method first, then at most METHOD_SUGGESTIONS with another `methods`."""
    base_tps = check(base).tokens_per_s
    found: list[Suggestion] = []
    for lay in candidates(base, max_nodes=max_nodes, methods=methods):
        if lay == base:
            continue
        try:
            c = check(lay)
        except UserError:  # e.g. more data-parallel ranks than examples
            continue
        if not c.fits:
            continue
        change, words = _diff(base, lay)
        slowdown = base_tps / c.tokens_per_s if base_tps and c.tokens_per_s else None
        gpu_s_per_tok = lay.world / c.tokens_per_s if c.tokens_per_s else None
        per_mtok = usd_per_gpu_hour * gpu_s_per_tok / 3600 * 1e6 if usd_per_gpu_hour and gpu_s_per_tok else None
        total = usd_per_gpu_hour * lay.world * c.total_hours if usd_per_gpu_hour and c.total_hours else None
        found.append(Suggestion(change, words, c.per_gpu_total_bytes, True, c.gpu_fits, c.cpu_bytes_per_node,
                                c.host_fits, c.step_time_s, c.total_hours, slowdown, lay.world, per_mtok, total,
                                gpu_s_per_tok, lay))
    # cheapest per token first (GPU-seconds per token when no price), then fewer changes, less memory
    found.sort(key=lambda s: (s.gpu_seconds_per_token or float("inf"), s.change.count("="),
                              s.per_gpu_total_bytes))
    same = [s for s in found if s.layout is None or s.layout.method == base.method]
    other = [s for s in found if s.layout is not None and s.layout.method != base.method]
    other = _one_per_method(other)[:METHOD_SUGGESTIONS]
    return same[:limit - len(other)] + other


def _one_per_method(found: list[Suggestion]) -> list[Suggestion]:
    """The cheapest layout of each other method first, then the next ones."""
    firsts = list({s.layout.method: s for s in reversed(found)}.values())[::-1]
    return firsts + [s for s in found if s not in firsts]
