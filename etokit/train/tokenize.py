"""Chat-template tokenization with a loss mask on the agent's turns.

ETO trains on the agent (assistant) turns only: behavioral cloning's loss and DPO's sequence
log-prob both sum over every assistant token, each turn's end-of-turn token included, and never
over the instruction, the environment's observations or the template's role headers.

The mask comes from per-message character spans, not from splitting rendered strings at
model-specific offsets (the official ETO code's approach, which breaks with every new template):
each assistant turn's span is the text that rendering ``messages[:i+1]`` adds after rendering
``messages[:i]`` with the generation prompt, and a fast tokenizer's offsets map those characters
to tokens. That works for any prefix-stable chat template; templates that are not prefix-stable
(they rewrite earlier turns, e.g. drop old reasoning) fall back to their ``{% generation %}``
markers when they have them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from etokit.errors import EtokitError

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool

    @property
    def labels(self) -> list[int]:
        """Causal-LM labels: the token id where the loss counts, -100 elsewhere."""
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.loss_mask)]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_messages(tokenizer, messages, max_length=None) -> Tokenized:
    """Render ``messages`` with the tokenizer's chat template; mask in every assistant turn."""
    return _tokenize(tokenizer, list(messages), max_length, first_trained=0)


def tokenize_pair(tokenizer, pair, max_length=None) -> tuple[Tokenized, Tokenized, int]:
    """Tokenize prompt+chosen and prompt+rejected of a :class:`~etokit.data.schema.Pair`.

    Only the chosen/rejected assistant turns are masked in: the prompt's own assistant turn (the
    "OK" that follows the instruction) is context, identical on both sides. The third value is
    the length of the token prefix both sequences share, for prefix-sharing forward passes.
    """
    prompt = list(pair.prompt)
    chosen = _tokenize(tokenizer, prompt + list(pair.chosen), max_length, first_trained=len(prompt))
    rejected = _tokenize(tokenizer, prompt + list(pair.rejected), max_length, first_trained=len(prompt))
    shared = 0
    for a, b in zip(chosen.input_ids, rejected.input_ids):
        if a != b:
            break
        shared += 1
    return chosen, rejected, shared


def _tokenize(tokenizer, messages, max_length, first_trained: int) -> Tokenized:
    if not messages:
        raise EtokitError("cannot tokenize an empty conversation")
    if getattr(tokenizer, "chat_template", None) is None:
        raise EtokitError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set tokenizer.chat_template")
    if max_length is not None and max_length <= 0:
        raise EtokitError(f"max_length must be positive, got {max_length}")

    text = _render(tokenizer, messages)
    spans = _assistant_char_spans(tokenizer, messages, text, first_trained)
    if spans is not None:
        input_ids, loss_mask = _tokens_with_mask(tokenizer, text, spans)
    else:
        input_ids, loss_mask = _generation_marker_mask(tokenizer, messages, first_trained)
    return _truncate(input_ids, loss_mask, max_length)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_char_spans(tokenizer, messages, text, first_trained) -> list[tuple[int, int]] | None:
    """Character span of each trained assistant turn in ``text``; None if the template is not
    prefix-stable (rendering a prefix of the conversation is not a prefix of the full render)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            return None
        # Whitespace a template prints after the end-of-turn token (ChatML's "\n") is layout the
        # model never generates: generation stops at the end-of-turn token.
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return spans


def _tokens_with_mask(tokenizer, text, spans) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "is_fast", False):
        raise EtokitError(
            f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: loss masks need character offsets"
        )
    # The template renders BOS and other special tokens itself (as apply_chat_template does).
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    loss_mask = [False] * len(input_ids)
    j = 0
    for pos, (start, end) in enumerate(enc["offset_mapping"]):
        # A token belongs to the turn its first character is in; spans are sorted.
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        if end > start and spans[j][0] <= start < spans[j][1]:
            loss_mask[pos] = True
    return input_ids, loss_mask


def _generation_marker_mask(tokenizer, messages, first_trained) -> tuple[list[int], list[bool]]:
    if not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        raise EtokitError(
            f"chat template of {tokenizer.name_or_path!r} is not prefix-stable (it re-renders earlier turns) "
            "and has no {% generation %} markers: cannot locate assistant turns"
        )
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids = list(enc["input_ids"])
    loss_mask = [bool(m) for m in enc["assistant_masks"]]
    if first_trained:
        # Untrained prompt turns come first: unmask as many leading assistant runs as the prompt has.
        skip = sum(m["role"] == "assistant" for m in messages[:first_trained])
        for start, end in _runs(loss_mask)[:skip]:
            loss_mask[start:end] = [False] * (end - start)
    return input_ids, loss_mask


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of True."""
    runs, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _truncate(input_ids, loss_mask, max_length) -> Tokenized:
    if max_length is None or len(input_ids) <= max_length:
        return Tokenized(input_ids, loss_mask, truncated=False)
    # Keep whole turns: cut right after the last assistant turn that fits, so the sequence never
    # ends in the middle of an action (nor on an observation the model is not trained on).
    fitting = [end for _, end in _runs(loss_mask) if end <= max_length]
    cut = fitting[-1] if fitting else max_length
    return Tokenized(input_ids[:cut], loss_mask[:cut], truncated=True)
