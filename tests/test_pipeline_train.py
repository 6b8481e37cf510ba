"""Pipeline-parallel training with DeepSpeed's pipe engine on CPU (gloo), against the plain run.

- 2 stages on 2 workers (Llama, ZeRO-0) and 2 stages x 2 data-parallel on 4 workers (GPT-2 with
  tied embeddings, ZeRO-1) train the same model as one worker without a pipeline: per-step
  losses, gradient norms and eval loss to 1e-5 relative, exported weights to 2e-5 absolute
  (fp32; differences are summation order only: the pipeline's loss is broadcast in fp32).
- A pipeline run stopped by a stop request (the driver's SIGTERM channel) after step 1 and
  resumed gives bit-for-bit the losses of the uninterrupted run.
- Its export reloads as an ordinary Hugging Face model whose logits equal those of the pipeline
  layers loaded from the checkpoint (1e-6 absolute).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe_dict
from train_spawn import train_ranks

pytestmark = pytest.mark.slow

RTOL = 1e-5
WEIGHTS_ATOL = 2e-5
STEPS = 5

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128,
        "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _recipe(model: dict, *, stages: int, workers: int, zero: int, micro: int, accum: int, **train) -> dict:
    d = tiny_recipe_dict(
        name="pp",
        parallelism={"zero_stage": zero, "pipeline_stages": stages},
        resources={"cpu_workers": workers},
        checkpoint={"every_steps": 2, "export_hf_at_end": True},
        sample={"from_eval": 1, "max_new_tokens": 2},
    )
    d["model"] = {"config": dict(model), "dtype": "fp32"}
    d["data"] = {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 200},
                 "max_seq_len": 64, "eval_fraction": 0.05}
    d["train"] = {"max_steps": STEPS, "micro_batch_size": micro, "grad_accum": accum, "lr": 1e-3,
                  "schedule": "constant", "eval_every": 2, "eval_batches": 16, **train}
    return d


def _records(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return ([r for r in rows if "loss" in r and not r.get("eval")], [r for r in rows if r.get("eval")], rows)


def _weights(run_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "hf").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_training(ref_dir, pp_dir):
    ref, ref_eval, _ = _records(ref_dir)
    got, got_eval, _ = _records(pp_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["label_tokens"] == a["label_tokens"] and b["step_tokens"] == a["step_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL), a["step"]
    assert [e["step"] for e in got_eval] == [e["step"] for e in ref_eval]
    for a, b in zip(ref_eval, got_eval):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=RTOL)
    ref_w, got_w = _weights(ref_dir), _weights(pp_dir)
    assert got_w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=0, atol=WEIGHTS_ATOL, msg=k)


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp-llama")
    train_ranks(_recipe(LLAMA, stages=1, workers=1, zero=0, micro=2, accum=2), root / "ref", world=1)
    train_ranks(_recipe(LLAMA, stages=2, workers=2, zero=0, micro=2, accum=2), root / "pp2", world=2)
    return root


def test_two_stages_train_like_one_worker(llama_runs):
    _assert_same_training(llama_runs / "ref", llama_runs / "pp2")
    _, _, rows = _records(llama_runs / "pp2")
    start = rows[0]
    assert start["event"] == "start" and start["world_size"] == 2
    ref_start = _records(llama_runs / "ref")[2][0]
    assert start["params"] == ref_start["params"]  # summed over the stages
    assert start["params_on_rank0"] < 0.7 * start["params"]  # stage 0 holds only its layers
    summary = json.loads((llama_runs / "pp2" / "summary.json").read_text())
    assert summary["samples_skipped"] == 1  # no generation from a pipeline (documented)
    names = sorted(p.name for p in (llama_runs / "pp2" / "checkpoints" / "step-00000005").iterdir())
    # embedding, 4 decoder layers, norm, head: one file each
    assert [n for n in names if n.startswith("layer_")] == [f"layer_{i:02d}-model_states.pt" for i in range(7)]


def test_two_stages_by_two_replicas_tied_gpt2_zero1(tmp_path):
    ref = _recipe(GPT2, stages=1, workers=1, zero=0, micro=2, accum=2)
    train_ranks(ref, tmp_path / "ref", world=1)
    pp = _recipe(GPT2, stages=2, workers=4, zero=1, micro=1, accum=2, max_grad_norm=1.0)
    pp["parallelism"]["pipeline_partition"] = "layers"
    train_ranks(pp, tmp_path / "pp", world=4)
    _assert_same_training(tmp_path / "ref", tmp_path / "pp")
    assert "lm_head.weight" not in _weights(tmp_path / "pp")  # tied: written once


def test_stopped_pipeline_run_resumes_bit_for_bit(llama_runs, tmp_path):
    recipe = _recipe(LLAMA, stages=2, workers=2, zero=0, micro=2, accum=2)
    run = tmp_path / "run"
    train_ranks(recipe, run, world=2, stop=True)
    preempted = json.loads((run / "preempted.json").read_text())
    assert preempted["step"] == 1 and preempted["committed"] == "step-00000001"
    train_ranks(recipe, run, world=2)
    steps, _, rows = _records(run)
    assert any(r.get("event") == "resume" and r["step"] == 1 for r in rows)
    ref, _, _ = _records(llama_runs / "pp2")
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref]  # exact
    assert [r["grad_norm"] for r in steps] == [r["grad_norm"] for r in ref]


def test_export_logits_equal_the_pipeline_layers_from_the_checkpoint(llama_runs):
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.checkpoint.zero_reader import pipeline_layer_files, read_pipeline_layer
    from launcher.runtime.pipeline import _Source, _specs, pipe_inputs

    step_dir = llama_runs / "pp2" / "checkpoints" / "step-00000005"
    exported = AutoModelForCausalLM.from_pretrained(llama_runs / "pp2" / "hf", dtype=torch.float32).eval()
    # the pipeline's layers on a fresh model, each loaded from its own layer file
    torch.manual_seed(123)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama_runs / "pp2" / "hf"),
                                             dtype=torch.float32).eval()
    layers = [spec.build() for spec in _specs(fresh, _Source(fresh))]
    for i, path in pipeline_layer_files(step_dir).items():
        layers[i].load_state_dict(read_pipeline_layer(path))
    ids = torch.arange(2 * 12).reshape(2, 12) * 7 % 250 + 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        x = pipe_inputs(batch)
        for layer in layers:
            x = layer(x)
        torch.testing.assert_close(exported(**batch).logits, x, rtol=0, atol=1e-6)
