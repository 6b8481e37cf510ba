"""Tokenizers: the builtin byte-level one (offline, deterministic) or a Hugging Face one."""

from __future__ import annotations

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
    "{% if tools %}{{ '<|system|>\n# Tools\n' }}{% for t in tools %}{{ (t | tojson) + '\n' }}{% endfor %}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + (m['content'] or '') }}"
    "{% if m['tool_calls'] is defined and m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""`<|user|>\n{content}\n<|assistant|>\n{content}</s>`. Nothing follows an assistant's `</s>`, so
rendering messages[:k] with a generation prompt is an exact prefix of rendering messages[:k+1], and
an assistant turn's tokens are exactly its content plus eos (what the loss is computed on).
Tools: a `<|system|>` block listing each tool's JSON first; an assistant's tool calls follow its
content as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (inside the turn, so they
are learned); a tool's result is a `<|tool|>` turn (written as plain bytes, not a special
token; not learned)."""


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


def build_tokenizer(
    cfg: TokenizerConfig, model_name_or_path: str | None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerFast:
    """The recipe's tokenizer, with a pad token (eos when the tokenizer has none).
    `trust_remote_code` is the recipe's model.trust_remote_code: a model that ships its own code
    usually ships its tokenizer's too."""
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

    from launcher.pretrained import explain, is_local, local_path, offline

    local = is_local(name)
    if local and not local_path(name).is_dir():
        raise DataError(
            f"{key}: tokenizer directory {name} does not exist (resolved to {local_path(name)}): "
            "point tokenizer.name_or_path at a directory with tokenizer files, or set "
            "tokenizer.builtin=bytes"
        )
    # Offline, say so explicitly: huggingface_hub reads HF_HUB_OFFLINE once, at import, and the
    # driver sets it later when it finds the hub unreachable.
    local_only = offline() and not local
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(local_path(name)) if local else name,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
        )
    except (OSError, ValueError) as e:
        raise DataError(f"{key}: {explain(name, e, local_only=local_only, what='tokenizer')}") from None
    if tokenizer.pad_token is None:
        # Padding is always masked (labels -100, attention mask 0), so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
