"""Run the parity cells and compare them with the reference.

`run_parity(cells, workdir)` builds the tiny model once, trains the reference in this process,
spawns the launcher's worker function for each world size (one process group runs all cells of
that size; pipeline cells get a spawn of their own so that a refusal cannot stall the others),
then compares each cell's per-step losses (metrics.jsonl) and final weights (the fp32 Hugging
Face export the launcher writes at the end) with the reference's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from parity.cells import GLOBAL_BATCH, ROOT, STEPS, TRAIN, Cell, recipe_dict

LOSS_RTOL = 1e-5
"""Largest relative deviation of any step's loss from the reference's."""

GRAD_NORM_RTOL = 1e-5
"""Largest relative deviation of any step's logged (pre-clip, global) gradient norm."""

WEIGHT_ATOL = 2e-5
"""Largest absolute deviation of any final weight from the reference's (see docs/parity.md)."""

SPAWN_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_S = 180


@dataclass
class CellResult:
    """One cell's comparison; `via` is "spawn" (train() in ranks started here) or "cli"."""

    cell: Cell
    status: str  # "pass", "FAIL" or "not run"
    loss_dev: float | None = None
    weight_dev: float | None = None
    grad_norm_dev: float | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float | None = None
    via: str = "spawn"

    def row(self) -> dict[str, Any]:
        return {**asdict(self.cell), "status": self.status, "max_rel_loss_dev": self.loss_dev,
                "max_abs_weight_dev": self.weight_dev, "max_rel_grad_norm_dev": self.grad_norm_dev,
                "problems": self.problems, "seconds": self.seconds, "via": self.via}


@dataclass
class Prepared:
    workdir: Path
    model_dir: Path
    tokenizer: Any
    data: Any


def prepare(workdir: Path) -> Prepared:
    """The tiny model's directory and the token examples every cell trains on."""
    from launcher.data import build_datasets, build_tokenizer
    from launcher.recipe import from_dict
    from parity.cells import CELLS, make_model

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
    recipe = from_dict(recipe_dict(CELLS[0], model_dir))
    tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path)
    data = build_datasets(recipe, tokenizer)
    return Prepared(workdir, model_dir, tokenizer, data)


def reference(prep: Prepared, **kwargs: Any):
    from parity.reference import run_reference

    return run_reference(
        prep.model_dir, prep.data.train, pad_id=prep.tokenizer.pad_token_id, steps=STEPS,
        global_batch=GLOBAL_BATCH, train=TRAIN, **kwargs,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(recipe_data: dict) -> str | None:
    """Why the launcher would refuse this recipe before starting workers (None: it would run)."""
    from launcher.errors import UserError
    from launcher.recipe import from_dict
    from launcher.runtime.job import preflight

    try:
        preflight(from_dict(recipe_data))
    except UserError as e:
        return str(e).splitlines()[0]
    return None


def spawn(cells: list[Cell], prep: Prepared, tag: str) -> dict[str, float]:
    """Run `cells` (all of one world size) in one process group; returns seconds per spawn."""
    from launcher.recipe import from_dict
    from launcher.runtime.job import prepare_run_dir

    world = cells[0].world
    entries = []
    for c in cells:
        run_dir = prep.workdir / "runs" / c.name
        data = recipe_dict(c, prep.model_dir)
        prepare_run_dir(run_dir, from_dict(data))
        entries.append({"name": c.name, "run_dir": str(run_dir), "recipe": data})
    spec = prep.workdir / f"spawn-{tag}.json"
    spec.write_text(json.dumps({"cells": entries, "collective_timeout_s": COLLECTIVE_TIMEOUT_S}))
    port = _free_port()
    procs = []
    start = time.time()
    for rank in range(world):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
            "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        }
        log = open(prep.workdir / f"spawn-{tag}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "parity.worker", str(spec)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = start + SPAWN_TIMEOUT_S
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            break
    return {"seconds": time.time() - start}


def read_losses(run_dir: Path) -> list[dict]:
    from launcher.runtime.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in read_metrics(path) if r.get("loss") is not None and not r.get("eval") and "step" in r]


def read_weights(export_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def export_final(run_dir: Path, out: Path) -> None:
    """The run's final committed checkpoint as an fp32 Hugging Face directory at `out`."""
    import shutil

    from launcher.checkpoint.export import export_checkpoint
    from launcher.checkpoint.layout import latest_committed
    from launcher.recipe import load_recipe

    final = latest_committed(run_dir)
    if final is None or final.step != STEPS:
        raise RuntimeError(f"no committed checkpoint of step {STEPS} in {run_dir}")
    shutil.rmtree(out, ignore_errors=True)
    export_checkpoint(final.path, out, recipe=load_recipe(run_dir / "recipe.yaml"), dtype="fp32")


def compare(cell: Cell, run_dir: Path, ref) -> CellResult:
    """Per-step losses, sample ids and final weights of `cell`'s run against the reference."""
    import torch

    problems: list[str] = []
    errors = sorted(run_dir.glob("error-rank-*.txt"))
    if errors:
        last = errors[0].read_text().strip().splitlines()[-1]
        return CellResult(cell, "FAIL", problems=[f"worker raised: {last}"])
    records = read_losses(run_dir)
    if [r["step"] for r in records] != list(range(1, STEPS + 1)):
        return CellResult(cell, "FAIL", problems=[f"steps logged: {[r['step'] for r in records]}"])
    loss_dev = max(abs(r["loss"] - x) / abs(x) for r, x in zip(records, ref.losses))
    norms = [r.get("grad_norm") for r in records]
    grad_norm_dev = None
    if None not in norms:  # the launcher logs the global norm before clipping, like the reference
        grad_norm_dev = max(abs(g - x) / abs(x) for g, x in zip(norms, ref.grad_norms))
        if grad_norm_dev > GRAD_NORM_RTOL:
            problems.append(
                f"gradient norm deviates by {grad_norm_dev:.2e} relative (tolerance {GRAD_NORM_RTOL:.0e})")
    for r, ids in zip(records, ref.sample_ids):
        if r.get("sample_ids") != ids:
            problems.append(f"step {r['step']} trained samples {r.get('sample_ids')}, not {ids}")
            break
    weight_dev = None
    export = run_dir / "hf-fp32"
    try:
        export_final(run_dir, export)
    except Exception as e:  # noqa: BLE001 - reported in the table
        problems.append(f"export of the final checkpoint failed: {str(e).splitlines()[0]}")
    else:
        got = read_weights(export)
        missing = set(ref.state) ^ set(got)
        if missing:
            problems.append(f"tensor names differ from the reference: {sorted(missing)[:4]}")
        common = [k for k in ref.state if k in got]
        bad_dtype = [k for k in common if got[k].dtype != torch.float32]
        if bad_dtype:
            problems.append(f"export is not fp32: {bad_dtype[0]} is {got[bad_dtype[0]].dtype}")
        weight_dev = max(float((got[k].to(torch.float64) - ref.state[k]).abs().max()) for k in common)
    if loss_dev > LOSS_RTOL:
        problems.append(f"loss deviates by {loss_dev:.2e} relative (tolerance {LOSS_RTOL:.0e})")
    if weight_dev is not None and weight_dev > WEIGHT_ATOL:
        problems.append(f"weights deviate by {weight_dev:.2e} (tolerance {WEIGHT_ATOL:.0e})")
    return CellResult(cell, "FAIL" if problems else "pass", loss_dev, weight_dev, grad_norm_dev, problems)


def run_cells(cells: list[Cell], prep: Prepared, ref) -> list[CellResult]:
    """Spawn and compare `cells`; a cell the launcher refuses is "not run" with the reason."""
    results: dict[str, CellResult] = {}
    runnable: list[Cell] = []
    for c in cells:
        why = refusal(recipe_dict(c, prep.model_dir)) if c.pp > 1 else None
        if why:
            results[c.name] = CellResult(c, "not run", problems=[why])
        else:
            runnable.append(c)
    groups: dict[str, list[Cell]] = {}
    for c in runnable:
        groups.setdefault(f"w{c.world}" + (f"-{c.name}" if c.pp > 1 else ""), []).append(c)
    for tag, group in groups.items():
        took = spawn(group, prep, tag)["seconds"]
        for c in group:
            r = compare(c, prep.workdir / "runs" / c.name, ref)
            r.seconds = round(took / len(group), 1)
            results[c.name] = r
    return [results[c.name] for c in cells]


def format_table(results: list[CellResult]) -> str:
    head = (f"{'cell':<22}{'world':>6}{'zero':>5}{'pp':>4}{'ga':>4}{'micro':>6}  {'max rel loss dev':>16}  "
            f"{'max abs weight dev':>18}  {'max rel gnorm dev':>17}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.cell
        loss = f"{r.loss_dev:.2e}" if r.loss_dev is not None else "-"
        weight = f"{r.weight_dev:.2e}" if r.weight_dev is not None else "-"
        gnorm = f"{r.grad_norm_dev:.2e}" if r.grad_norm_dev is not None else "-"
        status = r.status + (f": {'; '.join(r.problems)}" if r.problems else "")
        name = c.name if r.via == "spawn" else f"{c.name} ({r.via})"
        lines.append(f"{name:<22}{c.world:>6}{c.zero:>5}{c.pp:>4}{c.ga:>4}{c.micro:>6}  {loss:>16}  "
                     f"{weight:>18}  {gnorm:>17}  {status}")
    lines.append(f"tolerances: loss {LOSS_RTOL:.0e}, gradient norm {GRAD_NORM_RTOL:.0e} relative per step, "
                 f"final weights {WEIGHT_ATOL:.0e} absolute")
    return "\n".join(lines)


CLI_CELL = "w2-z3-ga4"
"""The cell also trained through `launcher run` (Ray Train workers), the path users take."""


def run_cli(cell: Cell, prep: Prepared, timeout: float = SPAWN_TIMEOUT_S) -> CellResult:
    """Train `cell` with `launcher run` in a subprocess and compare it like the spawned cells."""
    from launcher.recipe import from_dict, to_yaml

    path = prep.workdir / f"cli-{cell.name}.yaml"
    path.write_text(to_yaml(from_dict(recipe_dict(cell, prep.model_dir))))
    run_dir = prep.workdir / "runs" / f"cli-{cell.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.setdefault("LAUNCHER_STATE_DIR", str(prep.workdir / "state"))  # not the user's run registry
    start = time.time()
    with open(prep.workdir / f"cli-{cell.name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--run-dir", str(run_dir)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = (prep.workdir / f"cli-{cell.name}.log").read_text().strip().splitlines()[-3:]
        why = f"launcher run exited {proc.returncode}: {' | '.join(tail)}"
        return CellResult(cell, "FAIL", problems=[why])
    result = compare(cell, run_dir, prep_reference(prep))
    result.via = "cli"
    result.seconds = round(time.time() - start, 1)
    return result


_REFERENCES: dict[Path, Any] = {}


def prep_reference(prep: Prepared):
    """The token-weighted fp32 reference for `prep`, trained once per work directory."""
    if prep.workdir not in _REFERENCES:
        _REFERENCES[prep.workdir] = reference(prep)
    return _REFERENCES[prep.workdir]
