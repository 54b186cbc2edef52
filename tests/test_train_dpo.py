"""The DPO recipe (etokit.recipes.train_dpo) end to end on a tiny Llama: outputs, reference cache, truncation, backends
through the real loop, Hub push, and kill + --resume == uninterrupted."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.factories import pair, write_jsonl

from etokit.errors import EtokitError  # noqa: E402
from etokit.recipes import train_dpo
from etokit.train.checkpointing import latest_checkpoint
from etokit.train.metric_logging import LOG_FILE, read_log

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_dpo.py"  # the thin launcher of a source checkout


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from etokit.models.init_model import build_tiny_model

    root = tmp_path_factory.mktemp("dpo")
    pairs = [pair(f"t{i}", outcome="lose" if i % 3 else "win") for i in range(8)]
    write_jsonl(root / "pairs.jsonl", pairs)
    texts = [m["content"] for p in pairs for m in p.prompt + p.chosen + p.rejected]
    build_tiny_model(texts, root / "tiny", seed=0)
    return root


def run(assets, out, *extra, cache=None):
    args = [
        "--model",
        str(assets / "tiny"),
        "--data",
        str(assets / "pairs.jsonl"),
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--num-epochs",
        "1",
        "--ref-cache-dir",
        str(cache or assets / "cache"),
        "--report-to",
        "none",
        *extra,
    ]
    train_dpo.main(args)
    return read_log(out)


def test_trains_saves_and_logs(assets, tmp_path):
    log = run(assets, tmp_path / "out", "--num-epochs", "2", "--report-to", "tensorboard")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # step 1: policy == reference, so the loss is exactly log 2 and no reward moved
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/margins"] > 0
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_s",
        "learning_rate",
        "grad_norm",
    ):
        assert k in log[-1]
    out = tmp_path / "out"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "etokit_config.yaml"):
        assert (out / f).exists(), f
    assert list((out / "runs").rglob("events.out.tfevents*"))
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(assets / "tiny")
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_reference_logps_cached_and_keyed(assets, tmp_path, capsys, hub, repo_name):
    """An unchanged rerun reuses the cached reference log-probs; each input they depend on forces a
    recompute when it changes: the max length, the weights (in place, same path), the chat
    template, the dtype, and the commit a Hub branch points to."""
    from huggingface_hub import HfApi
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    model = shutil.copytree(assets / "tiny", tmp_path / "model")  # edited in place below

    def outcome(*extra, model_arg=str(model)):
        args = [
            "--model",
            model_arg,
            "--data",
            str(assets / "pairs.jsonl"),
            "--output-dir",
            str(tmp_path / f"out{len(list(tmp_path.glob('out*')))}"),
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--ref-cache-dir",
            str(cache),
            "--report-to",
            "none",
            *extra,
        ]
        train_dpo.main(args)
        out = capsys.readouterr().out
        assert ("cache hit" in out) != ("computed" in out), out
        return "hit" if "cache hit" in out else "computed"

    assert outcome() == "computed"
    files = sorted(cache.glob("*.safetensors"))
    mtime = files[0].stat().st_mtime_ns
    assert outcome() == "hit" and files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    assert outcome("--max-length", "120") == "computed"

    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert outcome() == "computed"
    assert outcome() == "hit"

    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("{{", "[turn] {{", 1))
    assert outcome() == "computed"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision
    try:
        assert outcome("--mixed-precision", "bf16") == "computed"
        assert outcome("--mixed-precision", "bf16") == "hit"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    api = HfApi()
    api.create_repo(repo_name)
    api.upload_folder(repo_id=repo_name, folder_path=str(assets / "tiny"))
    assert outcome(model_arg=repo_name) == "computed"
    assert outcome(model_arg=repo_name) == "hit"
    # main moves to other weights, same tokenizer and template: only the commit sha tells
    api.upload_file(
        path_or_fileobj=str(model / "model.safetensors"), path_in_repo="model.safetensors", repo_id=repo_name
    )
    assert outcome(model_arg=repo_name) == "computed"
    assert len(list(cache.glob("*.safetensors"))) == 7


def test_truncation_counted_and_never_silent(assets, tmp_path, capsys):
    run(assets, tmp_path / "a", "--max-steps", "1", "--max-length", "120")
    assert "8 of 8 pairs were longer than 120 tokens" in capsys.readouterr().out
    with pytest.raises(EtokitError, match=r"pair 0 \(task_id 't0'\): no chosen assistant token within max_length=20"):
        run(assets, tmp_path / "b", "--max-length", "20")


def test_backends_give_the_same_training(assets, tmp_path, capsys):
    cache = tmp_path / "cache"
    logs = {}
    for b in ("padded", "bucketed", "packed", "shared"):
        logs[b] = run(
            assets,
            tmp_path / b,
            "--backend",
            b,
            "--micro-batch-size",
            "1",
            "--max-tokens-per-micro-batch",
            "500",
            cache=cache,
        )
        # one reference pass (padded's), reused by every layout: the cache key holds no backend
        assert ("cache hit" if b != "padded" else "computed") in capsys.readouterr().out
    losses = {b: torch.tensor([r["loss"] for r in log]) for b, log in logs.items()}
    assert len(losses["padded"]) == 2
    # step 1: policy == reference whichever layout computed either, to fp32 rounding of the sums
    # (a few hundred nats each; beta 0.1 and the sigmoid shrink their ~1e-7 relative difference)
    assert losses["shared"][0] == pytest.approx(math.log(2), rel=1e-5)
    # fp32 summation order differs between layouts; lr 1e-3 amplifies it a little per step
    for b in ("bucketed", "packed", "shared"):
        torch.testing.assert_close(losses[b], losses["padded"], rtol=5e-5, atol=1e-6)


def test_model_the_tree_kernels_cannot_run_goes_unshared(assets, tmp_path, capsys):
    """A sliding window shorter than the pairs: auto picks the unshared layout, an explicit
    --backend shared is a one-line error naming the alternative."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(assets / "tiny")
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        tie_word_embeddings=True,
    )
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    tok.save_pretrained(tmp_path / "mistral")
    args = [
        "--model",
        str(tmp_path / "mistral"),
        "--data",
        str(assets / "pairs.jsonl"),
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--ref-cache-dir",
        str(tmp_path / "cache"),
        "--report-to",
        "none",
    ]
    log = train_dpo.main([*args, "--output-dir", str(tmp_path / "auto")]) or read_log(tmp_path / "auto")
    assert "log-prob backend bucketed" in capsys.readouterr().out and len(log) == 1
    with pytest.raises(
        EtokitError, match=r"--backend shared: .* sliding-window attention \(16 tokens\).*--backend bucketed"
    ):
        train_dpo.main([*args, "--output-dir", str(tmp_path / "shared"), "--backend", "shared"])


def _reference_logps_of(model_dir, assets):
    """The pairs' sequence log-probs under the model in ``model_dir``, computed here, not by the script."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etokit.data import read_jsonl
    from etokit.train.dpo import tokenize_pairs
    from etokit.train.logprobs import sequence_logps

    tok = AutoTokenizer.from_pretrained(model_dir)
    flat = tokenize_pairs(tok, read_jsonl(assets / "pairs.jsonl", "pair"), 4096).flat()
    return sequence_logps(AutoModelForCausalLM.from_pretrained(model_dir), flat, "padded").view(-1, 2)


def test_lora_merged_weights_are_the_adapted_model_and_the_next_reference_is_the_explorer(
    assets, tmp_path, monkeypatch
):
    """ETO's reference is the policy that explored. A LoRA iteration ends by merging its (non-zero)
    adapters into the saved weights, so those weights must give the adapted model's outputs, and
    iteration 2 (LoRA again, from them) must take its reference log-probs from them: not from the
    base model the first adapters were trained on."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from etokit.train import checkpointing

    probe = torch.arange(3, 40).view(1, -1)
    adapted = {}
    real_save = checkpointing.save_model

    def save_model(accelerator, model, *args, **kwargs):  # the adapted (unmerged) model's outputs
        peft_model = accelerator.unwrap_model(model)
        with torch.no_grad():
            adapted["logits"] = peft_model(input_ids=probe).logits.clone()
            with peft_model.disable_adapter():
                adapted["base_logits"] = peft_model(input_ids=probe).logits.clone()
        return real_save(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_model", save_model)
    cache = tmp_path / "cache"
    it1, it2 = tmp_path / "iter-1", tmp_path / "iter-2"
    log1 = run(assets, it1, "--lora", "--lora-r", "4", "--learning-rate", "2e-2", "--max-steps", "3", cache=cache)
    assert log1[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log1[-1]["loss"] < log1[0]["loss"]
    assert not torch.allclose(adapted["logits"], adapted["base_logits"], atol=1e-3)  # the adapters moved
    merged = AutoModelForCausalLM.from_pretrained(it1)
    assert not any("lora" in name for name in load_file(it1 / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, adapted["logits"], rtol=1e-4, atol=1e-4)

    # Iteration 2 from the merged iteration-1 policy (the explorer), LoRA again.
    first = set(cache.glob("*.safetensors"))
    train_dpo.main(
        [
            "--model",
            str(it1),
            "--data",
            str(assets / "pairs.jsonl"),
            "--output-dir",
            str(it2),
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--lora",
            "--lora-r",
            "4",
            "--ref-cache-dir",
            str(cache),
            "--report-to",
            "none",
        ]
    )
    assert read_log(it2)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts at its reference
    (second,) = set(cache.glob("*.safetensors")) - first
    reference = load_file(second)["logps"]
    explorer, base = _reference_logps_of(it1, assets), _reference_logps_of(assets / "tiny", assets)
    assert not torch.allclose(explorer, base, atol=1e-2)
    torch.testing.assert_close(reference, explorer, rtol=1e-5, atol=1e-4)


def test_push_to_hub_revision(assets, tmp_path, hub, repo_name):
    from transformers import AutoModelForCausalLM

    run(
        assets, tmp_path / "out", "--max-steps", "1", "--push-to", repo_name, "--revision", "iter-1", "--iteration", "1"
    )
    remote = AutoModelForCausalLM.from_pretrained(repo_name, revision="iter-1")
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(remote.model.norm.weight, local.model.norm.weight)
    from huggingface_hub import HfApi

    refs = HfApi().list_repo_refs(repo_name)
    assert "iter-1" in {t.name for t in refs.tags} and "iter-1" in {b.name for b in refs.branches}


def test_bad_config_is_one_line_error(assets, tmp_path):
    with pytest.raises(EtokitError, match="--push-to needs --revision"):
        run(assets, tmp_path / "out", "--push-to", "me/x")
    with pytest.raises(EtokitError, match="beta"):
        run(assets, tmp_path / "out", "--beta", "0")


def test_kill_and_resume_gives_the_uninterrupted_loss_sequence(assets, tmp_path, resume_probe):
    common = ["--num-epochs", "3", "--batch-size", "2", "--save-steps", "2", "--keep-checkpoints", "0"]
    full = run(assets, tmp_path / "full", *common)
    assert len(full) == 12

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(assets / "tiny"),
        "--data",
        str(assets / "pairs.jsonl"),
        "--output-dir",
        str(out),
        "--learning-rate",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--report-to",
        "none",
        "--ref-cache-dir",
        str(assets / "cache"),
        *common,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first_ckpt = out / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 120
    while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = len(read_log(out))
    assert killed_at < 12  # really interrupted
    checkpoint = latest_checkpoint(out)
    saved = shutil.copytree(checkpoint, tmp_path / "saved" / checkpoint.name)  # what the resume must load
    # The checkpointed steps' log lines are marked: a resume keeps them, a restart would rewrite them.
    (out / LOG_FILE).write_text(
        "".join(
            json.dumps({**r, "killed_run": True} if r["step"] <= int(checkpoint.name.split("-")[1]) else r) + "\n"
            for r in read_log(out)
        )
    )

    resume_probe.steps = 0  # count only the resumed run's steps
    resumed = run(assets, out, *common, "--resume")
    resume_probe.assert_continued(saved, total_steps=12)
    assert [r.get("killed_run", False) for r in resumed] == [
        r["step"] <= int(checkpoint.name.split("-")[1]) for r in resumed
    ]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in full]
