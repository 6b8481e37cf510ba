"""`estimate_recipe`: memory, time and cost of a recipe's layout, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.errors import UserError
from launcher.estimate import catalog, compute, cost, memory, prices
from launcher.estimate.hardware import GPUS, GiB, Gpu, find_gpu
from launcher.estimate.layout import Layout, check_data_parallel, check_layout
from launcher.estimate.method import Method, method_for
from launcher.estimate.params import ModelShape, model_shape
from launcher.estimate.suggest import Check, Suggestion, suggest
from launcher.recipe.sections import Recipe

DEFAULT_GPU = "H100-80GB"
PREFERENCE_TASKS = ("dpo", "orpo", "kto")
OTHER_METHODS = {"full": ("lora", "qlora"), "lora": ("qlora",), "qlora": ()}
"""Methods the layout search also tries when the recipe's does not fit (fewer trainable bytes)."""


@dataclass
class Estimate:
    recipe_name: str
    model: str
    shape: ModelShape
    layout: Layout
    gpu: Gpu | None
    memory: memory.MemoryEstimate
    fits: bool | None
    """GPU memory and host RAM both hold it (None: no GPU named)."""
    suggestions: list[Suggestion]
    time: compute.TimeEstimate | None
    costs: list[cost.CostRow]
    prices_as_of: str | None
    prices_source: str | None
    examples: int | None
    examples_source: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    title: str | None = None
    """What the header names (`--model NAME`); None: the recipe's name."""
    trace: dict[str, Any] | None = None
    """`--trace`: traced_per_gpu_bytes, traced_peak_phase, analytic_peak_phase, trace_seconds."""
    gpu_fits: bool | None = None
    host_memory_bytes: int | None = None
    """Host RAM per node the offloaded states must fit in (None: no GPU named)."""
    host_memory_source: str | None = None
    host_fits: bool | None = None
    method: Method | None = None
    """What the method (full, LoRA, QLoRA) and task (DPO, ORPO, KTO) change: trainable and
    frozen parameters, sequences per example, the reference policy."""

    @property
    def capacity(self) -> int | None:
        return self.gpu.memory_bytes if self.gpu else None

    def to_json(self) -> dict[str, Any]:
        """The stable, documented JSON (docs/estimate.md lists every key)."""
        t = self.time
        per_gpu = self.memory.per_gpu
        lay = self.layout
        return {
            "recipe": self.recipe_name,
            "model": self.model,
            "params_total": self.shape.total,
            "params_embeddings": self.shape.embeddings,
            "params_per_layer": self.shape.per_layer,
            "num_layers": self.shape.num_layers,
            "largest_layer_params": self.shape.largest_module,
            "gpu": self.gpu.name if self.gpu else None,
            "layout": {"nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node, "world_size": lay.world,
                       "data_parallel": lay.data_parallel, "pipeline_stages": lay.pipeline_stages,
                       "zero_stage": lay.zero_stage, "offload_optimizer": lay.offload_optimizer,
                       "offload_param": lay.offload_param, "dtype": lay.dtype, "micro_batch_size": lay.micro_batch,
                       "grad_accum": lay.grad_accum, "seq_len": lay.seq_len,
                       "gradient_checkpointing": lay.grad_ckpt, "activation_checkpointing": lay.ckpt,
                       "chunked_loss": lay.chunked_loss, "attn_implementation": lay.attn,
                       "method": lay.method, "task": lay.task},
            "method": self.method.to_json() if self.method else None,
            "per_gpu_bytes": per_gpu,
            "peak_phase": self.memory.peak_phase,
            **({"traced_per_gpu_bytes": self.trace["traced_per_gpu_bytes"],
                "traced_peak_phase": self.trace["traced_peak_phase"],
                "trace_seconds": self.trace["trace_seconds"]} if self.trace else {}),
            "breakdown": [r.to_json() for r in self.memory.rows],
            "deepspeed_model_states_bytes": {"per_gpu": self.memory.deepspeed_gpu,
                                             "cpu_per_node": self.memory.deepspeed_cpu},
            "partition_elements_per_rank": self.memory.partitions,
            "gpu_capacity_bytes": self.capacity,
            "fits": self.fits,
            "gpu_fits": self.gpu_fits,
            "spare_bytes": (self.capacity - per_gpu["total"]) if self.capacity else None,
            "host_memory_bytes_per_node": self.host_memory_bytes,
            "host_memory_source": self.host_memory_source,
            "host_fits": self.host_fits,
            "suggestions": [s.to_json() for s in self.suggestions],
            "cpu_bytes_per_node": self.memory.cpu_per_node,
            "cpu_breakdown": [r.to_json() for r in self.memory.cpu_rows],
            "nvme_bytes_per_node": self.memory.nvme_bytes_per_node,
            "train_examples": self.examples,
            "flops_per_token": t.flops_per_token if t else None,
            "tokens_per_step": t.tokens_per_step if t else None,
            "steps": t.steps if t else None,
            "total_tokens": t.total_tokens if t else None,
            "mfu": t.mfu if t else None,
            "step_time_s": t.step_time_s if t else None,
            "tokens_per_s": t.tokens_per_s if t else None,
            "comm_bytes_per_gpu_per_step": t.comm_bytes_per_gpu if t else None,
            "comm_time_s": t.comm_s if t else None,
            "total_hours": t.total_hours if t else None,
            "gpu_hours": (t.total_hours * lay.world) if t and t.total_hours is not None else None,
            "costs": [c.to_json() for c in self.costs],
            "prices_as_of": self.prices_as_of,
            "prices_source": self.prices_source,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "calibration": self.calibration,
        }


def model_config(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """(display name, transformers config dict) of the recipe's model, offline where it can be."""
    m = recipe.model
    name, cfg = catalog.resolve_config(m.name_or_path, m.config, trust_remote_code=m.trust_remote_code)
    if not m.name_or_path and "vocab_size" not in cfg and recipe.tokenizer.builtin == "bytes":
        from launcher.data.tokenizer import BYTES_VOCAB_SIZE

        cfg["vocab_size"] = BYTES_VOCAB_SIZE
    return name, cfg


def _shape_for(recipe: Recipe) -> tuple[str, ModelShape]:
    name, cfg = model_config(recipe)
    return name, model_shape(cfg, trust_remote_code=recipe.model.trust_remote_code)


def host_memory(gpu: Gpu, gpus_per_node: int, node_memory_gb: float | None) -> tuple[int, str]:
    """Host RAM per node and where that figure comes from (given, or the GPU type's default)."""
    if node_memory_gb is not None:
        if node_memory_gb <= 0:
            raise UserError("--node-memory: host RAM per node in GiB, more than 0, e.g. 1024")
        return int(node_memory_gb * GiB), "given (--node-memory or the cluster profile's node_memory_gb)"
    return (gpu.default_node_memory_bytes(gpus_per_node),
            f"default for {gpus_per_node}x {gpu.name}; "
            "set node_memory_gb in the cluster profile or --node-memory")


def _layout(recipe: Recipe, nodes: int, gpus_per_node: int) -> Layout:
    par, t, m = recipe.parallelism, recipe.train, recipe.model
    return Layout(
        nodes=nodes, gpus_per_node=gpus_per_node, pipeline_stages=par.pipeline_stages,
        zero_stage=par.zero_stage,
        offload_optimizer=par.offload_optimizer, offload_param=par.offload_param,
        dtype=m.dtype,
        micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, seq_len=recipe.data.max_seq_len,
        ckpt=checkpointing_mode(m), attn=m.attn_implementation, **chunked_loss(recipe),
        method=t.method, task=t.task,
    )


def checkpointing_mode(m: Any) -> str:
    """`model.activation_checkpointing` (none/selective/full), or the older boolean
    `model.gradient_checkpointing` (true: full) for recipes and schemas without it."""
    mode = getattr(m, "activation_checkpointing", None)
    if mode in ("none", "selective", "full"):
        return mode
    return "full" if getattr(m, "gradient_checkpointing", False) else "none"


def chunked_loss(recipe: Recipe) -> dict[str, Any]:
    """Whether the runtime computes the loss `train.chunked_loss` tokens at a time (0: off): only
    for the families whose head and loss it reproduces (launcher.runtime.chunked_loss.FAMILIES)."""
    import importlib.util

    if importlib.util.find_spec("launcher.runtime.chunked_loss") is None:
        return {"chunked_loss": False}
    from launcher.runtime.chunked_loss import FAMILIES, recipe_chunk_tokens

    tokens = recipe_chunk_tokens(recipe)
    family = model_config(recipe)[1].get("model_type")
    # the preference losses need every token's log-prob: their logits are computed whole
    if tokens <= 0 or family not in FAMILIES or recipe.train.task in PREFERENCE_TASKS:
        return {"chunked_loss": False}
    return {"chunked_loss": True, "chunk_tokens": tokens}


def cheapest_gpu_hour(gpu: Gpu) -> float | None:
    """The lowest on-demand $/GPU-hour of the shipped price table for `gpu` (None: not listed)."""
    rates = [o.usd_per_hour / o.gpus for o in prices.load_prices().offers if o.gpu == gpu.name and o.gpus]
    return min(rates) if rates else None


def _price_table(live: bool, notes: list[str]) -> prices.PriceTable:
    if live:
        table, why = prices.live_prices()
        if table is not None:
            return table
        notes.append(f"live prices unavailable: {why}; using the shipped price table")
    return prices.load_prices()


def _offers_for(table: prices.PriceTable, dtype: str, notes: list[str]) -> list[prices.Offer]:
    """The offers whose GPU can train in the recipe's dtype (V100s have no bf16)."""
    unable = sorted({o.gpu for o in table.offers if o.gpu in GPUS and not GPUS[o.gpu].runs(dtype)})
    if unable:
        notes.append(f"cost table leaves out {', '.join(unable)}: no {dtype} support "
                     "(model.dtype=fp16 to price them)")
    return [o for o in table.offers if o.gpu not in unable]


def _resources(recipe: Recipe, gpu: str | None, nodes: int | None, gpus_per_node: int | None,
               notes: list[str]) -> tuple[int, int, Gpu | None]:
    """Nodes, GPUs (or CPU workers) per node and the GPU type estimated for (None: CPU workers)."""
    res = recipe.resources
    if nodes is not None and nodes < 1:
        raise UserError("--nodes: must be at least 1")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UserError("--gpus-per-node: must be at least 1")
    gpu_name = gpu or res.gpu
    n_nodes = nodes or res.nodes
    gpn = gpus_per_node or res.gpus_per_node
    if gpn == 0 and gpu_name is None:
        notes.append("the recipe trains on CPU workers and names no GPU: memory per worker only "
                     "(pass --gpu to check a GPU)")
        return n_nodes, max(1, res.cpu_workers // n_nodes), None
    if gpn == 0:
        gpn = max(1, res.cpu_workers // n_nodes)
        notes.append(f"the recipe has no GPUs: assuming {gpn} {gpu_name} per node (--gpus-per-node)")
    if gpu_name is None:
        gpu_name = DEFAULT_GPU
        notes.append(f"resources.gpu is not set: assuming {DEFAULT_GPU} (--gpu)")
    return n_nodes, gpn, find_gpu(gpu_name, "--gpu" if gpu else "resources.gpu")


@dataclass
class _Layouts:
    """Memory and time of any layout of one recipe (the recipe's own and the suggestions'):
    each method's accounting is built once."""

    recipe: Recipe
    shape: ModelShape
    examples: int | None
    on_gpu: bool
    mfu: float | None
    recipe_layout: Layout
    avg_seq_len: int | None
    network_gbps: float | None
    methods: dict[str, Method] = field(default_factory=dict)

    def method(self, layout: Layout) -> Method:
        if layout.method not in self.methods:
            self.methods[layout.method] = method_for(self.recipe, self.shape, layout.method)
        return self.methods[layout.method]

    def memory(self, layout: Layout) -> memory.MemoryEstimate:
        from launcher.runtime.ds_config import build_ds_config

        ds = build_ds_config(self.recipe, data_parallel=layout.data_parallel, on_gpu=self.on_gpu)
        zero = ds.setdefault("zero_optimization", {})
        zero["stage"] = layout.zero_stage
        if layout.zero_stage == 3 and "stage3_prefetch_bucket_size" not in zero:
            zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5)
        return memory.estimate_memory(self.shape, layout, ds, self.method(layout))

    def time(self, layout: Layout, g: Gpu) -> compute.TimeEstimate:
        t = self.recipe.train
        n_steps = compute.total_steps(self.examples, t.max_steps, t.epochs, layout)
        eff = self.mfu
        if eff is not None and layout != self.recipe_layout:
            # a given efficiency is the recipe layout's: offload in a suggestion still costs its share
            eff = eff * compute.default_mfu(layout) / compute.default_mfu(self.recipe_layout)
        return compute.estimate_time(self.shape, layout, g, steps=n_steps, avg_seq_len=self.avg_seq_len,
                                     mfu=eff, network_gbps=self.network_gbps, method=self.method(layout))


def _examples(recipe: Recipe, dataset_rows: int | None) -> tuple[int | None, str]:
    """Training examples and where the figure comes from."""
    from launcher.estimate.data_size import train_examples

    if dataset_rows is not None:
        examples, source = int(dataset_rows * (1 - recipe.data.eval_fraction)), "--dataset-rows"
    else:
        examples, source = train_examples(recipe)
    return examples, ("train.max_steps" if recipe.train.max_steps is not None else source)


def estimate_recipe(
    recipe: Recipe,
    *,
    gpu: str | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    usd_per_gpu_hour: float | None = None,
    onprem_name: str | None = None,
    mfu: float | None = None,
    avg_seq_len: int | None = None,
    dataset_rows: int | None = None,
    network_gbps: float | None = None,
    preemption_rate: float = cost.PREEMPTIONS_PER_INSTANCE_HOUR,
    restart_minutes: float = cost.RESTART_MINUTES,
    live_prices: bool = False,
    node_memory_gb: float | None = None,
    title: str | None = None,
    search: bool = False,
) -> Estimate:
    """Estimate memory per GPU, CPU memory per node, time and cost for `recipe`'s layout.

    `gpu`, `nodes`, `gpus_per_node` override the recipe's resources; `usd_per_gpu_hour` adds an
    on-prem row (named `onprem_name`); `node_memory_gb` is the host RAM per node in GiB (default:
    the GPU type's usual machines). `fits` is None when neither the recipe nor `gpu` names GPUs.
    `live_prices` reads SkyPilot's catalog (a child process with a timeout) instead of the table.
    `search`: search for the cheapest layouts that fit even when the recipe's own fits.
    """
    notes: list[str] = []
    n_nodes, gpn, gpu_spec = _resources(recipe, gpu, nodes, gpus_per_node, notes)
    t = recipe.train
    lay = _layout(recipe, n_nodes, gpn)
    model_name, shape = _shape_for(recipe)
    check_layout(lay, shape.num_layers)
    examples, ex_src = _examples(recipe, dataset_rows)
    check_data_parallel(lay, examples)
    ev = _Layouts(recipe, shape, examples, gpu_spec is not None, mfu, lay, avg_seq_len, network_gbps)
    est = Estimate(
        recipe_name=recipe.name, model=model_name, shape=shape, layout=lay, gpu=gpu_spec, memory=ev.memory(lay),
        fits=None, suggestions=[], time=None, costs=[], prices_as_of=None, prices_source=None,
        examples=examples, examples_source=ex_src, notes=notes, title=title, method=ev.method(lay),
    )
    notes += method_notes(recipe, est.method, lay)
    steps = compute.total_steps(examples, t.max_steps, t.epochs, lay)
    if steps is None:
        notes.append(f"total steps unknown ({ex_src}): set train.max_steps or pass --dataset-rows")
    if gpu_spec is not None:
        _check_on_gpu(est, recipe, ev, gpn, node_memory_gb, usd_per_gpu_hour, search)
        if avg_seq_len is None and not recipe.data.packing:
            notes.append("time assumes every sequence is max_seq_len tokens long (an upper bound without "
                         "packing): pass --avg-seq-len for the data's mean length")
        if steps is not None:
            _add_costs(est, recipe, ev.time, live_prices=live_prices, preemption_rate=preemption_rate,
                       restart_minutes=restart_minutes, usd_per_gpu_hour=usd_per_gpu_hour,
                       onprem_name=onprem_name)
    if lay.offload_optimizer != "none" or lay.offload_param != "none":
        notes.append("with offload, DeepSpeed's estimate covers model states only; real use adds the rows "
                     "below it (activations, buffers), which its users report as the 10-40x surprise")
    return est


def _check_on_gpu(est: Estimate, recipe: Recipe, ev: _Layouts, gpn: int, node_memory_gb: float | None,
                  usd_per_gpu_hour: float | None, search: bool) -> None:
    """Fit on the GPU and its hosts, the time, and the suggestions when it does not fit (or `search`)."""
    lay, gpu_spec, mem = est.layout, est.gpu, est.memory
    host_bytes, est.host_memory_source = host_memory(gpu_spec, gpn, node_memory_gb)
    est.host_memory_bytes = host_bytes

    def check(layout: Layout) -> Check:
        m = mem if layout == lay else ev.memory(layout)
        tl = ev.time(layout, gpu_spec)
        per_node_host = host_bytes if layout.gpus_per_node == gpn else \
            host_memory(gpu_spec, layout.gpus_per_node, node_memory_gb)[0]
        return Check(m.per_gpu["total"], m.per_gpu["total"] <= gpu_spec.memory_bytes, m.cpu_per_node,
                     m.cpu_per_node <= per_node_host, tl.step_time_s, tl.tokens_per_s, tl.total_hours)

    own = check(lay)
    est.gpu_fits, est.host_fits, est.fits = own.gpu_fits, own.host_fits, own.fits
    if not est.fits or search:
        others = () if est.fits else tuple(
            x for x in OTHER_METHODS.get(lay.method, ()) if x != "qlora" or recipe.model.name_or_path)
        est.suggestions = suggest(lay, check, usd_per_gpu_hour=usd_per_gpu_hour or cheapest_gpu_hour(gpu_spec),
                                  methods=others)
    est.time = ev.time(lay, gpu_spec)
    est.warnings += est.time.warnings


def method_notes(recipe: Recipe, m: Method, lay: Layout) -> list[str]:
    """What the estimate assumes for the recipe's method and task."""
    out = []
    if not m.full:
        out.append(f"{'QLoRA' if m.method == 'qlora' else 'LoRA'}: {m.trainable:,} trainable parameters "
                   f"({m.trainable / (m.base_16bit + m.quantized):.2%} of {m.base_16bit + m.quantized:,}); "
                   "only they have gradients and optimizer states")
    if m.method == "qlora":
        out.append("QLoRA: the base in bitsandbytes 4-bit ("
                   f"{recipe.lora.quant_type}{', double quantization' if recipe.lora.double_quant else ''}), "
                   "dequantized for every matmul; it needs NVIDIA GPUs")
        if lay.offload_param != "none":
            out.append("QLoRA with parameter offload: PEFT reports that CPU offload raises GPU memory with "
                       "4-bit bases; prefer ZeRO-3 without offload")
    if m.task in PREFERENCE_TASKS:
        seqs = {"dpo": "chosen and rejected per pair", "orpo": "chosen and rejected per pair, no reference",
                "kto": "one completion per example plus a forward-only KL completion"}[m.task]
        ref = {"copy": "a frozen copy of the starting model", "base": "the base with its adapters off (no copy)",
               "precomputed": "log-probs computed before training (no model)", "none": "none"}[m.reference]
        out.append(f"{m.task.upper()}: {seqs}; reference policy: {ref}; its logits are computed whole "
                   "(no chunked loss)" + ("" if m.task == "orpo" else f"; {m.no_grad_sequences} forward-only "
                                          "sequences per example"))
    return out


def _add_costs(est: Estimate, recipe: Recipe, time_for: Any, *, live_prices: bool, preemption_rate: float,
               restart_minutes: float, usd_per_gpu_hour: float | None, onprem_name: str | None) -> None:
    """The cost table: every offer whose GPU runs the recipe's dtype, with its own time and fit
    (GPU memory, and the instance's host RAM when the table knows it)."""
    lay, gpu_spec, tm = est.layout, est.gpu, est.time
    total, host_need = est.memory.per_gpu["total"], est.memory.cpu_per_node
    table = _price_table(live_prices, est.notes)
    est.prices_as_of, est.prices_source = table.as_of, table.source
    time_cache: dict[str, compute.TimeEstimate] = {}

    def t_of(name: str) -> compute.TimeEstimate:
        if name not in time_cache:
            time_cache[name] = time_for(lay, GPUS[name]) if name in GPUS else tm
        return time_cache[name]

    def fits_for(o: prices.Offer) -> bool | None:
        g = GPUS.get(o.gpu)
        if g is None:
            return None
        # an instance with more GPUs than the layout's nodes hosts several of those nodes
        nodes_here = min(lay.nodes, max(1, o.gpus // lay.gpus_per_node))
        ram = o.memory_gib * GiB if o.memory_gib else g.default_node_memory_bytes(o.gpus)
        return total <= g.memory_bytes and host_need * nodes_here <= ram

    est.costs = cost.cost_rows(
        _offers_for(table, lay.dtype, est.notes), nodes=lay.nodes, gpus_per_node=lay.gpus_per_node,
        hours_for=lambda n: t_of(n).total_hours, fits_for=fits_for,
        checkpoint_every_steps=recipe.checkpoint.every_steps,
        step_time_for=lambda n: t_of(n).step_time_s,
        preemption_rate=preemption_rate, restart_minutes=restart_minutes,
    )
    if usd_per_gpu_hour is not None:
        est.costs.append(cost.onprem_row(onprem_name or "cluster", gpu_spec.name, lay.world,
                                         usd_per_gpu_hour, tm.total_hours, est.fits))
        est.costs = cost.mark_cheapest(est.costs)


def model_recipe(name: str, overrides: list[str] | None = None, gpu: str | None = None) -> Recipe:
    """A recipe for `launcher estimate --model NAME`: defaults for everything but the model.
    `gpu` (the `--gpu` given): its usual count per node, 1 for consumer and workstation cards."""
    from launcher.recipe.load import _apply_overrides, from_dict  # noqa: PLC2701
    from omegaconf import OmegaConf

    base = {
        "name": "estimate",
        "model": {"name_or_path": name, "dtype": "bf16", "activation_checkpointing": "full"},
        "data": {"format": "alpaca", "hub": "unspecified", "max_seq_len": 2048},
        "train": {"max_steps": 1000, "micro_batch_size": 1, "grad_accum": 1},
        "parallelism": {"zero_stage": 3},
        "resources": {"nodes": 1, "gpus_per_node": 8, "gpu": DEFAULT_GPU},
    }
    if gpu:
        spec = find_gpu(gpu)
        base["resources"].update(gpu=spec.name, gpus_per_node=spec.default_count)
    origins: dict[str, str] = {}  # which values the command line set, for error messages
    cfg = _apply_overrides(OmegaConf.create(base), overrides or [], origins)
    return from_dict(OmegaConf.to_container(cfg, resolve=True), source=f"--model {name}", origins=origins)
