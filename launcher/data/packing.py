"""Packing several documents into each sequence, and chunking documents without packing.

A packed example carries `position_ids` that restart at 0 at every document start, and the
label of each document's first token is -100: transformers shifts labels inside the loss
(logits[t] predict labels[t+1]), so that label is what the previous document's last token
would otherwise be trained to predict across the boundary.

How documents stay apart in attention (transformers 5.23, checked by
tests/test_data_packing.py on a tiny LlamaForCausalLM):

- `sdpa` and `eager`: when the forward gets `position_ids` and NO `attention_mask`,
  `masking_utils.find_packed_sequence_indices` detects the restarts and builds a block-diagonal
  causal mask; a document's logits inside a packed row equal its logits alone (to ~1e-7).
  BUT the detection is skipped when a KV cache exists, and Llama-style models create a
  `DynamicCache` whenever `use_cache` is true, which is the config default even in train mode.
  With the default, packed documents attend to each other. The training forward must pass
  `use_cache=False` (or set `model.config.use_cache = False`).
- `flash_attention_2` (not testable here, read from `modeling_flash_attention_utils`): the
  position ids become `cu_seqlens` for the varlen kernel, but only for a batch of ONE row
  (`_is_packed_sequence` requires batch_size == 1); with several packed rows per micro-batch
  the documents within a row are not separated.
"""

from __future__ import annotations

from launcher.data.formats import IGNORE_INDEX


def _example(ids: list[int], labels: list[int], positions: list[int]) -> dict:
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack_documents(docs: list[list[int]], max_seq_len: int) -> list[dict]:
    """Pretraining: concatenate documents and cut the stream into sequences of exactly
    `max_seq_len` tokens; the last one may be shorter (collate pads it), and is dropped if it
    has fewer than 2 tokens (nothing to predict). A document cut at a sequence end goes on at
    position 0 of the next sequence, as a new document: it cannot see its first part there."""
    out: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            piece = doc[start : start + max_seq_len - len(ids)]
            ids += piece
            labels += [IGNORE_INDEX, *piece[1:]]
            positions += range(len(piece))
            start += len(piece)
            if len(ids) == max_seq_len:
                out.append(_example(ids, labels, positions))
                ids, labels, positions = [], [], []
    if len(ids) >= 2:
        out.append(_example(ids, labels, positions))
    return out


def pack_examples(examples: list[dict], max_seq_len: int) -> list[dict]:
    """SFT: fill sequences with whole examples, in order (next-fit), each at most `max_seq_len`
    tokens. Examples are never split (a response without its prompt teaches nothing), so packed
    SFT sequences can be shorter than `max_seq_len`; examples must already be truncated."""
    out: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_seq_len:
            raise ValueError(f"example of {n} tokens exceeds max_seq_len={max_seq_len}")
        if len(ids) + n > max_seq_len:
            out.append(_example(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX, *ex["labels"][1:]]
        positions += range(n)
    if ids:
        out.append(_example(ids, labels, positions))
    return out


def chunk_documents(docs: list[list[int]], max_seq_len: int) -> list[dict]:
    """Pretraining without packing: each document split into chunks of `max_seq_len` tokens, one
    example each (a final chunk under 2 tokens has nothing to predict and is dropped)."""
    out = []
    for doc in docs:
        for start in range(0, len(doc), max_seq_len):
            chunk = doc[start : start + max_seq_len]
            if len(chunk) >= 2:
                labels = [IGNORE_INDEX, *chunk[1:]]  # never a target (labels shift by one)
                out.append({"input_ids": chunk, "labels": labels, "position_ids": None})
    return out
