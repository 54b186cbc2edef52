"""Generator._stopped decodes only the tail of a reply that can hold a new stop string. Its answers
must be those of decoding the whole reply at every token, for both decoder families it takes the
shortcut with: SentencePiece's (the tiny policy's tokenizer: ▁, byte fallback, fused) and
byte-level BPE (SmolLM2's, GPT-2's)."""

from __future__ import annotations

import random

import pytest

from etokit.agent.protocol import STOP_STRINGS
from etokit.rollout.generator import ExploreConfig, Generator, _local_decoder

TEXTS = [
    "Thought: I take the knife.\nAction: take knife\nObservation: You take the knife.",
    "Thought: a long thought about the red potato on the counter and what to do with it next\nTask: cook",
    "Thought: crème brûlée, 料理 and 🍳 first.\nAction: cook meal\n---\nmore",
    "Thought: no stop string here at all, only words and more words until the reply ends",
    "\nObservation: at the very start",
    "Thought: the reply ends exactly at a stop string\n---",
    "Thought: almost\nObservation but no colon, then\nTask without one either",
]


def _byte_level_tokenizer():
    """A byte-level BPE (GPT-2's decoder) trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    backend.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level"])
def generator(request, policy):
    tokenizer = policy.tokenizer if request.param == "sentencepiece" else _byte_level_tokenizer()
    return Generator(policy.model, tokenizer, ExploreConfig(max_new_tokens=8))


def _full(tokenizer, ids) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in STOP_STRINGS)


def _first_stop(check, ids) -> int | None:
    """As the decoder asks: after every appended token, the tokens before it checked, until the first yes."""
    out: list[int] = []
    for i, token in enumerate(ids):
        out.append(token)
        if check(out, i):
            return i
    return None


def _sequences(tokenizer):
    """Token lists whose stop strings fall across token boundaries: the texts encoded whole and one
    character (one byte piece) per token, random token streams, orphan UTF-8 lead bytes before a
    newline, special tokens in the middle."""
    vocab = tokenizer.get_vocab()
    single = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.convert_ids_to_tokens(range(len(vocab)))]
    rng = random.Random(0)
    out = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(ids)
        out.append([i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]])
    stop = tokenizer("\nTask:", add_special_tokens=False)["input_ids"]
    lead = [vocab[t] for t in ("<0xE2>", "Ã¢") if t in vocab]  # the first byte of "€": byte fallback / byte-level
    special = sorted(set(tokenizer.added_tokens_decoder))
    filler = tokenizer("Thought: a reply long enough for the tail window to matter", add_special_tokens=False)[
        "input_ids"
    ]
    newline = [vocab[t] for t in ("<0x0A>", "Ċ") if t in vocab]
    for lb in lead:
        for nl in newline:
            tail = tokenizer("Task: after an orphan byte", add_special_tokens=False)["input_ids"]
            out.append(filler + [lb, nl] + tail)  # the newline is lost in a broken byte group (fallback)
            out.append(filler + [lb] + special[:1] + [nl] + tail)  # a skipped special inside the group
    for _ in range(200):
        ids = [rng.choice(single) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5:
            at = rng.randrange(len(ids) + 1)
            ids[at:at] = stop
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        out.append(ids)
    return out


def test_the_tail_check_answers_as_decoding_the_whole_reply(generator):
    tokenizer = generator.tokenizer
    assert _local_decoder(tokenizer)
    windows = []
    real = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: windows.append(len(ids)) or real(ids, **kw)
    try:
        sequences = _sequences(tokenizer)
        found = 0
        for ids in sequences:
            expected = _first_stop(lambda out, _: _full(tokenizer, out), ids)
            assert _first_stop(generator._stopped, ids) == expected, tokenizer.convert_ids_to_tokens(ids)
            found += expected is not None
    finally:
        tokenizer.decode = real
    assert found > 50 and found < len(sequences) - 50  # both answers are exercised
    assert min(windows) < max(windows) and windows.count(generator._stop_reach + 1) > 100  # the tail was taken


def test_edge_cases_end_where_the_whole_text_says(policy):
    generator = Generator(policy.model, policy.tokenizer, ExploreConfig(max_new_tokens=8))
    tok = policy.tokenizer
    ends = "Thought: the reply ends exactly at a stop string, with many words before it\n---"
    ids = [i for ch in ends for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert _first_stop(generator._stopped, ids) == len(ids) - 1
    # A multi-byte character right before the stop string: its byte pieces, then "\nTask:".
    euro = tok("Thought: the price is given in euros, many words before it €\nTask:", add_special_tokens=False)
    assert "<0xE2>" in tok.convert_ids_to_tokens(euro["input_ids"])
    assert _first_stop(generator._stopped, euro["input_ids"]) == _first_stop(
        lambda out, _: _full(tok, out), euro["input_ids"]
    )


def test_an_unchecked_reply_is_decoded_whole(policy):
    generator = Generator(policy.model, policy.tokenizer, ExploreConfig(max_new_tokens=8))
    tok = policy.tokenizer
    ids = tok("\nTask: then a reply long enough for the tail window to matter here", add_special_tokens=False)
    assert generator._stopped(ids["input_ids"])  # checked=0: the stop string at the start counts
    assert not generator._stopped(ids["input_ids"], len(ids["input_ids"]) - 1)  # said checked: only the tail


def test_other_decoders_always_decode_the_whole_reply(policy):
    from tokenizers import decoders

    tok = _byte_level_tokenizer()
    tok.backend_tokenizer.decoder = decoders.WordPiece()
    assert not _local_decoder(tok)
    assert Generator(policy.model, tok, ExploreConfig(max_new_tokens=8))._stop_reach == 0
