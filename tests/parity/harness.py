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

@dataclass(frozen=True)
class Tolerances:
    loss_rtol: float
    """Largest relative deviation of any step's loss from the reference's."""
    grad_norm_rtol: float
    """Largest relative deviation of any step's logged (pre-clip, global) gradient norm."""
    weight_atol: float | None
    """Largest absolute deviation of any final weight from the reference's (see docs/parity.md)."""
    update_rtol: float | None = None
    """Largest L2 norm of (final weights - the reference's) relative to the L2 norm of the
    reference's whole update (final - initial weights). bf16 checks this instead of the largest
    single weight, which a near-zero gradient of either sign makes ~lr per step (docs/parity.md)."""


TOLERANCES = {
    "fp32": Tolerances(loss_rtol=1e-5, grad_norm_rtol=1e-5, weight_atol=2e-5),
    # 3-4x the largest deviation between bf16 references that differ only in how the global
    # batch is split and summed (the noise floor, `noise_floor`: loss 2.5e-5, gradient norm
    # 6.7e-4, weight update 7.6e-3; docs/parity.md)
    "bf16": Tolerances(loss_rtol=1e-4, grad_norm_rtol=3e-3, weight_atol=None, update_rtol=3e-2),
}
LOSS_RTOL = TOLERANCES["fp32"].loss_rtol
GRAD_NORM_RTOL = TOLERANCES["fp32"].grad_norm_rtol
WEIGHT_ATOL = TOLERANCES["fp32"].weight_atol


@dataclass(frozen=True)
class Mode:
    """How every cell of a run is trained: the model dtype, and a raw `deepspeed:` block."""

    name: str
    dtype: str
    deepspeed: dict[str, Any] | None = None

    @property
    def tolerances(self) -> Tolerances:
        return TOLERANCES[self.dtype]

    @property
    def prefix(self) -> str:
        """Run directories and spawn tags of this mode (none for fp32, as before)."""
        return "" if self.name == "fp32" else f"{self.name}-"


BEFORE_FIX = {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}
"""DeepSpeed's own defaults for bf16, as the generated config had them before the fix: gradients
summed over micro-batches and reduced over ranks in bf16 (and ZeRO-0 on FP16_Optimizer in bf16)."""

MODES = {
    "fp32": Mode("fp32", "fp32"),
    "bf16": Mode("bf16", "bf16"),
    "bf16-before-fix": Mode("bf16-before-fix", "bf16", BEFORE_FIX),
}
FP32 = MODES["fp32"]

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
    mode: str = "fp32"
    update_dev: float | None = None

    def row(self) -> dict[str, Any]:
        return {**asdict(self.cell), "mode": self.mode, "status": self.status,
                "max_rel_loss_dev": self.loss_dev,
                "max_abs_weight_dev": self.weight_dev,
                "rel_update_dev": self.update_dev, "max_rel_grad_norm_dev": self.grad_norm_dev,
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


def spawn(cells: list[Cell], prep: Prepared, tag: str, mode: Mode = FP32) -> dict[str, float]:
    """Run `cells` (all of one world size) in one process group; returns seconds per spawn."""
    from launcher.recipe import from_dict
    from launcher.runtime.job import prepare_run_dir

    world = cells[0].world
    entries = []
    for c in cells:
        run_dir = prep.workdir / "runs" / f"{mode.prefix}{c.name}"
        data = recipe_dict(c, prep.model_dir, dtype=mode.dtype, deepspeed=mode.deepspeed)
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


def weight_difference(got, master):
    """|got - master| per element. A tensor whose every value is a bf16 number (an export from
    bf16 module weights: ZeRO-0 keeps no fp32 copy in its model file) may also be off by the
    rounding to bf16 itself, at most |master| * 2**-8: only what exceeds that counts."""
    import torch

    got = got.to(torch.float64)
    diff = (got - master).abs()
    if got.numel() > 1 and torch.equal(got, got.to(torch.bfloat16).to(torch.float64)):
        diff = (diff - master.abs() * 2.0**-8).clamp_min(0)
    return diff


def update_deviation(diffs: list, ref) -> float:
    """L2 norm of all weight differences over the L2 norm of the reference's update."""
    import torch

    update = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(ref.state[k] - ref.init[k])
                                                   for k in ref.state]))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in diffs])) / update)


def compare(cell: Cell, run_dir: Path, ref, mode: Mode = FP32) -> CellResult:
    """Per-step losses, sample ids and final weights of `cell`'s run against the reference."""
    import torch

    tol = mode.tolerances
    problems: list[str] = []
    errors = sorted(run_dir.glob("error-rank-*.txt"))
    if errors:
        last = errors[0].read_text().strip().splitlines()[-1]
        return CellResult(cell, "FAIL", problems=[f"worker raised: {last}"], mode=mode.name)
    records = read_losses(run_dir)
    if [r["step"] for r in records] != list(range(1, STEPS + 1)):
        steps = [r["step"] for r in records]
        return CellResult(cell, "FAIL", problems=[f"steps logged: {steps}"], mode=mode.name)
    loss_dev = max(abs(r["loss"] - x) / abs(x) for r, x in zip(records, ref.losses))
    norms = [r.get("grad_norm") for r in records]
    grad_norm_dev = None
    if None not in norms:  # the launcher logs the global norm before clipping, like the reference
        grad_norm_dev = max(abs(g - x) / abs(x) for g, x in zip(norms, ref.grad_norms))
        if grad_norm_dev > tol.grad_norm_rtol:
            problems.append(f"gradient norm deviates by {grad_norm_dev:.2e} relative "
                            f"(tolerance {tol.grad_norm_rtol:.0e})")
    for r, ids in zip(records, ref.sample_ids):
        if r.get("sample_ids") != ids:
            problems.append(f"step {r['step']} trained samples {r.get('sample_ids')}, not {ids}")
            break
    weight_dev = update_dev = None
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
        diffs = [weight_difference(got[k], ref.state[k]) for k in common]
        weight_dev = max(float(d.max()) for d in diffs)
        update_dev = update_deviation(diffs, ref) if ref.init else None
    if loss_dev > tol.loss_rtol:
        problems.append(f"loss deviates by {loss_dev:.2e} relative (tolerance {tol.loss_rtol:.0e})")
    if tol.weight_atol is not None and weight_dev is not None and weight_dev > tol.weight_atol:
        problems.append(f"weights deviate by {weight_dev:.2e} (tolerance {tol.weight_atol:.0e})")
    if tol.update_rtol is not None and update_dev is not None and update_dev > tol.update_rtol:
        problems.append(f"weight update deviates by {update_dev:.2e} relative "
                        f"(tolerance {tol.update_rtol:.0e})")
    return CellResult(cell, "FAIL" if problems else "pass", loss_dev, weight_dev, grad_norm_dev, problems,
                      mode=mode.name, update_dev=update_dev)


def run_cells(cells: list[Cell], prep: Prepared, ref, mode: Mode = FP32) -> list[CellResult]:
    """Spawn and compare `cells`; a cell the launcher refuses is "not run" with the reason."""
    results: dict[str, CellResult] = {}
    runnable: list[Cell] = []
    for c in cells:
        data = recipe_dict(c, prep.model_dir, dtype=mode.dtype, deepspeed=mode.deepspeed)
        why = refusal(data) if c.pp > 1 else None
        if why:
            results[c.name] = CellResult(c, "not run", problems=[why], mode=mode.name)
        else:
            runnable.append(c)
    groups: dict[str, list[Cell]] = {}
    for c in runnable:
        groups.setdefault(f"{mode.prefix}w{c.world}" + (f"-{c.name}" if c.pp > 1 else ""), []).append(c)
    for tag, group in groups.items():
        took = spawn(group, prep, tag, mode)["seconds"]
        for c in group:
            r = compare(c, prep.workdir / "runs" / f"{mode.prefix}{c.name}", ref, mode)
            r.seconds = round(took / len(group), 1)
            results[c.name] = r
    return [results[c.name] for c in cells]


def format_table(results: list[CellResult]) -> str:
    names = [_row_name(r) for r in results]
    width = max([22, *(len(n) + 2 for n in names)])
    head = (f"{'cell':<{width}}{'world':>6}{'zero':>5}{'pp':>4}{'ga':>4}{'micro':>6}  "
            f"{'max rel loss dev':>16}  {'max abs weight dev':>18}  {'rel update dev':>14}  {'max rel gnorm dev':>17}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.cell
        loss = f"{r.loss_dev:.2e}" if r.loss_dev is not None else "-"
        weight = f"{r.weight_dev:.2e}" if r.weight_dev is not None else "-"
        gnorm = f"{r.grad_norm_dev:.2e}" if r.grad_norm_dev is not None else "-"
        update = f"{r.update_dev:.2e}" if r.update_dev is not None else "-"
        status = r.status + (f": {'; '.join(r.problems)}" if r.problems else "")
        lines.append(f"{_row_name(r):<{width}}{c.world:>6}{c.zero:>5}{c.pp:>4}{c.ga:>4}{c.micro:>6}  "
                     f"{loss:>16}  {weight:>18}  {update:>14}  {gnorm:>17}  {status}")
    for dtype in sorted({MODES[r.mode].dtype for r in results}):
        tol = TOLERANCES[dtype]
        weights = (f"final weights {tol.weight_atol:.0e} absolute" if tol.weight_atol is not None
                   else f"weight update {tol.update_rtol:.0e} relative (L2)")
        lines.append(f"tolerances ({dtype}): loss {tol.loss_rtol:.0e}, "
                     f"gradient norm {tol.grad_norm_rtol:.0e} relative per step, {weights}")
    return "\n".join(lines)


def _row_name(r: CellResult) -> str:
    name = r.cell.name if r.via == "spawn" else f"{r.cell.name} ({r.via})"
    return name if r.mode == "fp32" else f"{r.mode} {name}"


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


_REFERENCES: dict[tuple[Path, str], Any] = {}


def prep_reference(prep: Prepared, dtype: str = "fp32"):
    """The token-weighted reference in `dtype` for `prep`, trained once per work directory."""
    import torch

    key = (prep.workdir, dtype)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(prep, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    return _REFERENCES[key]


NOISE_ORDERS = [{"micro": 1, "reverse": True}, {"micro": 2, "reverse": True}, {"micro": 4}]
"""Other ways to split and sum the global batch, each one a legitimate layout's summation order."""


def deviations(a, b) -> dict[str, float]:
    """Largest relative loss and gradient-norm deviation per step, absolute weight deviation."""
    diffs = [(a.state[k] - b.state[k]).abs() for k in b.state]
    return {
        "loss": max(abs(x - y) / abs(y) for x, y in zip(a.losses, b.losses)),
        "grad_norm": max(abs(x - y) / abs(y) for x, y in zip(a.grad_norms, b.grad_norms)),
        "weight": max(float(d.max()) for d in diffs),
        "update": update_deviation(diffs, b),
    }


def noise_floor(prep: Prepared, dtype: str = "bf16") -> dict[str, Any]:
    """How far the reference moves when only its summation order changes (`NOISE_ORDERS`): the
    largest deviation of each quantity from the one-forward reference, and each order's own."""
    import torch

    base = prep_reference(prep, dtype)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    per_order = [{**order, **deviations(reference(prep, dtype=torch_dtype, **order), base)}
                 for order in NOISE_ORDERS]
    floor = {q: max(o[q] for o in per_order) for q in ("loss", "grad_norm", "weight", "update")}
    return {"dtype": dtype, "floor": floor, "orders": per_order}


def format_floor(floor: dict[str, Any]) -> str:
    """The noise floor as a small table: one row per summation order, then the largest."""
    head = (f"{'reference summed as':<26}{'rel loss dev':>14}{'rel gnorm dev':>15}{'abs weight dev':>16}"
            f"{'rel update dev':>16}")
    lines = [f"noise floor ({floor['dtype']}): the reference against itself in other summation orders", head]
    rows = [(f"micro {o['micro']}" + (" reversed" if o.get("reverse") else ""), o) for o in floor["orders"]]
    for name, o in [*rows, ("largest", floor["floor"])]:
        lines.append(f"{name:<26}{o['loss']:>14.2e}{o['grad_norm']:>15.2e}{o['weight']:>16.2e}"
                     f"{o['update']:>16.2e}")
    return "\n".join(lines)
