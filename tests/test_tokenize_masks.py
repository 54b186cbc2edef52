"""Loss masks cover exactly the assistant turns (+ end-of-turn), for several chat templates."""

from __future__ import annotations

import copy

import pytest

from etokit.errors import EtokitError
from etokit.models.init_model import CHAT_TEMPLATE, train_tokenizer
from etokit.train.tokenize import tokenize_messages, tokenize_pair

from tests.factories import pair, trajectory

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Not prefix-stable (the newest user turn renders differently), but marked with {% generation %}.
UNSTABLE = CHAT_TEMPLATE.replace(
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>",
    "<|{{ message['role'] }}|>{{ message['content'] }}{% if loop.last %} (latest){% endif %}<|end|>",
)
# template -> (special tokens it needs, end-of-turn text, how it renders content)
TEMPLATES = {
    "tiny": (CHAT_TEMPLATE, [], "<|end|>", str),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", str),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", str.strip),
    "unstable-with-generation-markers": (UNSTABLE, [], "<|end|>", str),
}

MESSAGES = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Find the apple. Answer with Thought and Action."},
    {"role": "assistant", "content": "OK"},
    {"role": "user", "content": "You are in the kitchen. You see a table."},
    {"role": "assistant", "content": "Thought: the apple may be on the table.\nAction: go to table"},
    {"role": "user", "content": "On the table you see an apple  and a knife. é漢"},
    {"role": "assistant", "content": "Thought: there it is.\nAction: take apple "},
    {"role": "user", "content": "You take the apple."},
]


@pytest.fixture(scope="module")
def base_tokenizer():
    texts = [m["content"] for m in MESSAGES] + [
        m["content"] for i in range(20) for m in trajectory(f"t{i}", 1.0).messages
    ]
    return train_tokenizer(texts, 400)


def with_template(base_tokenizer, name):
    template, specials, _, _ = TEMPLATES[name]
    tok = copy.deepcopy(base_tokenizer)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def masked_runs(tok, tokenized):
    """Decoded text of each maximal run of masked-in tokens."""
    runs, current = [], []
    for t, m in zip(tokenized.input_ids + [None], tokenized.loss_mask + [False]):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_mask_is_exactly_assistant_content_and_end_of_turn(base_tokenizer, name):
    tok = with_template(base_tokenizer, name)
    _, _, eot, render = TEMPLATES[name]
    out = tokenize_messages(tok, MESSAGES)
    expected = [render(m["content"]) + eot for m in MESSAGES if m["role"] == "assistant"]
    assert masked_runs(tok, out) == expected
    assert not out.truncated
    # The whole rendered conversation is there, in the template's own tokenization.
    assert tok.decode(out.input_ids) == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert out.labels == [t if m else -100 for t, m in zip(out.input_ids, out.loss_mask)]


def test_mask_matches_generation_markers(base_tokenizer):
    """On a template with {% generation %} markers, span masks agree with transformers' own."""
    tok = with_template(base_tokenizer, "tiny")
    out = tokenize_messages(tok, MESSAGES)
    enc = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out.input_ids == list(enc["input_ids"])
    assert out.loss_mask == [bool(m) for m in enc["assistant_masks"]]


def test_unstable_template_without_markers_is_a_clear_error(base_tokenizer):
    tok = with_template(base_tokenizer, "tiny")
    tok.chat_template = UNSTABLE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(EtokitError, match="not prefix-stable"):
        tokenize_messages(tok, MESSAGES)


@pytest.mark.parametrize("name", ["tiny", "chatml", "llama3"])
def test_truncation_keeps_whole_turns(base_tokenizer, name):
    tok = with_template(base_tokenizer, name)
    _, _, eot, render = TEMPLATES[name]
    full = tokenize_messages(tok, MESSAGES)
    # A budget that ends in the middle of the last assistant turn.
    last_run_start = max(i for i in range(1, len(full.loss_mask)) if full.loss_mask[i] and not full.loss_mask[i - 1])
    out = tokenize_messages(tok, MESSAGES, max_length=last_run_start + 3)
    assert out.truncated
    assert len(out.input_ids) <= last_run_start + 3
    assert out.input_ids == full.input_ids[: len(out.input_ids)]
    assert out.loss_mask == full.loss_mask[: len(out.input_ids)]
    # The sequence ends right after an assistant turn's end-of-turn token: whole turns only.
    assert out.loss_mask[-1] and tok.decode(out.input_ids).endswith(eot)
    assert masked_runs(tok, out) == [render(m["content"]) + eot for m in MESSAGES if m["role"] == "assistant"][:2]
    # A budget that fits everything changes nothing.
    same = tokenize_messages(tok, MESSAGES, max_length=len(full.input_ids))
    assert not same.truncated and same.input_ids == full.input_ids


def test_pair_masks_only_chosen_and_rejected_turns(base_tokenizer):
    tok = with_template(base_tokenizer, "chatml")
    p = pair("task-7")
    chosen, rejected, shared = tokenize_pair(tok, p)
    assert masked_runs(tok, chosen) == [m["content"] + "<|im_end|>" for m in p.chosen if m["role"] == "assistant"]
    assert masked_runs(tok, rejected) == [m["content"] + "<|im_end|>" for m in p.rejected if m["role"] == "assistant"]
    # The prompt's "OK" turn is context, not trained.
    assert "OK<|im_end|>" not in masked_runs(tok, chosen)
    prompt_len = len(tokenize_messages(tok, p.prompt).input_ids)
    assert shared >= prompt_len
    assert chosen.input_ids[:shared] == rejected.input_ids[:shared]
    assert shared == len(chosen.input_ids) or chosen.input_ids[shared] != rejected.input_ids[shared]
    assert not any(chosen.loss_mask[:prompt_len]) and not any(rejected.loss_mask[:prompt_len])


def test_no_chat_template_is_a_user_error(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = None
    with pytest.raises(EtokitError, match="no chat template"):
        tokenize_messages(tok, MESSAGES)
