"""The parity harness's own arithmetic (fast: no spawn, no training)."""

from __future__ import annotations

from pathlib import Path

import torch

from parity import harness
from parity.cells import CELLS, recipe_dict
from parity.reference import ReferenceResult


def test_bf16_export_is_allowed_its_own_rounding_only():
    master = torch.tensor([1.0 + 2**-10, 0.5, -3.0], dtype=torch.float64)
    rounded = master.to(torch.bfloat16)  # what a ZeRO-0 export of bf16 module weights holds
    assert float(harness.weight_difference(rounded, master).max()) == 0.0
    off = rounded.to(torch.float32) + torch.tensor([0.0, 0.0, 1e-3])  # no longer all bf16 numbers:
    diff = harness.weight_difference(off, master)  # no allowance, the rounding of 1 + 2**-10 counts
    assert abs(float(diff[2]) - 1e-3) < 1e-6 and float(diff[0]) == 2**-10
    one_ulp_off = rounded.clone()
    one_ulp_off[1] = torch.tensor(0.5 + 2**-8, dtype=torch.bfloat16)  # 0.5's next bf16 number
    assert 0 < float(harness.weight_difference(one_ulp_off, master).max()) <= 2**-8


def test_update_deviation_is_relative_to_the_whole_update():
    init = {"w": torch.zeros(4, dtype=torch.float64)}
    state = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)}  # update of norm 5
    ref = ReferenceResult([1.0], [1.0], [[0]], [1], state, init)
    assert harness.update_deviation([torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64)], ref) == 0.1


def test_modes_set_dtype_and_the_before_fix_block():
    cell = CELLS[0]
    bf16 = harness.MODES["bf16"]
    data = recipe_dict(cell, Path("m"), dtype=bf16.dtype, deepspeed=bf16.deepspeed)
    assert data["model"]["dtype"] == "bf16" and "deepspeed" not in data
    old = harness.MODES["bf16-before-fix"]
    data = recipe_dict(cell, Path("m"), dtype=old.dtype, deepspeed=old.deepspeed)
    assert data["deepspeed"]["data_types"] == {"grad_accum_dtype": "bf16"}
    assert old.tolerances is harness.TOLERANCES["bf16"] and harness.FP32.prefix == ""
    assert recipe_dict(cell, Path("m"))["model"]["dtype"] == "fp32"


def test_a_trailing_dollar_selects_one_cell_exactly():
    from parity.cells import select

    assert [c.name for c in select(["w2-z0-ga4$"])] == ["w2-z0-ga4"]
    assert "w2-z0-ga4-pp2" in [c.name for c in select(["w2-z0-ga4"])]
