"""init-model: a real vocabulary, a chat template, a model that reloads with the Auto classes."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from etokit.errors import EtokitError
from etokit.models.init_model import END_OF_TURN, ROLE_TOKENS, SIZES, build_tiny_model

from tests.factories import trajectory, write_jsonl


def random_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Varied enough text for SentencePiece to fill a few hundred pieces."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(600)]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_lines)]


TEXTS = random_corpus(400) + [m["content"] for i in range(10) for m in trajectory(f"task-{i}", 1.0).messages]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    model, tokenizer = build_tiny_model(TEXTS, out, vocab_size=400, seed=3)
    return out, model, tokenizer


def test_vocabulary_is_the_configured_size(built):
    out, model, tokenizer = built
    # The transformers 5 trap: a tokenizer wrapped the wrong way silently has 4 tokens.
    assert len(tokenizer) == 400
    assert model.config.vocab_size == 400
    assert model.get_input_embeddings().weight.shape[0] == 400


def test_tokenizer_equals_its_sentencepiece_model_and_keeps_words_whole(built):
    import io

    import sentencepiece as spm

    from etokit.models.init_model import _train_spm

    out, model, tokenizer = built
    proto = io.BytesIO()
    _train_spm([t for t in TEXTS if t.strip()], 400, proto)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    unseen = ["Zebra quux 123 \u00c5\u00e4 \u4e2d\u6587!", "  two  spaces\nand a newline", ""]
    for text in TEXTS[:50] + TEXTS[-20:] + unseen:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text  # the same segmentation as SentencePiece itself
        assert tokenizer.decode(ids) == text  # and lossless, byte fallback included


def test_words_of_a_small_game_corpus_are_single_tokens():
    """BPE fills the vocabulary with the corpus's words; the unigram trainer stopped at ~540 pieces
    on such a corpus and split frequent words ("take" -> "ta" "ke"), making sequences ~40% longer."""
    from etokit.models.init_model import train_tokenizer

    texts = [m["content"] for i in range(30) for m in trajectory(f"task-{i}", 1.0).messages]
    tokenizer = train_tokenizer(texts, 512)
    words = {w.strip(".,:") for t in texts for w in t.split()}
    frequent = sorted(words, key=lambda w: -sum(t.count(w) for t in texts))[:10]
    for word in frequent:
        # a word starting a line has no leading space: either spelling is one token
        assert 1 in (len(tokenizer.tokenize(word)), len(tokenizer.tokenize(" " + word))), word


def test_reloads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, model, tokenizer = built
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert tok.is_fast and len(tok) == 400
    for name, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
    # Same tokenization after the round trip, special tokens included, each one a single token.
    text = tok.apply_chat_template(trajectory("x", 1.0).messages, tokenize=False)
    assert tok(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    for special in [*ROLE_TOKENS.values(), END_OF_TURN, tok.bos_token, tok.eos_token, tok.pad_token]:
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == special
        assert tok.convert_ids_to_tokens(ids[0]) == special
    assert {tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token} == {"<s>", "</s>", "<unk>", "<pad>"}
    # Unseen characters round-trip through byte fallback.
    assert tok.decode(tok("naïve 漢字 ✓", add_special_tokens=False).input_ids) == "naïve 漢字 ✓"


def test_chat_template_and_generation_stop(built):
    out, model, tokenizer = built
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "{% generation %}" in tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|>hi<|end|><|assistant|>"
    # Generation ends at the end of the agent's turn.
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids(END_OF_TURN) in eos


def test_deterministic_for_a_seed(built, tmp_path):
    _, model, _ = built
    same, _ = build_tiny_model(TEXTS, tmp_path / "a", vocab_size=400, seed=3)
    other, _ = build_tiny_model(TEXTS, tmp_path / "b", vocab_size=400, seed=4)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(same.state_dict()[w], model.state_dict()[w])
    assert not torch.equal(other.state_dict()[w], model.state_dict()[w])


def test_too_small_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(EtokitError, match="too small"):
        build_tiny_model(TEXTS, tmp_path / "m", vocab_size=100)


def test_cli_builds_from_text_and_trajectory_jsonl(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from etokit.cli import app

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(random_corpus(800, seed=1)))
    result = CliRunner().invoke(app, ["init-model", "--corpus", str(text), "--out", str(tmp_path / "m"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (
        len(AutoTokenizer.from_pretrained(tmp_path / "m")) == SIZES["tiny"]["vocab_size"]
    )  # the "tiny" size's vocabulary

    # A trajectory file trains on its messages: multi-character pieces learned from them.
    data = tmp_path / "expert.jsonl"
    write_jsonl(data, [trajectory(f"t{i}", 1.0, n_steps=4, seed=i) for i in range(30)])
    result = CliRunner().invoke(app, ["init-model", "--corpus", str(data), "--out", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(tmp_path / "j")
    assert AutoConfig.from_pretrained(tmp_path / "j").vocab_size == len(tok)
    sample = trajectory("t0", 1.0, n_steps=4, seed=0).messages[3]["content"]
    pieces = tok.convert_ids_to_tokens(tok(sample, add_special_tokens=False).input_ids)
    assert len(pieces) < 0.7 * len(sample) and max(map(len, pieces)) >= 4
    missing = CliRunner().invoke(
        app, ["init-model", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
