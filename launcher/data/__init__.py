"""Data: tokenizers, raw rows -> token examples, packing, batching, resumable sampling.

Names are imported lazily (PEP 562): recipe validation reads `BYTES_VOCAB_SIZE` and should not
pay for importing torch, transformers and datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BYTES_VOCAB_SIZE": "tokenizer",
    "build_tokenizer": "tokenizer",
    "generate": "synthetic",
    "DataSplits": "pipeline",
    "build_datasets": "pipeline",
    "prepare_datasets": "prepare",
    "PreparedSplit": "store",
    "render_prompt": "pipeline",
    "pack_documents": "packing",
    "pack_examples": "packing",
    "chunk_documents": "packing",
    "collate": "collate",
    "ResumableSampler": "sampler",
}

__all__ = [
    "BYTES_VOCAB_SIZE",
    "DataSplits",
    "PreparedSplit",
    "ResumableSampler",
    "build_datasets",
    "build_tokenizer",
    "chunk_documents",
    "collate",
    "generate",
    "pack_documents",
    "pack_examples",
    "prepare_datasets",
    "render_prompt",
]

if TYPE_CHECKING:
    from launcher.data.collate import collate
    from launcher.data.packing import chunk_documents, pack_documents, pack_examples
    from launcher.data.pipeline import DataSplits, build_datasets, render_prompt
    from launcher.data.prepare import prepare_datasets
    from launcher.data.store import PreparedSplit
    from launcher.data.sampler import ResumableSampler
    from launcher.data.synthetic import generate
    from launcher.data.tokenizer import BYTES_VOCAB_SIZE, build_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'launcher.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"launcher.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
