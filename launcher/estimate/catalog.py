"""Built-in architectures: public config facts of common models, so estimates work offline.

Each entry is a transformers config as a dict (`model_type` plus the keys that decide the
parameter count and the activation shapes), taken from the model's published `config.json`.
`resolve_config` turns a recipe's model section (local directory, catalog name, hub id or
inline config) into such a dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError, UserError


def _llama(h: int, f: int, layers: int, heads: int, kv: int, vocab: int, *, tied: bool = False,
           max_pos: int = 4096, rope_theta: float = 10000.0) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": max_pos, "rope_theta": rope_theta}


def _qwen2(h: int, f: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict[str, Any]:
    return {"model_type": "qwen2", "hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": 32768, "rope_theta": 1000000.0}


def _gpt2(h: int, layers: int, heads: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "n_embd": h, "n_layer": layers, "n_head": heads, "vocab_size": 50257,
            "n_positions": 1024, "tie_word_embeddings": True}


_L31 = {"max_pos": 131072, "rope_theta": 500000.0}

CATALOG: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000),
    "meta-llama/Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, 128256, tied=True, **_L31),
    "meta-llama/Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, 128256, tied=True, **_L31),
    "meta-llama/Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8, 128256, **_L31),
    "meta-llama/Llama-3.1-70B": _llama(8192, 28672, 80, 64, 8, 128256, **_L31),
    "meta-llama/Llama-3.1-405B": _llama(16384, 53248, 126, 128, 8, 128256, **_L31),
    "mistralai/Mistral-7B-v0.1": {**_llama(4096, 14336, 32, 32, 8, 32000, max_pos=32768),
                                  "model_type": "mistral", "sliding_window": 4096},
    "mistralai/Mistral-7B-v0.3": {**_llama(4096, 14336, 32, 32, 8, 32768, max_pos=32768, rope_theta=1e6),
                                  "model_type": "mistral", "sliding_window": None},
    "Qwen/Qwen2.5-0.5B": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-3B": _qwen2(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-7B": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-14B": _qwen2(5120, 13824, 48, 40, 8, 152064, False),
    "Qwen/Qwen2.5-32B": _qwen2(5120, 27648, 64, 40, 8, 152064, False),
    "Qwen/Qwen2.5-72B": _qwen2(8192, 29568, 80, 64, 8, 152064, False),
    "tiiuae/falcon-7b": {"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32,
                         "num_attention_heads": 71, "multi_query": True, "new_decoder_architecture": False,
                         "parallel_attn": True, "bias": False, "alibi": False, "vocab_size": 65024,
                         "tie_word_embeddings": True},
    "mosaicml/mpt-7b": {"model_type": "mpt", "d_model": 4096, "n_layers": 32, "n_heads": 32,
                        "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True,
                        "tie_word_embeddings": True},
    "openai-community/gpt2": _gpt2(768, 12, 12),
    "openai-community/gpt2-medium": _gpt2(1024, 24, 16),
    "openai-community/gpt2-large": _gpt2(1280, 36, 20),
    "openai-community/gpt2-xl": _gpt2(1600, 48, 25),
}
"""Hub id -> config facts (from each model's public config.json)."""

_SUFFIXES = ("-instruct", "-chat-hf", "-hf", "-chat")


def _key(name: str) -> str:
    return name.strip().lower()


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for hub_id in CATALOG:
        short = hub_id.split("/")[-1]
        for n in (hub_id, short):
            out[_key(n)] = hub_id
            for suffix in _SUFFIXES:
                if _key(n).endswith(suffix):
                    out[_key(n)[: -len(suffix)]] = hub_id
    out["gpt2"] = "openai-community/gpt2"
    # Meta's older hub ids and instruct variants name the same architectures
    for size in ("8B", "70B", "405B"):
        out[_key(f"meta-llama/Meta-Llama-3.1-{size}")] = f"meta-llama/Llama-3.1-{size}"
    return out


ALIASES = _aliases()


def known_models() -> list[str]:
    return sorted(CATALOG, key=str.lower)


def lookup(name: str) -> str | None:
    """The catalog's hub id for `name` (hub id, short name, `-Instruct`/`-hf`/`-chat` variant)."""
    k = _key(name)
    if k in ALIASES:
        return ALIASES[k]
    for suffix in _SUFFIXES:  # e.g. Qwen2.5-7B-Instruct, Llama-2-7b-chat-hf
        if k.endswith(suffix) and k[: -len(suffix)] in ALIASES:
            return ALIASES[k[: -len(suffix)]]
    return None


def unknown_model_error(name: str, key: str = "model.name_or_path") -> UserError:
    from launcher.recipe.convert import did_you_mean

    names = known_models()
    close = did_you_mean(name, names + [n.split("/")[-1] for n in names], otherwise="")
    return RecipeError(
        key,
        f"'{name}' is not a local directory and not in the offline catalog"
        + (f" ({close})" if close else "")
        + "; known models: " + ", ".join(names)
        + ". Online, a hub id works too (unset HF_HUB_OFFLINE).",
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_reachable(timeout: float = 2.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_config(name_or_path: str | None, inline: dict[str, Any] | None = None,
                   *, trust_remote_code: bool = False, key: str = "model.name_or_path") -> tuple[str, dict[str, Any]]:
    """(display name, config dict) for a model: a local directory's config.json, a catalog entry,
    an inline config, or (online only) a hub id. Inline keys override the checkpoint's config."""
    overrides = dict(inline or {})
    if not name_or_path:
        return "inline config", overrides
    overrides.pop("model_type", None)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise RecipeError(key, f"{name_or_path} has no config.json")
        return name_or_path, {**json.loads(cfg_file.read_text()), **overrides}
    hub_id = lookup(name_or_path)
    if hub_id is not None:
        return hub_id, {**CATALOG[hub_id], **overrides}
    if os.sep in name_or_path and name_or_path.startswith((".", "/", "~")):
        raise RecipeError(key, f"local directory {name_or_path} does not exist")
    if _offline() or "/" not in name_or_path or not _hub_reachable():
        raise unknown_model_error(name_or_path, key)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # network, gated repo, no such repo
        raise RecipeError(
            key, f"could not read the config of '{name_or_path}' from the hub ({type(e).__name__}); "
            + unknown_model_error(name_or_path, key).message
        ) from None
    return name_or_path, {**config.to_dict(), **overrides}
