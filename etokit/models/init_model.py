"""A tiny Llama agent model built from scratch: for tests, demos and CPU smoke runs.

No weights can be downloaded here, so the toolkit's end-to-end paths (BC, exploration, DPO, Hub
round-trips) run on a randomly initialized ``LlamaForCausalLM`` with a SentencePiece tokenizer
trained on the task's own text. The tokenizer is saved as a fast tokenizer (``tokenizer.json``)
because loss masks need character offsets, and carries a chat template with ``{% generation %}``
markers so HF tools that ask for assistant masks work too.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from etokit.errors import EtokitError

# Chat control tokens. Each is one vocabulary entry, never split by the tokenizer.
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"

# Role header and end-of-turn are single special tokens, and a turn's content follows its header
# directly, so a turn's token span starts and ends exactly at its content.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SIZES = {
    # vocab, hidden, intermediate, layers, heads, kv heads
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def read_corpus(path: Path) -> list[str]:
    """Lines of a text file, or every message of a trajectory JSONL."""
    if not path.is_file():
        raise EtokitError(f"--corpus {path} does not exist")
    if path.suffix == ".jsonl":
        from etokit.data import load_records

        records = load_records(path, "trajectory").records
        return [m["content"] for t in records for m in t.messages]
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EtokitError(f"--corpus {path} is not UTF-8 text (byte {e.start})") from None


def build_tiny_model(corpus_texts, out_dir, size="tiny", seed=0, *, vocab_size=None, max_position_embeddings=2048):
    """Train a tokenizer on ``corpus_texts``, build a random Llama of ``size``, save both to ``out_dir``.

    Returns ``(model, tokenizer)``. The vocabulary is as large as asked unless the corpus is too
    small to fill it (SentencePiece then stops early; the model's embedding matches the real size).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise EtokitError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    texts = [t for t in corpus_texts if t and t.strip()]
    if not texts:
        raise EtokitError("the corpus has no text to train a tokenizer on")
    dims = dict(SIZES[size])
    if vocab_size is not None:
        dims["vocab_size"] = vocab_size

    tokenizer = train_tokenizer(texts, dims["vocab_size"])
    dims["vocab_size"] = len(tokenizer)
    config = LlamaConfig(
        **dims,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Generation stops at the end of the agent's turn, not only at </s>.
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def randomize_weights(model, seed: int = 1, std: float = 0.3, head_std: float = 0.5):
    """Give an untrained model large random weights and an untied head, so its greedy replies differ
    from prompt to prompt: a policy for exercising the exploration engine (tests, benchmarks), where
    a freshly initialised model would answer every prompt with the same token."""
    import torch

    torch.manual_seed(seed)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * head_std)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and not name.startswith("lm_head"):
                weight.normal_(0, std)
    return model


def train_tokenizer(texts, vocab_size: int):
    """A SentencePiece BPE model trained on ``texts``, as a transformers fast tokenizer.

    BPE, not unigram: on a small corpus of a text game (a few hundred distinct words) unigram
    with ``hard_vocab_limit=False`` stops at ~540 pieces whatever the vocabulary asked for, and
    splits common words ("take" -> "ta", "ke"); BPE fills the vocabulary with whole words, which
    made the demo's expert trajectories ~40% shorter at 1,024 tokens (a tiny model learns faster
    from shorter sequences)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    specials = [UNK, BOS, EOS, PAD, *ROLE_TOKENS.values(), END_OF_TURN]
    # 256 byte pieces + specials are fixed; the rest is learned.
    if vocab_size < len(specials) + 256 + 8:
        raise EtokitError(f"vocab_size {vocab_size} is too small: byte fallback alone needs {len(specials) + 256}")
    model_bytes = io.BytesIO()
    try:
        _train_spm(texts, vocab_size, model_bytes)
    except RuntimeError as e:  # e.g. more distinct characters in the corpus than vocabulary slots
        raise EtokitError(
            f"cannot train a {vocab_size}-token tokenizer on this corpus: {str(e).splitlines()[-1]}"
        ) from None
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_bytes.getvalue())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # SentencePiece orders BPE pieces by merge rank, so the merges follow the piece ids.
    merges = generate_merges(vocab, skip_tokens=specials)
    backend = Tokenizer(BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[*ROLE_TOKENS.values(), END_OF_TURN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != len(vocab):
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, the SentencePiece model {len(vocab)}")
    return tokenizer


def _train_spm(texts, vocab_size: int, model_bytes) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model_bytes,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill the vocabulary
        byte_fallback=True,  # any text round-trips, even characters unseen in the corpus
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        user_defined_symbols=[*ROLE_TOKENS.values(), END_OF_TURN],
        normalization_rule_name="identity",  # offsets must map 1:1 to the rendered text
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,  # determinism
        seed_sentencepiece_size=100_000,
        minloglevel=2,
    )
