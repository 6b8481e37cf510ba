"""The reference policies of DPO and KTO, single process: the frozen copy is the starting model
(not the trained one) and leaves the RNG streams alone; `base` disables LoRA adapters; `auto`
picks between them."""

from __future__ import annotations

import dataclasses

import torch

from conftest import tiny_recipe_dict
from launcher.data import build_tokenizer
from launcher.recipe import from_dict
from launcher.runtime.model import build_model
from launcher.runtime.preference.reference import AdaptersOff, FrozenCopy, reference_for


def recipe(task: str = "dpo", **train):
    d = tiny_recipe_dict(data={"format": "alpaca", "synthetic": {"task": "reverse_pairs"}, "max_seq_len": 64})
    d["train"].update(task=task, **train)
    return from_dict(d)


def batch(n: int = 2, length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, torch.ones_like(ids), labels


def test_the_copy_is_the_starting_model_and_leaves_the_rng_alone():
    r = recipe()
    tok = build_tokenizer(r.tokenizer, None)
    policy = build_model(r.model, tok, seed=r.train.seed)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():  # the policy trains away from its start, as before a resume
        for p in policy.parameters():
            p.add_(0.01)
    ref = FrozenCopy(r)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    built = ref.model(policy)
    assert torch.equal(torch.rand(3), expected_next)  # building it drew nothing from the stream
    assert all(torch.equal(built.state_dict()[k], v) for k, v in start.items())
    assert not any(p.requires_grad for p in built.parameters()) and not built.training
    ids, mask, labels = batch()
    ref_logps = ref.logps(policy, ids, mask, labels)
    assert ref_logps.shape == (2,) and not ref_logps.requires_grad
    assert ref.model(policy) is built  # built once


def test_base_disables_the_adapters():
    from peft import LoraConfig, get_peft_model

    r = recipe()
    tok = build_tokenizer(r.tokenizer, None)
    base = build_model(r.model, tok, seed=0)
    ids, mask, labels = batch()
    from launcher.runtime.preference.logps import forward_logits, sequence_logps

    with torch.no_grad():
        want = sequence_logps(forward_logits(base, ids, mask), labels)
    policy = get_peft_model(build_model(r.model, tok, seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the output
        trained = sequence_logps(forward_logits(policy, ids, mask), labels)
    assert not torch.allclose(trained, want)
    assert torch.allclose(AdaptersOff().logps(policy, ids, mask, labels), want, rtol=1e-6)


def test_auto_is_base_with_lora_and_a_copy_otherwise():
    r = recipe()
    assert isinstance(reference_for(r), FrozenCopy)
    lora = dataclasses.replace(r, train=dataclasses.replace(r.train, method="lora"))
    assert isinstance(reference_for(lora), AdaptersOff)
    assert reference_for(recipe("orpo")) is None
