"""Exact parameter counts of a Hugging Face architecture, from its config alone.

The model is instantiated on the meta device (no memory, no weights read) and its parameters are
counted. Counting a 405B model this way takes about two seconds, so results are cached: the
built-in catalog's counts ship in `data/param_counts.json` (a test re-derives them) and other
configs are cached under `~/.cache/launcher/param_counts.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError

SHIPPED = Path(__file__).parent / "data" / "param_counts.json"
CACHE_VERSION = 2
"""2: `ModelShape.modules` (the per-module table LoRA and QLoRA are counted from)."""


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and the shapes that decide activation memory and FLOPs."""

    total: int
    """Unique parameters (tied embeddings counted once)."""
    embeddings: int
    """Token (and position) embeddings plus an untied output head."""
    per_layer: int
    """Parameters of one transformer block."""
    largest_module: int
    """Largest number of parameters held directly by one module (DeepSpeed's `largest_layer_params`)."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    tied: bool
    numels: dict[int, int]
    """Histogram: parameter size -> how many parameters have it (for ZeRO's per-parameter partitioning)."""
    modules: tuple[tuple[str, str, int, int, int, int], ...] = ()
    """Every module holding parameters directly: (name with the block index as `*`, kind, parameters
    it holds (tied ones once), in features, out features, how many blocks repeat it). Kinds:
    `linear` (nn.Linear, transformers' Conv1D), `embedding`, `head` (the output embeddings),
    `other` (norms ...). What LoRA adapts and QLoRA quantizes is counted from it."""

    def partition_numel(self, ranks: int) -> int:
        """Elements one rank holds when every parameter is split into `ranks` padded parts (ZeRO-3)."""
        return sum(math.ceil(n / ranks) * c for n, c in self.numels.items())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["numels"] = {str(k): v for k, v in self.numels.items()}
        d["modules"] = [list(m) for m in self.modules]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelShape":
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        d["numels"] = {int(k): v for k, v in d["numels"].items()}
        d["modules"] = tuple(tuple(m) for m in d.get("modules", ()))
        return cls(**d)


def config_key(config: dict[str, Any]) -> str:
    text = json.dumps({"v": CACHE_VERSION, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "launcher" / "param_counts.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_shape(config: dict[str, Any], *, trust_remote_code: bool = False, use_cache: bool = True) -> ModelShape:
    """The shape of the model `config` describes (cached by the config's content)."""
    key = config_key(config)
    if use_cache:
        for path in (SHIPPED, _user_cache()):
            hit = _read(path).get(key)
            if hit is not None:
                return ModelShape.from_json(hit)
    shape = count_on_meta(config, trust_remote_code=trust_remote_code)
    if use_cache:
        path = _user_cache()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = _read(path)
            data[key] = shape.to_json()
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs speed
    return shape


def _intermediate(cfg: Any, hidden: int) -> int:
    for name in ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    ratio = getattr(cfg, "expansion_ratio", None)
    return int(ratio * hidden) if ratio else 4 * hidden


def _kv_heads(cfg: Any, heads: int) -> int:
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            if name == "num_kv_heads" and not getattr(cfg, "new_decoder_architecture", True):
                break  # falcon's num_kv_heads only applies to its new architecture
            return v
    if getattr(cfg, "multi_query", False):
        return 1
    return heads


def hf_config(config: dict[str, Any], *, trust_remote_code: bool = False) -> Any:
    """The transformers config object for a config dict (one line naming the problem if invalid)."""
    from transformers import AutoConfig

    d = dict(config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise RecipeError("model.config.model_type", "the model config has no model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map"):
        if k != "auto_map" or not trust_remote_code:
            d.pop(k, None)
    try:
        cfg = AutoConfig.for_model(model_type, **d)
    except Exception as e:  # unknown model_type, or transformers' own config validation
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise RecipeError("model.config", f"invalid {model_type} config: {lines[-1] if lines else e}") from None
    return cfg


def count_on_meta(config: dict[str, Any], *, trust_remote_code: bool = False) -> ModelShape:
    """Instantiate the architecture on the meta device and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)

    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    numels: dict[int, int] = {}
    for p in unique.values():
        numels[p.numel()] = numels.get(p.numel(), 0) + 1
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    hidden = cfg.hidden_size
    layers_n = cfg.num_hidden_layers
    blocks = next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers_n), None
    )
    per_layer = sum(p.numel() for p in blocks[0].parameters()) if blocks is not None else 0
    emb_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        emb_ids |= {id(p) for p in out.parameters()}
    embeddings = sum(unique[i].numel() for i in emb_ids if i in unique)
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    names = {n.split(".")[-1] for n, _ in (blocks[0].named_modules() if blocks is not None else [])}
    gated = bool(names & {"gate_proj", "gate_up_proj", "w1", "w3"})
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    modules = module_table(model, blocks)
    return ModelShape(
        total=total, embeddings=embeddings, per_layer=per_layer, largest_module=largest,
        num_layers=layers_n, hidden=hidden, heads=heads, kv_heads=_kv_heads(cfg, heads), head_dim=head_dim,
        intermediate=_intermediate(cfg, hidden), vocab=cfg.vocab_size, gated_mlp=gated, tied=tied,
        numels=numels, modules=modules,
    )


def _kind(module: Any, out: Any) -> tuple[str, int, int]:
    """(kind, in features, out features) of a module that holds parameters."""
    import torch

    if module is out:
        w = getattr(module, "weight", None)
        return "head", (w.shape[1] if w is not None and w.dim() == 2 else 0), (w.shape[0] if w is not None else 0)
    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projections: weight is in x out
        return "linear", module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    return "other", 0, 0


def module_table(model: Any, blocks: Any) -> tuple[tuple[str, str, int, int, int, int], ...]:
    """Every module with parameters of its own, the blocks' folded into one `*` entry each."""
    out = model.get_output_embeddings()
    block_ids = {id(m): i for i, b in enumerate(blocks or []) for m in b.modules()}
    seen: set[int] = set()
    table: dict[tuple[str, str, int, int], int] = {}
    counts: dict[tuple[str, str, int, int], int] = {}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen |= {id(p) for p in own}
        if not own and m is not out:
            continue
        if blocks is not None and id(m) in block_ids:
            prefix = f".{block_ids[id(m)]}."
            parts = name.split(prefix, 1) if prefix in f".{name}." else [name]
            name = parts[0] + ".*." + parts[1] if len(parts) == 2 else name
        kind, fin, fout = _kind(m, out)
        key = (name, kind, fin, fout)
        table[key] = sum(p.numel() for p in own)
        counts[key] = counts.get(key, 0) + 1
    return tuple((n, k, table[(n, k, i, o)], i, o, counts[(n, k, i, o)]) for (n, k, i, o) in table)


def rebuild_shipped() -> dict[str, Any]:
    """Recount every catalog model (about ten seconds) and rewrite `data/param_counts.json`."""
    from launcher.estimate.catalog import CATALOG

    data = {}
    for hub_id, cfg in CATALOG.items():
        shape = count_on_meta(cfg)
        data[config_key(cfg)] = {**shape.to_json(), "_model": hub_id}
    SHIPPED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


if __name__ == "__main__":  # python -m launcher.estimate.params
    for entry in rebuild_shipped().values():
        print(f"{entry['_model']:40s} {entry['total']:>16,d}")
