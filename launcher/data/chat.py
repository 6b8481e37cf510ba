"""Chat-template rendering, and which characters of a rendered conversation are assistant turns.

Templates are black boxes, so turn boundaries come from rendering prefixes: the text of
`messages[:i]` with a generation prompt is everything the model sees before assistant turn i,
and `messages[:i+1]` ends where that turn (with whatever end-of-turn marker the template adds)
ends. The characters in between are the response. Token labels are then derived from the
tokenizer's character offsets on the whole conversation (see formats.py).
"""

from __future__ import annotations

from jinja2 import TemplateError

from launcher.errors import DataError

Span = tuple[int, int]
"""Characters [start, end) of the rendered text that belong to an assistant turn."""


class TemplateRowError(ValueError):
    """The chat template refused a row (e.g. roles that do not alternate)."""


def render(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    if tokenizer.chat_template is None:
        raise DataError(
            "the tokenizer has no chat template, which data.format=chat/sharegpt needs: use a "
            "chat model's tokenizer, tokenizer.builtin=bytes, or data.format=alpaca"
        )
    if not messages:  # transformers refuses to render an empty conversation
        raise TemplateRowError("cannot render a conversation without messages")
    try:
        kwargs = {"tools": tools} if tools else {}  # some templates treat tools=None differently
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError as e:
        raise TemplateRowError(f"the chat template rejects this conversation: {e}") from None


def strip_bos(tokenizer, text: str, adds_bos: bool) -> str:
    """Drop a bos the template wrote when the tokenizer adds one itself (no doubled bos)."""
    bos = tokenizer.bos_token
    if adds_bos and bos and text.startswith(bos):
        return text[len(bos) :]
    return text


def _find_turns(tokenizer, full: str, messages: list[dict]) -> list[Span]:
    """Fallback for templates without the prefix property (e.g. ones that rewrite earlier turns
    or only add a date to the last message): find each assistant content verbatim in the full
    text, in order, and take it plus a directly following eos as the response."""
    spans, cursor = [], 0
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] != "assistant":
            continue
        start = full.find(m["content"], cursor)
        if start < 0:
            raise TemplateRowError(
                "the chat template rewrites this row's assistant turns, so the prompt cannot be "
                "masked: set data.mask_prompt=false, or use a tokenizer with a plain chat template"
            )
        end = start + len(m["content"])
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def render_with_spans(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[Span]]:
    """The whole conversation's text and the character spans of its assistant turns (answers
    and tool calls alike; tool results are not assistant turns)."""
    full = render(tokenizer, messages, tools=tools)
    spans: list[Span] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        except TemplateRowError:
            if i:
                raise
            before = ""  # a conversation opening with the assistant: no prompt to render
        through = render(tokenizer, messages[: i + 1], tools=tools)
        if not (full.startswith(through) and through.startswith(before)):
            return full, _find_turns(tokenizer, full, messages)
        spans.append((len(before), len(through)))
    return full, spans


def shift_spans(spans: list[Span], by: int) -> list[Span]:
    return [(max(0, a - by), max(0, b - by)) for a, b in spans]
