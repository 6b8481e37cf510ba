"""`launcher estimate`: will this recipe fit, how long will it take, what will it cost?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from launcher.errors import UserError


def estimate(
    recipe: Annotated[
        Optional[str], typer.Argument(help="Recipe YAML file (or leave out and use --model).", show_default=False)
    ] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="key=value overrides applied last, e.g. train.micro_batch_size=2", show_default=False),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Estimate this model (hub id or catalog name) without a recipe.")
    ] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="GPU type, e.g. H100-80GB, A100-40GB, L4.")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Number of nodes.")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", help="GPUs per node.")] = None,
    mfu: Annotated[Optional[float], typer.Option("--mfu", help="Efficiency (0-1) instead of the layout's default.")] = None,
    avg_seq_len: Annotated[
        Optional[int], typer.Option("--avg-seq-len", help="Mean tokens per sequence for the time estimate.")
    ] = None,
    dataset_rows: Annotated[
        Optional[int], typer.Option("--dataset-rows", help="Rows in the training data (for epochs).")
    ] = None,
    network_gbps: Annotated[
        Optional[float], typer.Option("--network-gbps", help="Inter-node bandwidth per node, Gbit/s (default 800).")
    ] = None,
    usd_per_gpu_hour: Annotated[
        Optional[float], typer.Option("--usd-per-gpu-hour", help="Add an on-prem row at this $/GPU-hour.")
    ] = None,
    preemption_rate: Annotated[
        float, typer.Option("--preemption-rate", help="Spot preemptions per instance-hour.")
    ] = 0.05,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Run a few real steps here and rescale with the measured speed.")
    ] = False,
    calibrate_steps: Annotated[int, typer.Option("--calibrate-steps", help="Steps to measure.")] = 5,
    calibrate_workers: Annotated[
        Optional[int], typer.Option("--calibrate-workers", help="Workers (GPUs) for calibration; default: the recipe's.")
    ] = None,
    node_memory: Annotated[
        Optional[float],
        typer.Option("--node-memory", help="Host RAM per node, GiB (default: the GPU type's usual machines, "
                     "e.g. 2048 for 8x H100), for offloaded states."),
    ] = None,
    live_prices: Annotated[
        bool, typer.Option("--live-prices", help="Read SkyPilot's live catalog (needs SkyPilot and network; "
                           "waits at most 20 s) instead of the shipped price table.")
    ] = False,
    offline_prices: Annotated[
        bool,
        typer.Option("--offline-prices", help="Use the shipped price table (the default; overrides --live-prices)."),
    ] = False,
    search: Annotated[
        bool, typer.Option("--search", help="List the cheapest layouts that fit even when the recipe fits as it is.")
    ] = False,
    apply: Annotated[
        Optional[int], typer.Option("--apply", help="Write layout N of the list as RECIPE.layout-N.yaml beside the "
                                    "recipe (it inherits the recipe; with --model: print the overrides).")
    ] = None,
    trace: Annotated[
        bool, typer.Option("--trace", help="Also run one training step of the architecture on fake tensors "
                           "(no GPU, no weights; under a minute for 8B) and print the traced peak per category.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON (keys: docs/estimate.md).")] = False,
) -> None:
    """GPU memory per GPU, CPU memory per node, time and dollar cost of a recipe, before launch.

    Shows a memory breakdown against the GPU's capacity, a verdict, changes that would make it
    fit (each re-estimated), step time and wall time, and the cost on AWS, GCP, Azure and Lambda.

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --gpu A100-80GB --nodes 2

    Example: launcher estimate --model meta-llama/Llama-3.1-70B --gpus-per-node 8 --nodes 4

    Example: launcher estimate --model meta-llama/Llama-3.1-70B --gpu A100-80GB --node-memory 1152 --json

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --trace

    Example: launcher estimate recipes/sft/llama-3.1-8b-full-sft.yaml --gpu L4 --apply 1
    """
    from launcher.estimate import estimate_recipe, format_estimate, model_recipe

    extra = list(overrides or [])
    if model:
        if recipe:
            if "=" not in recipe:
                raise UserError("give a recipe file or --model, not both")
            extra.insert(0, recipe)
        r = model_recipe(model, extra)
    elif recipe:
        if not Path(recipe).exists():
            raise UserError(f"{recipe}: no such recipe file (or use --model NAME)")
        from launcher.recipe import load_recipe

        r = load_recipe(recipe, extra)
    else:
        raise UserError("give a recipe file or --model NAME, e.g. launcher estimate --model meta-llama/Llama-3.1-8B")
    kwargs = dict(gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, usd_per_gpu_hour=usd_per_gpu_hour,
                  mfu=mfu, avg_seq_len=avg_seq_len, dataset_rows=dataset_rows, network_gbps=network_gbps,
                  preemption_rate=preemption_rate, node_memory_gb=node_memory)
    est = estimate_recipe(r, **kwargs, live_prices=live_prices and not offline_prices,
                          title=f"--model {model}" if model else None, search=search or apply is not None)
    if trace:
        from launcher.estimate.trace import trace_estimate

        trace_estimate(est, r)
    if calibrate:
        from launcher.estimate.calibrate import calibrate as run_calibration

        if calibrate_steps < 2:
            raise UserError("--calibrate-steps: at least 2 (the first step is not timed)")
        cal_kwargs = {k: v for k, v in kwargs.items() if k in ("gpu", "mfu", "avg_seq_len", "node_memory_gb")}
        run_calibration(est, r, steps=calibrate_steps, workers=calibrate_workers, estimate_kwargs=cal_kwargs)
    applied = _apply(est, apply, r, recipe if not model else None, extra) if apply is not None else None
    if as_json:
        print(json.dumps({**est.to_json(), **({"applied": applied} if applied else {})}, indent=2, default=str))
        return
    print(format_estimate(est), end="")
    if applied:
        print(f"\napplied  layout {apply}: " + (f"wrote {applied['recipe']}; run it with: launcher run "
              f"{applied['recipe']}" if applied.get("recipe") else "overrides " + " ".join(applied["overrides"])))


def _apply(est: object, n: int, r: object, recipe: str | None, extra: list[str]) -> dict:
    """--apply N: the layout's overrides, written as a recipe beside RECIPE (--model: printed only)."""
    from launcher.estimate.apply import chosen, write_layout_recipe

    s = chosen(est, n)
    if recipe is None:
        return {"layout": n, "overrides": s.overrides(), "recipe": None}
    return {"layout": n, "overrides": s.overrides(), "recipe": str(write_layout_recipe(recipe, r, extra, est, n))}
