"""LoRA under 2-worker ZeRO-3 on CPU (issue 16's acceptance): one uninterrupted run, then a
resume from its step-2 checkpoint as a kill leaves it (identical losses), a resume on one worker
(2 -> 1 reshard, losses within 1e-5), and its exports: the adapter loads with
`peft.PeftModel.from_pretrained` and the merged model with `AutoModelForCausalLM`, both giving
the training model's logits, which the ranks saved at the end of the run (`save_logits`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_recipe_dict

pytestmark = pytest.mark.slow

STEPS = 4
LOGITS = "train-logits.safetensors"
LOGITS_ATOL = 1e-5  # fp32 exports of the fp32 model: the same weights, the same math


def _fixed_input() -> torch.Tensor:
    return torch.arange(2 * 12).reshape(2, 12) * 7 % 250


def save_logits() -> None:
    """In each rank (train_spawn's patch): before the end of the run, the trained model's logits
    on a fixed input (a collective forward under ZeRO-3), saved by rank 0 next to the metrics."""
    import launcher.runtime.trainer.finish as fin

    real = fin.finish

    def finish(trainer):
        from safetensors.torch import save_file

        trainer.engine.eval()
        with torch.no_grad():
            logits = trainer.engine(input_ids=_fixed_input()).logits.float()
        trainer.engine.train()
        if trainer.ctx.rank == 0:
            save_file({"logits": logits.contiguous()}, str(trainer.run_dir / LOGITS))
        return real(trainer)

    fin.finish = finish


def _recipe(**train) -> dict:
    d = tiny_recipe_dict(name="lora-train", parallelism={"zero_stage": 3}, resources={"cpu_workers": 2},
                         checkpoint={"every_steps": 2, "at_end": True, "export_hf_at_end": True})
    d["train"].update(method="lora", max_steps=STEPS, lr=1e-2, **train)
    d["lora"] = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "modules_to_save": ["lm_head"]}
    return d


def _train(d: dict, run_dir: Path, world: int, patch: str | None = None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_spawn import train_ranks

    train_ranks(d, run_dir, world=world, patch=patch)


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and not r.get("eval")]


def _as_killed(baseline: Path, run_dir: Path) -> None:
    """`run_dir` as a SIGKILL in step 4 leaves the baseline: step 2 committed, step 3 logged."""
    shutil.copytree(baseline, run_dir, ignore=shutil.ignore_patterns("hf", LOGITS, "summary.json"))
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    (run_dir / "checkpoints" / "latest").write_text("step-00000002")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(x for x in lines if '"step": 4' not in x and '"end"' not in x) + "\n")


def _export(run_dir: Path, out: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "launcher", "ckpt", "export", str(run_dir), "--out", str(out),
                        "--dtype", "fp32", "--json", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "base"
    (run_dir).mkdir()
    (run_dir / "recipe.yaml").write_text(_yaml(_recipe()))  # what `launcher run` records, for the export
    _train(_recipe(), run_dir, world=2, patch="test_lora_train:save_logits")
    assert len(_losses(run_dir)) == STEPS
    return run_dir


def _yaml(d: dict) -> str:
    from launcher.recipe import from_dict, to_yaml

    return to_yaml(from_dict(d))


def _train_logits(run_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(run_dir / LOGITS))["logits"]


def test_only_adapters_carry_optimizer_state_and_the_base_stays_partitioned(baseline):
    from launcher.checkpoint.zero_reader import read_meta

    meta = read_meta(baseline / "checkpoints" / "step-00000004")
    assert meta.zero_stage == 3 and meta.dp_world_size == 2
    trainable = set(meta.param_groups)
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    # the frozen base is saved too, as each rank's partition
    assert any(n.endswith("q_proj.base_layer.weight") for n in meta.frozen_params)
    start = json.loads((baseline / "metrics.jsonl").read_text().splitlines()[0])
    assert start["params_on_rank0"] <= start["params"] // 2 + 1000  # each rank holds half the model


def test_resume_after_a_kill_gives_identical_losses(baseline, tmp_path):
    run_dir = tmp_path / "killed"
    _as_killed(baseline, run_dir)
    _train(_recipe(), run_dir, world=2)
    assert _losses(run_dir) == _losses(baseline)
    events = [json.loads(x).get("event") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events


def test_reshard_two_workers_to_one_keeps_losses(baseline, tmp_path):
    run_dir = tmp_path / "one"
    _as_killed(baseline, run_dir)
    d = _recipe(micro_batch_size=8)  # the same global batch on one worker
    d["resources"] = {"cpu_workers": 1}
    _train(d, run_dir, world=1)
    got, want = _losses(run_dir), _losses(baseline)
    assert got[:2] == want[:2]
    worst = max(abs(a - b) / b for a, b in zip(got[2:], want[2:]))
    assert len(got) == STEPS and worst < 1e-5, (got, want)


def test_exported_adapter_loads_in_peft_with_the_training_logits(baseline):
    """The end-of-run export (checkpoint.export_hf_at_end, the same `export_checkpoint` that
    `launcher ckpt export` calls; fp32 as the run) wrote the adapter in PEFT's format."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = baseline / "hf"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["modules_to_save"] == ["lm_head"]
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["hf_export"] == str(out)
    base = AutoModelForCausalLM.from_pretrained(out / "base")  # the random-init base, from the checkpoint
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(input_ids=_fixed_input()).logits
    torch.testing.assert_close(logits, _train_logits(baseline), atol=LOGITS_ATOL, rtol=0)


def test_merged_export_loads_with_automodel_with_the_training_logits(baseline, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    summary = _export(baseline, out, "--merge")  # `launcher ckpt export --merge`, as a user runs it
    assert summary["lora"] and summary["merged"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        logits = model(input_ids=_fixed_input()).logits
    torch.testing.assert_close(logits, _train_logits(baseline), atol=LOGITS_ATOL, rtol=0)
