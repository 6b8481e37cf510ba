"""`launcher estimate --trace`: one real training step of the recipe's architecture, on fake tensors.

The model is built from its config under `FakeTensorMode` (no weights allocated, nothing read or
downloaded), with DeepSpeed's mixed-precision states beside it (16-bit weights, fp32 master
weights, fp32 gradient buffer, Adam's two moments), and one forward, loss, backward and AdamW
step run while `LiveBytes` counts every storage alive. The step is that of one unpartitioned
rank; `per_gpu` then applies the layout (ZeRO partitions, offload, pipeline stage) to the traced
model states and keeps the traced activations, so the result compares with the analytic
`per_gpu_bytes`. What a fake run cannot see (the CUDA context, cuBLAS/NCCL workspaces, allocator
fragmentation, DeepSpeed's communication buckets) comes from the analytic model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from launcher.estimate.layout import Layout
from launcher.estimate.live_bytes import KINDS, LiveBytes, peaks

PHASES = ("forward", "backward", "optimizer")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class Trace:
    """One traced step of one unpartitioned rank."""

    timeline: list[tuple[str, tuple[int, ...]]]
    """(phase, live bytes per kind) after every op (`live_bytes.peaks` takes the peaks)."""
    numels: list[int]
    """Elements of each trained parameter (for ZeRO's per-parameter partitions)."""
    seconds: float
    notes: list[str] = field(default_factory=list)
    all_numels: list[int] = field(default_factory=list)
    """Elements of every parameter, frozen ones included (LoRA: the base's ZeRO-3 partitions)."""


def _checkpointing(model: Any, mode: str) -> None:
    """The runtime's activation checkpointing (launcher.runtime.recompute): `selective` keeps the
    matmul outputs and recomputes the attention core and the elementwise operations."""
    try:
        from launcher.runtime.recompute import apply_activation_checkpointing
    except ImportError:  # a runtime without selective recompute: full checkpointing as transformers does it
        if mode != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    apply_activation_checkpointing(model, mode)


def _loss(model: Any, ids: Any, mask: Any, num_items: int) -> tuple[Any, Any]:
    """The runtime's loss (token-weighted; chunked where `_chunked` made it so) and what the runtime
    keeps referenced until the step ends (the model output, with the logits when unchunked)."""
    out = model(input_ids=ids, attention_mask=mask, labels=ids, num_items_in_batch=num_items)
    return out.loss, out


def _chunked(model: Any, lay: Layout) -> Any:
    """The runtime's chunked cross-entropy (launcher.runtime.chunked_loss) on `model`, as it trains."""
    if not lay.chunked_loss:
        return model
    from launcher.runtime.chunked_loss import enable_chunked_loss

    return enable_chunked_loss(model, lay.chunk_tokens)


def _states(model: Any, lb: LiveBytes, lay: Layout) -> tuple[list, list, list, list, list]:
    """DeepSpeed's mixed-precision states, allocated before the first step as the engine does:
    fp32 master weights, an fp32 gradient buffer, Adam's moments (fp32 recipes: the weights are
    the master copy and the optimizer reads their gradients)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for t in model.parameters():
        lb.track(t, "params")
    for t in model.buffers():
        lb.track(t, "buffers")  # replicated, never partitioned
    mixed = lay.weight_bytes < 4
    master = [p.detach().float() for p in params] if mixed else params
    grads32 = [torch.zeros_like(m) for m in master] if mixed else []
    for m in master if mixed else []:
        lb.track(m, "master")
    for g in grads32:
        lb.track(g, "grads32")
    m1 = [torch.zeros_like(m) for m in master]
    m2 = [torch.zeros_like(m) for m in master]
    for m in m1 + m2:
        lb.track(m, "adam")
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: lb.track(p.grad, "grads16"))
    return params, master, grads32, m1, m2


def _step(params: list, master: list, grads32: list, m1: list, m2: list) -> None:
    """Accumulate the 16-bit gradients into the fp32 buffer and free them, AdamW (fused, as
    DeepSpeed's FusedAdam: no per-tensor scratch), copy the master weights back."""
    import torch

    for p, g in zip(params, grads32):
        g.add_(p.grad)
        p.grad = None
    grads = grads32 or [p.grad for p in params]
    steps = [torch.tensor(1.0) for _ in master]
    torch._fused_adamw_(master, grads, m1, m2, [], steps, lr=1e-5, beta1=0.9, beta2=0.95,
                        weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
    for p, m in zip(params, master):
        if p is not m:
            p.data.copy_(m)


def build_config(config: dict[str, Any], lay: Layout, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of the (pipeline stage's) model: a stage holds ceil(layers/stages)
    blocks and, as an upper bound, both ends (embedding and head)."""
    from launcher.estimate.params import hf_config

    cfg = hf_config(config, trust_remote_code=trust_remote_code)
    if lay.pipeline_stages > 1:
        cfg.num_hidden_layers = math.ceil(cfg.num_hidden_layers / lay.pipeline_stages)
    cfg.use_cache = False
    return cfg


def _adapters(model: Any, lora: dict[str, Any] | None) -> Any:
    """LoRA as PEFT computes it (`base(x) + B(A(dropout(x))) * alpha / r` on each target linear
    layer), the base frozen. Written out rather than PEFT's own wrapper because PEFT moves its new
    layers with `Module.to`, which cannot swap fake parameters; the operations, and so what
    autograd keeps, are PEFT's. `modules_to_save` trains the named modules themselves (PEFT trains a
    copy beside the frozen original: the trace leaves the original out)."""
    if not lora:
        return model
    import torch

    from launcher.estimate.method import _matches

    class Adapted(torch.nn.Module):
        def __init__(self, base: Any, r: int, alpha: float, dropout: float) -> None:
            super().__init__()
            w = base.weight
            fin, fout = (w.shape[1], w.shape[0]) if isinstance(base, torch.nn.Linear) else (w.shape[0], w.shape[1])
            self.base, self.scale = base, alpha / r
            self.lora_A = torch.nn.Linear(fin, r, bias=False, dtype=w.dtype)
            self.lora_B = torch.nn.Linear(r, fout, bias=False, dtype=w.dtype)
            self.drop = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

        def forward(self, x: Any) -> Any:
            return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale

    model.requires_grad_(False)
    out = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not name or module is out or not hasattr(module, "weight") or getattr(module.weight, "dim", lambda: 0)() != 2:
            continue
        if isinstance(module, torch.nn.Embedding):
            continue
        if any(_matches(name, t) for t in lora["targets"]):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Adapted(module, lora["rank"], lora["alpha"], lora["dropout"]))
    for name, module in model.named_modules():
        if any(_matches(name, t) for t in lora["modules_to_save"]):
            module.requires_grad_(True)
    return model


def trace_step(config: dict[str, Any], lay: Layout, *, trust_remote_code: bool = False,
               lora: dict[str, Any] | None = None) -> Trace:
    """Run one training step of `config`'s architecture in `lay`'s micro-batch under fake tensors
    (`lora`: rank, alpha, dropout, targets, modules_to_save of PEFT's adapters)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    cfg = build_config(config, lay, trust_remote_code=trust_remote_code)
    dtype = getattr(torch, DTYPES[lay.dtype])
    lb = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=lay.attn,
                                                 trust_remote_code=trust_remote_code)
        model.train()
        _checkpointing(model, lay.ckpt)
        model = _adapters(_chunked(model, lay), lora)
        with lb:
            states = _states(model, lb, lay)
            ids = torch.zeros(lay.micro_batch, lay.seq_len, dtype=torch.long)
            mask = torch.ones(lay.micro_batch, lay.seq_len, dtype=torch.long)
            lb.set_phase("forward", "activations")
            loss, out = _loss(model, ids, mask, lay.micro_batch * lay.seq_len)
            lb.set_phase("backward", "temporaries")
            loss.backward()
            del loss, out
            lb.set_phase("optimizer", "temporaries")
            _step(*states)
            lb.set_phase("done", "temporaries")
    numels = [p.numel() for p in states[0]]
    return Trace(timeline=lb.timeline, numels=numels, seconds=time.perf_counter() - t0,
                 all_numels=[p.numel() for p in model.parameters()])


def weights(lay: Layout, numels: list[int], all_numels: list[int] | None = None) -> dict[str, float]:
    """One rank's share of each kind of traced bytes in `lay`: ZeRO partitions each parameter into
    ceil(numel/N) elements (ZeRO-3: weights too; ZeRO-1/2/3: the fp32 gradients and optimizer
    states), ZeRO-2/3 reduce the 16-bit gradients through buckets (counted as buffers) instead of
    keeping them, offload moves the optimizer (with its fp32 gradients) or the weights to the host."""
    n, z = lay.data_parallel, lay.zero_stage
    part = sum(math.ceil(x / n) for x in numels) / max(sum(numels), 1)
    every = all_numels or numels
    part_all = sum(math.ceil(x / n) for x in every) / max(sum(every), 1)
    shard = part if z >= 1 else 1.0
    opt = 0.0 if lay.offload_optimizer != "none" else shard
    return {"params": 0.0 if lay.offload_param != "none" else (part_all if z == 3 else 1.0),
            "grads16": 0.0 if z >= 2 else 1.0, "grads32": opt, "master": opt, "adam": opt,
            "activations": 1.0, "temporaries": 1.0}


def per_gpu(trace: Trace, lay: Layout, analytic: dict[str, int]) -> tuple[dict[str, int], str]:
    """Traced bytes per GPU with `per_gpu_bytes`' keys, and the phase of the peak. `buffers` and the
    CUDA context are the analytic figures (a fake run has neither); fragmentation is the analytic
    model's share of the traced activations and buffers."""
    from launcher.estimate.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    at = peaks(trace.timeline, weights(lay, trace.numels, trace.all_numels), PHASES)
    phase = max(PHASES, key=lambda ph: at[ph][0])
    k = at[phase][1]
    out = {"params": k["params"] + k["buffers"], "grads": k["grads16"] + k["grads32"], "optimizer": k["master"] + k["adam"],
           "activations": k["activations"] + k["temporaries"]}
    out["buffers"] = analytic["buffers"]
    out["overhead"] = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * (out["activations"] + out["buffers"]))
    out["total"] = sum(out[k] for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead"))
    return out, phase





def trace_estimate(est: Any, recipe: Any) -> dict[str, Any]:
    """Trace `recipe`'s step in `est`'s layout and set `est.trace`: the traced bytes per GPU (the keys
    of `per_gpu_bytes`), the phase of the traced and of the analytic peak, and the seconds it took."""
    from launcher.errors import UserError
    from launcher.estimate.estimator import model_config

    _, config = model_config(recipe)
    lay = est.layout
    if lay.method == "qlora" or lay.task in ("dpo", "orpo", "kto"):
        raise UserError("--trace: traces full fine-tuning and LoRA of SFT and pretraining; QLoRA's 4-bit "
                        "layers need bitsandbytes on a GPU and the preference objectives are not traced: "
                        "leave out --trace, or --calibrate on a GPU")
    lora = None
    if lay.method == "lora":
        from launcher.estimate.method import default_targets
        from launcher.estimate.params import model_shape

        r = recipe.lora
        lora = {"rank": r.rank, "alpha": r.alpha, "dropout": r.dropout, "modules_to_save": list(r.modules_to_save),
                "targets": list(r.target_modules) or default_targets(model_shape(config))}
    try:
        tr = trace_step(config, est.layout, trust_remote_code=recipe.model.trust_remote_code, lora=lora)
    except UserError:
        raise
    except Exception as e:  # an architecture that cannot run on fake tensors
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise UserError(f"--trace: {est.model} could not run under FakeTensorMode ({type(e).__name__}: "
                        f"{last[:200]}); leave out --trace for the analytic estimate") from None
    traced, phase = per_gpu(tr, est.layout, est.memory.per_gpu)
    est.trace = {"traced_per_gpu_bytes": traced, "traced_peak_phase": phase,
                 "analytic_peak_phase": est.memory.peak_phase, "trace_seconds": round(tr.seconds, 2)}
    return est.trace
