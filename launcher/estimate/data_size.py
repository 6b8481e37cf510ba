"""How many training examples a recipe's data has, without tokenizing it."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.recipe.sections import Recipe

KNOWN_HUB_DATASETS: dict[str, int] = {
    "tatsu-lab/alpaca": 52002,
    "yahma/alpaca-cleaned": 51760,
    "HuggingFaceH4/ultrachat_200k": 207865,  # train_sft split
    "anon8231489123/ShareGPT_Vicuna_unfiltered": 94145,  # ShareGPT_V3_unfiltered_cleaned_split
    "roneneldan/TinyStories": 2119719,
    "HuggingFaceH4/ultrafeedback_binarized": 61135,  # train_prefs split (preference pairs)
}
"""Rows of public hub datasets (train split), so that `epochs` can be turned into steps offline."""


def _rows(path: Path) -> int | None:
    if not path.exists():
        return None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if suffix == ".json":
        data = json.loads(path.read_text())
        return len(data) if isinstance(data, list) else None
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        except Exception:
            return None
    if suffix == ".txt":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def train_examples(recipe: Recipe) -> tuple[int | None, str]:
    """(training sequences, how it was found); None when unknown (hub dataset not in the table)."""
    d = recipe.data
    keep = 1.0 - d.eval_fraction
    if d.synthetic is not None:
        return int(d.synthetic.num_examples * keep), "synthetic rows"
    if d.hub:
        rows = KNOWN_HUB_DATASETS.get(d.hub)
        if rows is None:
            return None, f"hub dataset {d.hub} not in the offline table"
        return int(rows * keep), f"{d.hub}: {rows:,} rows (public size)"
    if d.format == "text" and d.packing:
        # pretraining: sequences of max_seq_len tokens; bytes tokenizer = 1 token/byte, else ~4 bytes/token
        size = sum(Path(p).stat().st_size for p in d.path if Path(p).exists())
        per_token = 1 if recipe.tokenizer.builtin == "bytes" else 4
        return int(size / per_token / d.max_seq_len * keep), "file size / sequence length"
    total = 0
    for p in d.path:
        n = _rows(Path(p))
        if n is None:
            return None, f"could not count rows of {p}"
        total += n
    return int(total * keep), "rows in data.path"
