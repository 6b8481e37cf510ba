"""Packing boundaries, collation, and that packed documents do not see each other in a model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.data import chunk_documents, collate, pack_documents, pack_examples


def random_docs(n: int, seed: int, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def segments(ex: dict) -> list[tuple[int, int]]:
    """[start, end) of each run of position ids counting up from 0."""
    starts = [i for i, p in enumerate(ex["position_ids"]) if p == 0]
    return list(zip(starts, [*starts[1:], len(ex["position_ids"])]))


@pytest.mark.parametrize("max_seq_len", [8, 16, 64])
def test_pack_documents_boundaries(max_seq_len):
    docs = random_docs(60, seed=max_seq_len, max_len=2 * max_seq_len)
    assert any(len(d) > max_seq_len for d in docs)
    packed = pack_documents(docs, max_seq_len)
    assert all(len(ex["input_ids"]) == max_seq_len for ex in packed[:-1])
    assert 2 <= len(packed[-1]["input_ids"]) <= max_seq_len
    # Every token of every document exactly once, in order; only a 1-token tail (nothing to
    # predict) may be left over.
    stream, flat = [t for ex in packed for t in ex["input_ids"]], [t for d in docs for t in d]
    assert stream == flat[: len(stream)]
    assert len(flat) - len(stream) == (1 if len(flat) % max_seq_len == 1 else 0)

    # Document starts (and continuations of a cut document) are where positions restart.
    starts, offset = set(), 0
    for d in docs:
        starts |= {offset} | set(
            range(offset - offset % max_seq_len + max_seq_len, offset + len(d), max_seq_len)
        )
        offset += len(d)
    for k, ex in enumerate(packed):
        for i, (tok, pos, label) in enumerate(
            zip(ex["input_ids"], ex["position_ids"], ex["labels"])
        ):
            is_start = k * max_seq_len + i in starts
            assert (pos == 0) == is_start
            assert label == (-100 if is_start else tok)  # nothing predicted across a boundary
            if not is_start:
                assert pos == ex["position_ids"][i - 1] + 1


def test_pack_examples_keeps_examples_whole():
    rng = random.Random(0)
    examples = []
    for d in random_docs(40, seed=1, max_len=30):
        cut = rng.randint(0, len(d) - 1)
        examples.append({"input_ids": d, "labels": [-100] * cut + d[cut:], "position_ids": None})
    packed = pack_examples(examples, 32)
    assert all(len(ex["input_ids"]) <= 32 for ex in packed)
    assert len(packed) < len(examples)
    rebuilt = []
    for ex in packed:
        for a, b in segments(ex):
            rebuilt.append((ex["input_ids"][a:b], ex["labels"][a:b]))
    assert [ids for ids, _ in rebuilt] == [ex["input_ids"] for ex in examples]
    for (_, labels), ex in zip(rebuilt, examples):
        assert labels == [-100, *ex["labels"][1:]]
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        pack_examples([{"input_ids": [1] * 40, "labels": [1] * 40}], 32)


def test_chunk_documents_without_packing():
    docs = [[5] * 10, [6] * 9, [7]]
    chunks = chunk_documents(docs, 4)
    assert [len(c["input_ids"]) for c in chunks] == [4, 4, 2, 4, 4]  # 1-token tails dropped
    assert all(c["position_ids"] is None and c["labels"][0] == -100 for c in chunks)
    assert all(c["labels"][1:] == c["input_ids"][1:] for c in chunks)


def test_collate_unpacked_and_packed():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": None}
    b = {"input_ids": [4], "labels": [-100], "position_ids": None}
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert collate([a], pad_id=9, pad_to=5)["input_ids"].tolist() == [[1, 2, 3, 9, 9]]

    p = {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]}
    q = {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}
    batch = collate([p, q], pad_id=0, pad_to=6)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [
        [-100, 2, -100, 4, -100, -100],
        [-100, 6, -100, -100, -100, -100],
    ]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([a, p], pad_id=0)
    with pytest.raises(ValueError):
        collate([p], pad_id=0, pad_to=2)


def tiny_llama(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, attn_implementation=impl,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llama(request.param)


def test_packed_documents_do_not_attend_across_boundaries(model):
    docs = random_docs(8, seed=7, max_len=20) + [[11, 12, 13, 14, 15, 16, 17]]
    packed = pack_examples([{"input_ids": d, "labels": d} for d in docs], 40)
    batch = collate(packed, pad_id=0, pad_to=48)  # padding tails: pseudo-documents of their own
    assert batch["position_ids"].shape == (len(packed), 48)
    assert len(packed) > 1 and max(len(segments(ex)) for ex in packed) > 2
    remaining = iter(docs)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        for k, ex in enumerate(packed):
            for a, b in segments(ex):
                doc = next(remaining)
                assert ex["input_ids"][a:b] == doc
                alone = model(input_ids=torch.tensor([doc]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[k, a:b], alone, atol=1e-5, rtol=0)
    assert next(remaining, None) is None


def test_packed_loss_equals_separate_losses(model):
    docs = random_docs(4, seed=3, max_len=15)
    packed = pack_documents([[1, *d, 2] for d in docs], 1000)  # one row, bos ... eos per doc
    assert len(packed) == 1
    batch = collate(packed, pad_id=0)
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
        total, count = 0.0, 0
        for d in docs:
            ids = torch.tensor([[1, *d, 2]])
            total += model(input_ids=ids, labels=ids, use_cache=False).loss * (len(d) + 1)
            count += len(d) + 1
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


def test_default_kv_cache_or_a_mask_defeat_packing(model):
    """Documents the transformers 5.23 behaviour packing.py warns about: with `use_cache` left at
    its default (True, even in train mode) a DynamicCache is created and the packed-sequence
    detection is skipped; an explicit attention_mask also disables it. Documents then leak."""
    a, b = [20, 21, 22, 23, 24], [30, 31, 32, 33]
    batch = collate(
        pack_examples([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], 16), pad_id=0
    )
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        for kwargs in (
            {},
            {"attention_mask": torch.ones_like(batch["input_ids"]), "use_cache": False},
        ):
            leaked = model(**batch, **kwargs).logits[0, len(a) :]
            assert (leaked - alone).abs().max() > 1e-3
        model.train()
        try:
            leaked = model(**batch).logits[0, len(a) :]  # train mode does not change the default
        finally:
            model.eval()
        assert (leaked - alone).abs().max() > 1e-3
