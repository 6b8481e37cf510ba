"""TRL parity: on the same batch and weights (a tiny Llama from config, fp32), the DPO (sigmoid),
ORPO and KTO losses and their gradients equal TRL's own (trl 1.16: DPOTrainer._compute_loss,
ORPOTrainer.get_batch_loss_metrics, KTOTrainer._compute_loss, each on a trainer built around a
copy of the same model) within 1e-5 relative, and so do the reward metrics."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from conftest import tiny_recipe_dict
from launcher.data import build_datasets, build_tokenizer, collate
from launcher.recipe import from_dict
from launcher.runtime.model import build_model
from launcher.runtime.preference.objectives import DPO, KTO, ORPO, metric_means
from launcher.runtime.preference.reference import ModuleReference

pytest.importorskip("trl")

RTOL = 1e-5
PAIRS = 4


def recipe(task: str, synthetic: str):
    d = tiny_recipe_dict(data={"format": "alpaca", "synthetic": {"task": synthetic, "num_examples": 16},
                               "prompt_template": "{instruction}\n{input_block}", "max_seq_len": 64})
    d["train"]["task"] = task
    d["preference"] = {"beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    return from_dict(d)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(recipe("dpo", "reverse_pairs").tokenizer, None)


def models(r, tok, policy_seed: int = 0, ref_seed: int = 1):
    """(policy for launcher, the same policy for TRL, a different reference)."""
    policy = build_model(r.model, tok, seed=policy_seed)
    return policy, copy.deepcopy(policy), build_model(r.model, tok, seed=ref_seed).eval()


def batch_of(r, tok):
    examples = build_datasets(r, tok).train
    return collate([examples[i] for i in range(PAIRS)], pad_id=tok.pad_token_id)


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_parity(mine: torch.Tensor, theirs: torch.Tensor, a, b) -> None:
    assert abs(mine.item() - theirs.item()) <= RTOL * abs(theirs.item()), (mine.item(), theirs.item())
    ga, gb = grads(a), grads(b)
    assert gb.norm() > 0
    assert (ga - gb).norm() <= RTOL * gb.norm(), float((ga - gb).norm() / gb.norm())


def trainer(cls, config_cls, model, ref, tok, rows, **kw):
    from datasets import Dataset

    args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, report_to=[],
                      use_cpu=True, bf16=False, fp16=False, **kw)
    extra = {"ref_model": ref} if ref is not None else {}
    return cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, **extra)


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    return (labels != -100).long()


def test_dpo_sigmoid_loss_gradients_and_rewards_equal_trl(tok):
    from trl import DPOConfig, DPOTrainer

    r = recipe("dpo", "reverse_pairs")
    batch = batch_of(r, tok)
    mine_model, trl_model, ref = models(r, tok)
    obj = DPO(r.preference, ModuleReference(ref))
    mine = obj.loss(mine_model, batch, float(PAIRS))
    mine.backward()
    tr = trainer(DPOTrainer, DPOConfig, trl_model, copy.deepcopy(ref), tok,
                 [{"prompt": "ab", "chosen": "ba", "rejected": "ab"}] * PAIRS, beta=r.preference.beta, loss_type=["sigmoid"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion_mask(batch["labels"])}
    theirs = tr._compute_loss(tr.model, inputs, False)
    theirs.backward()
    assert_parity(mine, theirs, mine_model, trl_model)
    metrics = metric_means(obj.take_metrics())
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[name] == pytest.approx(tr._metrics["train"][name][-1], rel=RTOL, abs=1e-7), name


def test_orpo_loss_and_gradients_equal_trl(tok):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    r = recipe("orpo", "reverse_pairs")
    batch = batch_of(r, tok)
    mine_model, trl_model, _ = models(r, tok)
    obj = ORPO(r.preference)
    obj.begin_step(mine_model, [batch], "cpu", reduce=False)
    mine = obj.loss(mine_model, batch, float(PAIRS))
    mine.backward()
    tr = trainer(ORPOTrainer, ORPOConfig, trl_model, None, tok,
                 [{"prompt": "ab", "chosen": "ba", "rejected": "ab"}] * PAIRS, beta=r.preference.beta)
    half = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    trl_batch = {f"{side}_{k}": v[rows] for k, v in half.items()
                 for side, rows in (("chosen", slice(0, PAIRS)), ("rejected", slice(PAIRS, None)))}
    theirs, trl_metrics = tr.get_batch_loss_metrics(tr.model, trl_batch)
    theirs.backward()
    assert_parity(mine, theirs, mine_model, trl_model)
    metrics = metric_means(obj.take_metrics())
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), rel=RTOL, abs=1e-7), name
    assert metrics["nll_loss"] == pytest.approx(float(trl_metrics["nll_loss"]), rel=RTOL)


def test_kto_loss_kl_and_gradients_equal_trl(tok):
    from trl import KTOConfig, KTOTrainer

    r = recipe("kto", "reverse_kto")
    batch = batch_of(r, tok)
    assert 0 < int(batch["desirable"].sum()) < PAIRS  # both kinds of example in the batch
    # the seed order whose KL estimate is positive: a negative one is clamped to 0, testing nothing
    for seeds in ((0, 1), (1, 0)):
        mine_model, trl_model, ref = models(r, tok, *seeds)
        obj = KTO(r.preference, ModuleReference(ref))
        obj.begin_step(mine_model, [batch], "cpu", reduce=False)
        if obj.kl > 0:
            break
    assert obj.kl > 0
    mine = obj.loss(mine_model, batch, float(PAIRS))
    mine.backward()
    p = r.preference
    tr = trainer(KTOTrainer, KTOConfig, trl_model, copy.deepcopy(ref), tok,
                 [{"prompt": "ab", "completion": "ba", "label": i % 2 == 0} for i in range(PAIRS)],
                 beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion_mask(batch["labels"]), "label": batch["desirable"],
              "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": completion_mask(batch["kl_labels"])}
    theirs = tr._compute_loss(tr.model, inputs, False)
    theirs.backward()
    assert_parity(mine, theirs, mine_model, trl_model)
    metrics = metric_means(obj.take_metrics())
    assert metrics["kl"] == pytest.approx(tr._metrics["train"]["kl"][-1], rel=RTOL, abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected"):
        assert metrics[name] == pytest.approx(tr._metrics["train"][name][-1], rel=RTOL, abs=1e-7), name
