"""`model.activation_checkpointing: none | selective | full`: the recipe key (and the old boolean it
replaces), and training with it: the same losses and weights as without, while the backward pass
recomputes what the mode says (single process, tiny fp32 models, a few steps)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_recipe_dict
from launcher.errors import RecipeError
from launcher.recipe import from_dict
from launcher.recipe.load import to_dict
from launcher.runtime.recompute import apply_activation_checkpointing

# --- the recipe key ------------------------------------------------------------------------------


def _model_section(**model):
    d = tiny_recipe_dict()
    d["model"].update(model)
    return from_dict(d).model


def test_the_old_boolean_still_loads():
    assert _model_section(gradient_checkpointing=True).activation_checkpointing == "full"
    assert _model_section(gradient_checkpointing=False).activation_checkpointing == "none"
    assert _model_section(gradient_checkpointing=True, activation_checkpointing="full").activation_checkpointing == "full"
    assert _model_section().activation_checkpointing == "none"
    m = _model_section(activation_checkpointing="selective")
    assert m.gradient_checkpointing is True  # read-only view for old callers
    with pytest.raises(AttributeError):
        m.gradient_checkpointing = False  # type: ignore[misc]
    # what the run directory records: only the new key
    d = tiny_recipe_dict()
    d["model"]["gradient_checkpointing"] = True
    model = to_dict(from_dict(d))["model"]
    assert model["activation_checkpointing"] == "full" and "gradient_checkpointing" not in model


def test_both_keys_in_conflict_is_an_error_naming_both():
    with pytest.raises(RecipeError) as e:
        _model_section(gradient_checkpointing=False, activation_checkpointing="selective")
    msg = str(e.value)
    assert e.value.key == "model.gradient_checkpointing" and "model.activation_checkpointing=selective" in msg
    with pytest.raises(RecipeError, match="model.gradient_checkpointing: expected true or false"):
        _model_section(gradient_checkpointing="yes")
    with pytest.raises(RecipeError, match="model.activation_checkpointing: must be one of 'none', 'selective'"):
        _model_section(activation_checkpointing="partial")


def test_replace_with_the_old_boolean_keeps_working():
    """`replace(model, gradient_checkpointing=False)` (the training loop's spelling) turns it off;
    any other replace keeps the mode, selective included."""
    m = _model_section(activation_checkpointing="selective")
    assert replace(m, gradient_checkpointing=False).activation_checkpointing == "none"
    assert replace(m, dtype="fp32").activation_checkpointing == "selective"
    assert replace(_model_section(), gradient_checkpointing=True).activation_checkpointing == "full"


def test_shipped_recipes_use_the_new_key():
    from conftest import ROOT

    texts = {p: p.read_text() for p in (ROOT / "recipes").rglob("*.yaml")}
    assert not [p for p, t in texts.items() if "gradient_checkpointing" in t]
    assert any("activation_checkpointing: full" in t for t in texts.values())


# --- training --------------------------------------------------------------------------------------

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),  # dropout 0.1 everywhere
}


def _model(name: str, mode: str, attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**CONFIGS[name], "vocab_size": 97})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return apply_activation_checkpointing(model, mode).train()


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(name: str, mode: str, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model(name, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(7)  # dropout masks: the same draws in every mode (checkpointing restores the RNG)
    losses = []
    for _ in range(steps):
        loss = model(**_batch(0), num_items_in_batch=20.0).loss  # one batch: the loss must fall
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_selective_and_full_train_exactly_as_none(name):
    ref_losses, ref_state = _train(name, "none")
    assert ref_losses[-1] < ref_losses[0]  # it trains
    for mode in ("selective", "full"):
        losses, state = _train(name, mode)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=0, msg=mode)
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-6, atol=1e-9, msg=f"{mode}: {k}")


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(name: str, mode: str) -> dict[str, int]:
    model = _model(name, mode, attn="eager")  # eager: the softmax is an op of its own
    loss = model(**_batch(0)).loss
    with _CountOps() as ops:
        loss.backward()
    return ops.counts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_selective_recomputes_attention_and_elementwise_ops_but_no_matmul(name):
    """What the backward pass runs: `none` recomputes nothing, `full` the whole layer (its matmuls
    too), `selective` the softmax and elementwise ops but not one matmul of the forward."""
    none, selective, full = (_backward_ops(name, m) for m in ("none", "selective", "full"))
    matmuls = lambda c: c.get("mm", 0) + c.get("addmm", 0)  # noqa: E731
    assert none.get("_softmax", 0) == 0
    assert selective.get("_softmax", 0) == full.get("_softmax", 0) == CONFIGS_LAYERS[name]
    assert matmuls(selective) == matmuls(none)  # kept, not recomputed
    assert matmuls(full) > matmuls(none)
    assert selective.get("bmm", 0) == full.get("bmm", 0) > none.get("bmm", 0)  # the attention core


CONFIGS_LAYERS = {"llama": 2, "gpt2": 2}


def test_a_model_that_cannot_recompute_is_a_recipe_error():
    model = _model("llama", "none")
    type(model).supports_gradient_checkpointing = False  # as some remote-code models
    try:
        want = "model.activation_checkpointing: LlamaForCausalLM cannot .* set model.activation_checkpointing=none"
        with pytest.raises(RecipeError, match=want):
            apply_activation_checkpointing(model, "selective")
    finally:
        del type(model).supports_gradient_checkpointing
    assert apply_activation_checkpointing(model, "none") is model


def test_pipeline_decoder_layers_checkpoint_in_the_mode(monkeypatch):
    """build_pipeline_module hands DeepSpeed the mode's checkpoint function and turns off the
    Hugging Face layers' own (they would checkpoint twice)."""
    from launcher.runtime import pipeline

    seen = {}

    class FakePipelineModule:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            self._layer_specs = kwargs["layers"]

        def parameters(self):
            return iter(())

    import deepspeed.pipe

    monkeypatch.setattr(deepspeed.pipe, "PipelineModule", FakePipelineModule)
    for mode, expect in (("none", None), (False, None), ("selective", "context_fn"), ("full", "use_reentrant"),
                         (True, "use_reentrant")):
        hf = _model("llama", "full")
        seen.clear()
        pipeline.build_pipeline_module(hf, stages=2, activation_checkpointing=mode)
        assert not hf.is_activation_checkpointing
        fn = seen.get("activation_checkpoint_func")
        if expect is None:
            assert fn is None and "activation_checkpoint_interval" not in seen
        else:
            assert seen["activation_checkpoint_interval"] == 1 and expect in fn.keywords
            assert ("context_fn" in fn.keywords) == (mode == "selective")


# --- under ZeRO-3 (one spawned process) ------------------------------------------------------------------

ZERO3_CASES = [("none", 0), ("selective", 8), ("full", 0)]
"""(activation_checkpointing, train.chunked_loss): the chunked loss fetches the head's partitioned
weight through the head's own ZeRO-3 hooks, and the recompute fetches the layers' weights again.
One rank is enough for that (its parameters are placeholders outside the hooks, as on many)."""


def _zero3_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import gc
    import json
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.data import build_tokenizer
    from launcher.runtime.ds_config import build_ds_config
    from launcher.runtime.model import build_model, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    losses = {}
    for mode, chunk in ZERO3_CASES:
        d = tiny_recipe_dict(parallelism={"zero_stage": 3}, resources={"cpu_workers": world})
        d["model"]["activation_checkpointing"] = mode
        d["model"]["config"]["tie_word_embeddings"] = True  # the head's weight is the embedding's
        d["train"] = {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-2, "chunked_loss": chunk}
        recipe = from_dict(d)
        ds_config = build_ds_config(recipe, data_parallel=world, on_gpu=False)
        # partition even the tiny parameters (by default ZeRO-3 keeps those under 1e5 gathered)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        hf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init while building, as the runtime)
        tok = build_tokenizer(recipe.tokenizer, None)
        model = build_model(recipe.model, tok, seed=0, chunked_loss=recipe.train.chunked_loss)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0),
                                               config=ds_config)
        run = []
        batch = _batch(rank)
        batch["input_ids"] = batch["input_ids"] % 200 + 3
        for _ in range(2):
            loss = engine(**batch, num_items_in_batch=20.0).loss
            engine.backward(loss)
            engine.step()
            run.append(loss.item())
        # partitioned: outside the modules' hooks this rank holds placeholders only
        assert all(p.data.numel() == 0 for p in engine.module.parameters())
        losses[f"{mode}-{chunk}"] = run
        del engine, model, hf
        gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(losses, f)


@pytest.mark.slow
def test_zero3_selective_full_and_chunked_train_as_none(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_worker, args=(1, port, str(tmp_path)), nprocs=1, join=True)
    losses = json.loads((tmp_path / "rank0.json").read_text())
    ref = losses["none-0"]
    assert ref[-1] < ref[0], losses
    assert len(losses) == len(ZERO3_CASES)
    for case, run in losses.items():
        torch.testing.assert_close(run, ref, rtol=1e-6, atol=0, msg=f"{case}: {losses}")


# --- in DeepSpeed's pipe engine (two stages, two processes) ---------------------------------------


def _pipe_worker(rank: int, port: int, out_dir: str) -> None:
    import json
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from launcher.runtime.pipeline import build_pipeline_module, pipe_micro_batch

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "zero_optimization": {"stage": 0}}
    batches = [pipe_micro_batch(_batch(i), 20.0) for i in range(2)]
    losses = {}
    for tied in (False, True):  # the head as its own layer, and as the tied embedding
        for mode, chunk in (("none", 0), ("selective", 5)):
            hf = _model("llama", "none")
            hf.config.tie_word_embeddings = tied
            if tied:
                hf.tie_weights()
            module = build_pipeline_module(hf, stages=2, activation_checkpointing=mode, chunked_loss=chunk)
            engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=ds)
            run = [float(engine.train_batch(iter(batches))) for _ in range(2)]
            run.append(float(engine.eval_batch(iter(batches), num_micro_batches=2)))
            losses[f"tied={tied} {mode}-{chunk}"] = run
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(losses, f)


@pytest.mark.slow
def test_pipeline_selective_and_chunked_loss_train_as_none(tmp_path):
    """The pipe engine takes the head's (hidden, weight) output on the last stage; train and eval
    losses equal those without (1e-6 relative)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pipe_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    losses = json.loads((tmp_path / "rank1.json").read_text())  # the last stage's
    assert len(losses) == 4
    for tied in (False, True):
        ref = losses[f"tied={tied} none-0"]
        torch.testing.assert_close(losses[f"tied={tied} selective-5"], ref, rtol=1e-6, atol=0, msg=str(losses))
