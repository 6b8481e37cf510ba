"""Checkpoint files are opened weights-only with an allowlist: a crafted pickle never runs."""

from __future__ import annotations

import os
import pickle
import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from launcher.checkpoint.safe_load import safe_load
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, evil)
    with pytest.raises(UserError) as e:
        safe_load(evil)
    msg = str(e.value)
    assert str(evil) in msg and "posix.system" in msg and "refused" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no pickle traceback
    assert not marker.exists()


def test_a_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": _RunsCode(marker)}, f)
    with pytest.raises(UserError, match=re.escape(str(evil)) + ".*refused"):
        safe_load(evil)
    assert not marker.exists()


def test_a_class_outside_the_allowlist_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"args": Namespace(lr=1.0)}, path)
    with pytest.raises(UserError, match="argparse.Namespace"):
        safe_load(path)


def test_truncated_and_missing_files_are_user_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="bad.pt: not a readable torch checkpoint"):
        safe_load(bad)
    with pytest.raises(UserError, match="no such checkpoint file"):
        safe_load(tmp_path / "nope.pt")


def test_tensors_and_deepspeed_types_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "ok.pt"
    data = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
            "maps": [{"w": fragment_address(numel=4, start=0)}], "w": torch.ones(4), "step": 3}
    torch.save(data, path)
    got = safe_load(path)
    assert got["zero_stage"] == ZeroStageEnum.weights and got["maps"][0]["w"].numel == 4
    assert torch.equal(got["w"], torch.ones(4)) and got["step"] == 3


def test_the_project_loads_pickles_only_through_safe_load():
    """Every torch.load in launcher/ is the weights-only one in safe_load.safe_load."""
    offenders = []
    for path in (ROOT / "launcher").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(|weights_only\s*=\s*False", code):
                if path.name == "safe_load.py" and "weights_only=True" in code:
                    continue
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "load checkpoints with launcher.checkpoint.safe_load.safe_load:\n" + "\n".join(offenders)


def test_readers_load_deepspeed_types_without_importing_deepspeed(tmp_path):
    """The export and verify never import DeepSpeed (seconds of start-up): stand-ins registered
    under DeepSpeed's names load its four classes, and anything else is still refused."""
    import subprocess
    import sys

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "ok.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(2.0),
                "maps": [{"w": fragment_address(numel=4, start=8)}], "w": torch.ones(4)}, path)
    code = (
        "import sys\n"
        "from launcher.checkpoint.safe_load import safe_load\n"
        f"sd = safe_load({str(path)!r})\n"
        "assert 'deepspeed' not in sys.modules\n"
        "assert sd['zero_stage'] == 3 and sd['maps'][0]['w'].numel == 4 and sd['maps'][0]['w'].start == 8\n"
        "assert sd['loss_scaler'].cur_scale == 2.0 and sd['w'].sum() == 4\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
