#!/usr/bin/env python
"""Loss parity across parallel layouts: print a table of the largest deviation per cell.

Trains the tiny model with an independent PyTorch loop (the reference) and with the launcher's
worker function under ZeRO 0-3 x world 1, 2 x grad_accum 1, 4, and pipeline 2 stages (x 2
data-parallel); compares per-step losses and final fp32 weights. Exit 1 unless every selected
cell passes (a cell the launcher refuses is "not run" and counts as a failure). See docs/parity.md.

    .venv/bin/python scripts/parity.py                     # every cell
    .venv/bin/python scripts/parity.py --cells w1-z3,pp2   # names containing w1-z3 or pp2
    .venv/bin/python scripts/parity.py --cli --json        # also one cell via `launcher run`
    .venv/bin/python scripts/parity.py --dtype bf16        # bf16 weights and compute, bf16 tolerances
    .venv/bin/python scripts/parity.py --dtype bf16 --before-fix --cells 'ga4$'   # DeepSpeed's bf16 defaults
    .venv/bin/python scripts/parity.py --dtype bf16 --noise-floor              # measure the bf16 floor
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the harness lives with the tests (tests/parity); this file's own name must not shadow it
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", help="comma-separated substrings of cell names (default: all), e.g. w2-z3,pp2")
    ap.add_argument("--cli", action="store_true", help="also train one cell through `launcher run` (Ray)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--workdir", type=Path, help="keep the model, runs and logs here (default: a temp dir)")
    ap.add_argument("--list", action="store_true", help="list the cells and exit")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="model dtype of every cell and the reference (default fp32); bf16: bf16 weights and "
                         "compute, fp32 master weights and accumulation, bf16 tolerances")
    ap.add_argument("--before-fix", action="store_true",
                    help="with --dtype bf16: train with DeepSpeed's bf16 defaults (gradients summed and "
                         "reduced in bf16), as the launcher did before the fix")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also train the reference in other summation orders and print how far it moves")
    args = ap.parse_args(argv)
    if args.before_fix and args.dtype != "bf16":
        print("parity: --before-fix needs --dtype bf16", file=sys.stderr)
        return 2
    if args.cli and args.dtype != "fp32":
        print("parity: --cli trains its cell in fp32 only; drop --cli or --dtype", file=sys.stderr)
        return 2

    from parity import harness
    from parity.cells import CELLS, select

    if args.list:
        for c in CELLS:
            print(f"{c.name:<16} world {c.world} zero {c.zero} pp {c.pp} ga {c.ga} micro {c.micro}")
        return 0
    try:
        cells = select([p for p in (args.cells or "").split(",") if p])
    except ValueError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="parity-")
    workdir = args.workdir or Path(tmp.name)
    start = time.time()
    # With --json, stdout carries the JSON alone: what libraries print goes to stderr meanwhile.
    saved_stdout = os.dup(1) if args.json else None
    if saved_stdout is not None:
        sys.stdout.flush()
        os.dup2(2, 1)
    try:
        prep = harness.prepare(workdir)
        mode = harness.MODES["bf16-before-fix" if args.before_fix else args.dtype]
        ref = harness.prep_reference(prep, mode.dtype)
        floor = harness.noise_floor(prep, mode.dtype) if args.noise_floor else None
        results = harness.run_cells(cells, prep, ref, mode)
        if args.cli:
            cli_cell = next(c for c in CELLS if c.name == harness.CLI_CELL)
            results.append(harness.run_cli(cli_cell, prep))
    finally:
        if saved_stdout is not None:
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
        if tmp is not None:
            tmp.cleanup()
    ok = all(r.status == "pass" for r in results)
    if args.json:
        tol = mode.tolerances
        print(json.dumps({"mode": mode.name, "dtype": mode.dtype, "loss_rtol": tol.loss_rtol,
                          "grad_norm_rtol": tol.grad_norm_rtol, "weight_atol": tol.weight_atol,
                          "update_rtol": tol.update_rtol, "noise_floor": floor,
                          "reference_losses": ref.losses, "cells": [r.row() for r in results],
                          "ok": ok, "seconds": round(time.time() - start, 1)}, indent=2))
    else:
        if floor is not None:
            print(harness.format_floor(floor))
        print(harness.format_table(results))
        print(f"{sum(r.status == 'pass' for r in results)}/{len(results)} cells pass "
              f"({time.time() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
