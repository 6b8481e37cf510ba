"""Tokenizers: the builtin byte-level one (offline, deterministic) or a Hugging Face one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import DataError
from launcher.recipe.sections import TokenizerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# tokenizers and transformers are imported inside the functions: recipe checks import
# BYTES_VOCAB_SIZE from here and should stay fast.

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
"""Chat role markers: one token each, so the tiny demo models spend no capacity spelling them."""

SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)
BYTES_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Ids 0-255 are the bytes themselves (id == byte value); the special tokens follow."""

# Everything is emitted from {{ }} expressions: transformers renders with trim_blocks, which would
# eat a literal newline after a {% %} tag, and whitespace control would eat the content's own.
BYTES_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""`<|user|>\\n{content}\\n<|assistant|>\\n{content}</s>`. Nothing follows an assistant's `</s>`, so
rendering messages[:k] with a generation prompt is an exact prefix of rendering messages[:k+1], and
an assistant turn's tokens are exactly its content plus eos (what the loss is computed on)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bytes_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory: every UTF-8 string round-trips, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    # BPE without merges over the 256-byte alphabet: one token per byte.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama: `tokenizer(text)` starts with bos, so a prompt encoded for generation matches
    # the training sequences (the pipeline adds bos the same way, see formats.adds_bos).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=1 << 30
    )
    wrapped.chat_template = BYTES_CHAT_TEMPLATE
    return wrapped


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def build_tokenizer(
    cfg: TokenizerConfig, model_name_or_path: str | None
) -> PreTrainedTokenizerFast:
    """The recipe's tokenizer, with a pad token (eos when the tokenizer has none)."""
    if cfg.builtin == "bytes":
        return bytes_tokenizer()
    name = cfg.name_or_path or model_name_or_path
    key = "tokenizer.name_or_path" if cfg.name_or_path else "model.name_or_path"
    if not name:
        raise DataError(
            "no tokenizer: set tokenizer.name_or_path, tokenizer.builtin=bytes or "
            "model.name_or_path"
        )
    from transformers import AutoTokenizer

    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise DataError(
            f"{key}: tokenizer directory {name} does not exist: point tokenizer.name_or_path at a "
            "directory with tokenizer files, or set tokenizer.builtin=bytes"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(name).expanduser()) if _looks_local(name) else name
        )
    except (OSError, ValueError) as e:
        raise DataError(
            f"{key}: cannot load tokenizer {name!r} ({str(e).splitlines()[0]}): use a local "
            "directory, a hub id reachable from here, or tokenizer.builtin=bytes"
        ) from None
    if tokenizer.pad_token is None:
        # Padding is always masked (labels -100, attention mask 0), so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
