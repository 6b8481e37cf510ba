from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "recipes"

# No test may reach a hub; fail fast instead of hanging on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_recipe_dict(**sections) -> dict:
    """A small valid SFT recipe as plain data; keyword arguments replace whole sections."""
    base = {
        "name": "t",
        "model": {
            "config": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
            },
            "dtype": "fp32",
        },
        "tokenizer": {"builtin": "bytes"},
        "data": {"format": "alpaca", "synthetic": {"task": "reverse", "num_examples": 200}, "max_seq_len": 64},
        "train": {"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3},
        "resources": {"cpu_workers": 1},
        "logging": {"tensorboard": False},
    }
    base.update(sections)
    return base


@functools.lru_cache(maxsize=1)
def bytes_tokenizer():
    """The built-in byte tokenizer, built once per test process."""
    from launcher.data import build_tokenizer
    from launcher.recipe.sections import TokenizerConfig

    return build_tokenizer(TokenizerConfig(builtin="bytes"), None)


def write_jsonl(path: Path, rows: list) -> Path:
    """`rows` as a JSON-lines file at `path`."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def golden(request):
    """Compare text with tests/golden/NAME; set UPDATE_GOLDEN=1 (or delete the file) to re-record."""

    def check(name: str, text: str) -> None:
        path = ROOT / "tests" / "golden" / name
        if os.environ.get("UPDATE_GOLDEN") or not path.exists():
            path.write_text(text)
            pytest.skip(f"recorded golden file {path.name}; review and commit it")
        assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 to re-record)"

    return check


@pytest.fixture(autouse=True, scope="session")
def _private_run_registry(tmp_path_factory):
    """Runs started by tests (also in subprocesses) go to a throwaway registry, not the user's."""
    if "LAUNCHER_STATE_DIR" not in os.environ:
        os.environ["LAUNCHER_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    # and the data they prepare to a throwaway cache, not ~/.cache/launcher/data
    if "LAUNCHER_DATA_CACHE" not in os.environ:
        os.environ["LAUNCHER_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield

