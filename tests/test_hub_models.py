"""Pretrained models as users name them: a hub id resolved by transformers from a Hugging Face cache
(offline), and a directory relative to where the command runs.

The cache is a real hub snapshot built here (`models--org--name/snapshots/<rev>`, `refs/main`,
files as symlinks into `blobs/` as huggingface_hub writes them) holding a small Llama and a real
`tokenizers` BPE tokenizer trained in memory: the snapshot stands in for the hub, and
transformers' own resolution is the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launcher.errors import DataError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-chat-llama"
REV = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
WORDS = "apple banana cherry river stone cloud garden window yellow purple quiet little".split()


# --------------------------------------------------------------------------------------------
# a pretrained model and a hub snapshot of it


def _corpus(n: int = 300) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5)) + "." for i in range(n)]


def train_tokenizer():
    """A real byte-level BPE tokenizer, trained in memory, with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_pretrained_model(out: Path) -> None:
    """A small Llama with random weights (seed 0) and the BPE tokenizer, as save_pretrained writes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def add_to_hub_cache(cache: Path, repo_id: str, files: Path, rev: str = REV) -> Path:
    """Put the files of directory `files` into `cache` as huggingface_hub stores a downloaded
    snapshot: content-addressed blobs, a snapshot of relative symlinks, refs/main -> rev."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A saved model directory and a hub cache holding the same files as REPO."""
    base = tmp_path_factory.mktemp("pretrained")
    model_dir = base / "saved"
    save_pretrained_model(model_dir)
    cache = base / "hf-home" / "hub"
    snapshot = add_to_hub_cache(cache, REPO, model_dir)
    return {"dir": model_dir, "cache": cache, "home": base / "hf-home", "snapshot": snapshot}


def hub_env(pretrained: dict[str, Path], **extra: str) -> dict[str, str]:
    """The environment of a `launcher` subprocess that sees only the temporary cache, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(pretrained["home"]), HF_HUB_CACHE=str(pretrained["cache"]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def launcher(args: list, *, env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, model: str, *, task: str, data: Path) -> Path:
    d = {
        "name": f"hub-{task}",
        "model": {"name_or_path": model, "dtype": "fp32"},
        "data": {"format": "chat" if task == "sft" else "text", "path": [str(data)], "max_seq_len": 64,
                 **({"packing": True} if task == "pretrain" else {})},
        "train": {"task": task, "max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "parallelism": {"zero_stage": 3},
        "resources": {"cpu_workers": 2},
        "checkpoint": {"at_end": True},
        "logging": {"tensorboard": False},
        "sample": {"prompts": ["apple banana"], "max_new_tokens": 4},
    }
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def chat_rows(path: Path, n: int = 64) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"repeat {w}"}, {"role": "assistant", "content": w}]}
            for w in (_corpus(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_docs(path: Path, n: int = 80) -> Path:
    path.write_text("\n\n".join(_corpus(n)) + "\n")
    return path
