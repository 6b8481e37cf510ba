"""`launcher estimate`: will this recipe fit, how long will it take, what will it cost?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from launcher.errors import UserError
from launcher.estimate.hardware import known_gpus


Opt = typer.Option
RecipeArg = Annotated[Optional[str], typer.Argument(help="Recipe YAML file (or leave out and use --model).",
                                                    show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="key=value overrides applied last, e.g. train.micro_batch_size=2 or train.method=qlora", show_default=False)]
ModelOpt = Annotated[Optional[str], Opt("--model", help="Estimate this model (hub id or catalog name) without a "
                                        "recipe; with --gpu of a consumer card (RTX ...), 1 GPU unless --gpus-per-node.")]
GpuOpt = Annotated[Optional[str], Opt("--gpu", help="GPU type, e.g. H100-80GB, A100-40GB, L40S-48GB, RTX4090-24GB "
                                      "(known: " + ", ".join(known_gpus()) + ").")]
IntOpt = Optional[int]
FloatOpt = Optional[float]


def estimate(
    recipe: RecipeArg = None,
    overrides: OverridesArg = None,
    model: ModelOpt = None,
    gpu: GpuOpt = None,
    nodes: Annotated[IntOpt, Opt("--nodes", help="Number of nodes.")] = None,
    gpus_per_node: Annotated[IntOpt, Opt("--gpus-per-node", help="GPUs per node.")] = None,
    mfu: Annotated[FloatOpt, Opt("--mfu", help="Efficiency (0-1) instead of the layout's default.")] = None,
    avg_seq_len: Annotated[IntOpt, Opt("--avg-seq-len", help="Mean tokens per sequence for the time estimate.")] = None,
    dataset_rows: Annotated[IntOpt, Opt("--dataset-rows", help="Rows in the training data (for epochs).")] = None,
    network_gbps: Annotated[FloatOpt, Opt("--network-gbps", help="Inter-node bandwidth per node, Gbit/s "
                                          "(default 800).")] = None,
    usd_per_gpu_hour: Annotated[FloatOpt, Opt("--usd-per-gpu-hour", help="Add an on-prem row at this "
                                              "$/GPU-hour.")] = None,
    preemption_rate: Annotated[float, Opt("--preemption-rate", help="Spot preemptions per instance-hour.")] = 0.05,
    calibrate: Annotated[bool, Opt("--calibrate", help="Run a few real steps here and rescale with the measured "
                                   "speed.")] = False,
    calibrate_steps: Annotated[int, Opt("--calibrate-steps", help="Steps to measure.")] = 5,
    calibrate_workers: Annotated[IntOpt, Opt("--calibrate-workers", help="Workers (GPUs) for calibration; "
                                             "default: the recipe's.")] = None,
    node_memory: Annotated[FloatOpt, Opt("--node-memory", help="Host RAM per node, GiB (default: the GPU type's "
                                         "usual machines, e.g. 2048 for 8x H100), for offloaded states.")] = None,
    live_prices: Annotated[bool, Opt("--live-prices", help="Read SkyPilot's live catalog (needs SkyPilot and "
                                     "network; waits at most 20 s) instead of the shipped price table.")] = False,
    offline_prices: Annotated[bool, Opt("--offline-prices", help="Use the shipped price table (the default; "
                                        "overrides --live-prices).")] = False,
    search: Annotated[bool, Opt("--search", help="List the cheapest layouts that fit even when the recipe fits "
                                "as it is.")] = False,
    apply: Annotated[IntOpt, Opt("--apply", help="Write layout N of the list as RECIPE.layout-N.yaml beside the "
                                 "recipe (it inherits the recipe; with --model: print the overrides).")] = None,
    trace: Annotated[bool, Opt("--trace", help="Also run one training step of the architecture on fake tensors "
                               "(no GPU, no weights; under a minute for 8B) and print the traced peak per "
                               "category.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print the estimate as JSON (keys: docs/estimate.md).")] = False,
) -> None:
    """GPU memory per GPU, CPU memory per node, time and dollar cost of a recipe, before launch.

    Shows a memory breakdown against the GPU's capacity, a verdict, changes that would make it
    fit (each re-estimated; LoRA or QLoRA when full fine-tuning does not fit), step time and wall
    time, and the cost on AWS, GCP, Azure, Lambda and RunPod. Every method and task is covered:
    train.method=full|lora|qlora, train.task=sft|pretrain|dpo|orpo|kto.

    Example: launcher estimate --model meta-llama/Llama-3.1-8B --gpu RTX4090-24GB train.method=qlora

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --gpu A100-80GB --nodes 2

    Example: launcher estimate recipes/preference/llama-3.1-8b-dpo.yaml --gpu L40S-48GB --gpus-per-node 1

    Example: launcher estimate --model meta-llama/Llama-3.1-70B --gpu A100-80GB --node-memory 1152 --json

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --trace

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --gpu L4 --apply 1
    """
    from launcher.estimate import estimate_recipe

    extra = list(overrides or [])
    r = _load(recipe, model, extra, gpu if gpus_per_node is None else None)
    kwargs = dict(gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, usd_per_gpu_hour=usd_per_gpu_hour,
                  mfu=mfu, avg_seq_len=avg_seq_len, dataset_rows=dataset_rows, network_gbps=network_gbps,
                  preemption_rate=preemption_rate, node_memory_gb=node_memory)
    est = estimate_recipe(r, **kwargs, live_prices=live_prices and not offline_prices,
                          title=f"--model {model}" if model else None, search=search or apply is not None)
    if trace:
        from launcher.estimate.trace import trace_estimate

        trace_estimate(est, r)
    if calibrate:
        _calibrate(est, r, calibrate_steps, calibrate_workers, kwargs)
    applied = _apply(est, apply, r, recipe if not model else None, extra) if apply is not None else None
    _print(est, applied, apply, as_json)


def _load(recipe: str | None, model: str | None, extra: list[str], gpu: str | None) -> object:
    """The recipe file with its overrides, or `--model`'s default recipe (`gpu`: its usual count)."""
    from launcher.estimate import model_recipe

    if model:
        if recipe:
            if "=" not in recipe:
                raise UserError("give a recipe file or --model, not both")
            extra.insert(0, recipe)
        return model_recipe(model, extra, gpu=gpu)
    if recipe:
        if not Path(recipe).exists():
            raise UserError(f"{recipe}: no such recipe file (or use --model NAME)")
        from launcher.recipe import load_recipe

        return load_recipe(recipe, extra)
    raise UserError("give a recipe file or --model NAME, e.g. launcher estimate --model meta-llama/Llama-3.1-8B")


def _calibrate(est: object, r: object, steps: int, workers: int | None, kwargs: dict) -> None:
    from launcher.estimate.calibrate import calibrate as run_calibration

    if steps < 2:
        raise UserError("--calibrate-steps: at least 2 (the first step is not timed)")
    cal_kwargs = {k: v for k, v in kwargs.items() if k in ("gpu", "mfu", "avg_seq_len", "node_memory_gb")}
    run_calibration(est, r, steps=steps, workers=workers, estimate_kwargs=cal_kwargs)


def _print(est: object, applied: dict | None, n: int | None, as_json: bool) -> None:
    from launcher.estimate import format_estimate

    if as_json:
        print(json.dumps({**est.to_json(), **({"applied": applied} if applied else {})}, indent=2, default=str))
        return
    print(format_estimate(est), end="")
    if applied:
        print(f"\napplied  layout {n}: " + (f"wrote {applied['recipe']}; run it with: launcher run "
              f"{applied['recipe']}" if applied.get("recipe") else "overrides " + " ".join(applied["overrides"])))


def _apply(est: object, n: int, r: object, recipe: str | None, extra: list[str]) -> dict:
    """--apply N: the layout's overrides, written as a recipe beside RECIPE (--model: printed only)."""
    from launcher.estimate.apply import chosen, write_layout_recipe

    s = chosen(est, n)
    if recipe is None:
        return {"layout": n, "overrides": s.overrides(), "recipe": None}
    return {"layout": n, "overrides": s.overrides(), "recipe": str(write_layout_recipe(recipe, r, extra, est, n))}
