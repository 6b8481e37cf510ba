"""Changes that would make a recipe fit, each with its own new estimate: GPU memory, host RAM
per node (offload moves states there) and speed, next to the recipe's own layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from launcher.estimate.layout import Layout

SLOW_FACTOR = 3.0
"""A suggestion more than this many times slower (tokens/s) than the recipe's layout is marked."""


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
    """Recipe overrides (key=value ...) or options that make the change."""
    description: str
    per_gpu_total_bytes: int
    fits: bool
    """GPU memory and the node's host RAM both hold it."""
    gpu_fits: bool = True
    cpu_bytes_per_node: int = 0
    host_fits: bool = True
    step_time_s: float | None = None
    total_hours: float | None = None
    slowdown: float | None = None
    """Recipe layout's tokens/s over this one's (2.0: takes twice as long per token)."""

    @property
    def slow(self) -> bool:
        return self.slowdown is not None and self.slowdown > SLOW_FACTOR

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "description": self.description,
                "per_gpu_total_bytes": self.per_gpu_total_bytes, "fits": self.fits, "gpu_fits": self.gpu_fits,
                "cpu_bytes_per_node": self.cpu_bytes_per_node, "host_fits": self.host_fits,
                "step_time_s": self.step_time_s, "total_hours": self.total_hours, "slowdown": self.slowdown,
                "slow": self.slow}


def _diff(base: Layout, lay: Layout) -> tuple[str, str]:
    keys, words = [], []
    if lay.grad_ckpt != base.grad_ckpt:
        keys.append("model.gradient_checkpointing=true")
        words.append("activation checkpointing")
    if lay.zero_stage != base.zero_stage:
        keys.append(f"parallelism.zero_stage={lay.zero_stage}")
        words.append(f"ZeRO-{lay.zero_stage}")
    if lay.offload_optimizer != base.offload_optimizer:
        keys.append(f"parallelism.offload_optimizer={lay.offload_optimizer}")
        words.append("optimizer states in CPU memory")
    if lay.offload_param != base.offload_param:
        keys.append(f"parallelism.offload_param={lay.offload_param}")
        words.append("parameters in CPU memory")
    if lay.micro_batch != base.micro_batch:
        keys += [f"train.micro_batch_size={lay.micro_batch}", f"train.grad_accum={lay.grad_accum}"]
        words.append(f"micro-batch {lay.micro_batch} with {lay.grad_accum}x accumulation (same global batch)")
    if lay.gpus_per_node != base.gpus_per_node:
        keys.append(f"resources.gpus_per_node={lay.gpus_per_node}")
    if lay.nodes != base.nodes:
        keys.append(f"resources.nodes={lay.nodes}")
    if lay.world != base.world:
        words.append(f"{lay.world} GPUs ({lay.nodes} x {lay.gpus_per_node})")
    return " ".join(keys), ", ".join(words)


def suggest(base: Layout, check: Callable[[Layout], Check], *, max_nodes: int = 64) -> list[Suggestion]:
    """Single changes first, then cumulative ones, then more GPUs; each re-estimated by `check`
    (GPU memory, host RAM, speed) and compared with the recipe's own layout."""
    candidates: list[Layout] = []
    if not base.grad_ckpt:
        candidates.append(base.with_(ckpt="full"))
    if base.zero_stage < 3 and base.pipeline_stages == 1:
        candidates.append(base.with_(zero_stage=3))
    if base.micro_batch > 1:
        candidates.append(base.with_(micro_batch=1, grad_accum=base.grad_accum * base.micro_batch))
    z = base.zero_stage if base.zero_stage >= 1 else 3
    if base.offload_optimizer == "none" and base.pipeline_stages == 1:
        candidates.append(base.with_(zero_stage=z, offload_optimizer="cpu"))
    # cumulative: everything that trades speed for memory on the same GPUs
    cum = base.with_(ckpt="full")
    if base.pipeline_stages == 1:
        cum = cum.with_(zero_stage=3)
    if base.micro_batch > 1:
        cum = cum.with_(micro_batch=1, grad_accum=base.grad_accum * base.micro_batch)
    candidates.append(cum)
    if base.pipeline_stages == 1:
        candidates.append(cum.with_(offload_optimizer="cpu"))
        candidates.append(cum.with_(offload_optimizer="cpu", offload_param="cpu"))
    # more GPUs (ZeRO-3 divides model states by the data-parallel degree)
    more = cum if base.pipeline_stages == 1 else base
    gpn, nodes = max(base.gpus_per_node, 1), base.nodes
    while nodes <= max_nodes:
        if gpn < 8:
            gpn = min(8, gpn * 2)
        else:
            nodes *= 2
        if nodes > max_nodes:
            break
        lay = more.with_(gpus_per_node=gpn, nodes=nodes)
        if lay.world % lay.pipeline_stages:
            continue
        if check(lay).fits:
            candidates.append(lay)
            if base.pipeline_stages == 1:
                candidates.append(lay.with_(ckpt=base.ckpt, micro_batch=base.micro_batch,
                                            grad_accum=base.grad_accum))
            break
    base_tps = check(base).tokens_per_s
    out: list[Suggestion] = []
    seen = set()
    for lay in candidates:
        if lay == base or lay in seen:
            continue
        seen.add(lay)
        c = check(lay)
        change, words = _diff(base, lay)
        slowdown = base_tps / c.tokens_per_s if base_tps and c.tokens_per_s else None
        out.append(Suggestion(change, words, c.per_gpu_total_bytes, c.fits, c.gpu_fits, c.cpu_bytes_per_node,
                              c.host_fits, c.step_time_s, c.total_hours, slowdown))
    # what fits first (not much slower before much slower, then least disruptive: fewest changes),
    # then the rest by memory
    out.sort(key=lambda s: (not s.fits, s.slow if s.fits else False, s.change.count("=") if s.fits else 0,
                            s.per_gpu_total_bytes))
    return out
