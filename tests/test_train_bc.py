"""Behavioral cloning recipe: learns, trains only on agent turns, resumes bit-for-bit."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from etokit.errors import EtokitError
from etokit.models.init_model import build_tiny_model
from etokit.recipes import train_bc
from etokit.train.data import pad_batch
from etokit.train.metric_logging import LOG_FILE, read_log
from etokit.train.tokenize import tokenize_messages

from tests.factories import trajectory, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bc")
    trajs = [trajectory(f"t{i}", 1.0, n_steps=3, seed=i) for i in range(12)]
    write_jsonl(root / "expert.jsonl", trajs)
    build_tiny_model([m["content"] for t in trajs for m in t.messages], root / "tiny", vocab_size=400)
    return root


def args(setup, out, *extra):
    return [
        "--model",
        str(setup / "tiny"),
        "--data",
        str(setup / "expert.jsonl"),
        "--output-dir",
        str(out),
        "--per-device-batch-size",
        "4",
        "--learning-rate",
        "3e-3",
        "--report-to",
        "none",
        *extra,
    ]


def losses(out):
    return [row["loss"] for row in read_log(out)]


def test_loss_decreases_and_output_reloads(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train_bc.main(args(setup, out, "--num-epochs", "3", "--warmup-ratio", "0"))
    log = losses(out)
    assert len(log) == 9  # 12 trajectories / batch 4 * 3 epochs
    assert sum(log[-3:]) / 3 < sum(log[:3]) / 3 - 0.3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "model.safetensors").exists() and (out / "etokit_config.yaml").exists()
    before = load_file(setup / "tiny" / "model.safetensors")
    assert any(not torch.equal(p, before[n]) for n, p in model.state_dict().items() if n in before)


def test_observations_get_no_gradient(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup / "tiny")
    model = AutoModelForCausalLM.from_pretrained(setup / "tiny")
    messages = trajectory("t0", 1.0, n_steps=3).messages
    seqs = [tokenize_messages(tok, messages), tokenize_messages(tok, messages[:5])]
    batch = pad_batch(seqs, tok.pad_token_id)
    # Labels: the token on the agent's turns, -100 on instruction, observations, headers, padding.
    first = seqs[0]
    assert batch["labels"][0, : len(first)].tolist() == [
        t if m else -100 for t, m in zip(first.input_ids, first.loss_mask)
    ]
    assert (batch["labels"][1, len(seqs[1]) :] == -100).all()

    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_()
    )
    train_bc.causal_lm_loss_sum(logits, batch["labels"]).backward()
    # Position t predicts token t+1: its gradient is non-zero exactly when token t+1 is trained.
    has_grad = logits.grad.abs().sum(-1)[:, :-1] > 0
    assert torch.equal(has_grad, batch["labels"][:, 1:] != -100)
    # Relabelling an observation token changes nothing.
    relabelled = batch["labels"].clone()
    obs = (batch["labels"][0] == -100).nonzero().flatten()
    relabelled[0, obs[len(obs) // 2]] = 7
    assert train_bc.causal_lm_loss_sum(logits, batch["labels"]) != train_bc.causal_lm_loss_sum(logits, relabelled)
    relabelled[0, obs[len(obs) // 2]] = -100
    assert train_bc.causal_lm_loss_sum(logits, batch["labels"]) == train_bc.causal_lm_loss_sum(logits, relabelled)


def test_maskless_scored_only_loss_equals_the_masked_full_logits_loss(setup):
    """The recipe's batches run without an attention mask (right padding) and project only the
    positions that predict a trained token: same loss and gradients as the masked full-logits
    formula, whatever the pad token is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup / "tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(setup / "tiny")
    assert model.config._attn_implementation == "sdpa"
    messages = trajectory("t3", 1.0, n_steps=3).messages
    seqs = [
        tokenize_messages(tok, messages),
        tokenize_messages(tok, messages[:3]),
        tokenize_messages(tok, messages[:7]),
    ]
    assert len({len(s) for s in seqs}) == 3  # real padding in the batch

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    batch = pad_batch(seqs, tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, expected_grads = grads(train_bc.causal_lm_loss_sum(logits, batch["labels"]))
    for pad in (tok.pad_token_id, 5):
        batch = pad_batch(seqs, pad)
        loss, got_grads = grads(train_bc.trained_loss_sum(model, batch["input_ids"], batch["labels"]))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(got_grads, expected_grads):  # fp32 sums over ~100 tokens: ~1e-6 noise
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_resume_after_kill_continues_bit_for_bit(setup, tmp_path, resume_probe):
    full = tmp_path / "full"
    train_bc.main(args(setup, full, "--num-epochs", "2", "--save-steps", "2", "--keep-checkpoints", "0"))
    reference = losses(full)
    assert len(reference) == 6

    # The state a run killed during step 3 leaves behind: checkpoint step-2 and a log up to step 3.
    killed = tmp_path / "killed"
    shutil.copytree(full / "checkpoints" / "step-2", killed / "checkpoints" / "step-2")
    shutil.copy(full / "etokit_config.yaml", killed)
    # Lines 1-2 are marked: a resume keeps the checkpointed steps' lines, a restart would rewrite them.
    rows = read_log(full)[:3]
    (killed / LOG_FILE).write_text(
        "".join(json.dumps({**row, "killed_run": True} if row["step"] <= 2 else row) + "\n" for row in rows)
    )

    resume_probe.steps = 0  # count only the resumed run's steps
    train_bc.main(args(setup, killed, "--num-epochs", "2", "--save-steps", "2", "--resume"))
    resume_probe.assert_continued(full / "checkpoints" / "step-2", total_steps=6)  # the copy it resumed from
    assert [row["step"] for row in read_log(killed)] == [1, 2, 3, 4, 5, 6]
    assert [row.get("killed_run") for row in read_log(killed)] == [True, True, None, None, None, None]
    assert losses(killed) == reference  # exact float equality: same batches, RNG, optimizer state
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_a_larger_batch(setup, tmp_path):
    """The loss is a token-level mean over the optimizer step, however the step is split."""
    big, accum = tmp_path / "big", tmp_path / "accum"
    train_bc.main(args(setup, big, "--num-epochs", "1", "--max-steps", "2"))
    train_bc.main(
        args(
            setup,
            accum,
            "--num-epochs",
            "1",
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
        )
    )
    assert losses(big) == pytest.approx(losses(accum), rel=1e-5)


def test_lora_run_saves_a_merged_model(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train_bc.main(args(setup, out, "--max-steps", "2", "--lora", "--lora-r", "4", "--gradient-checkpointing"))
    names = set(load_file(out / "model.safetensors"))
    assert not any("lora" in n for n in names)
    AutoModelForCausalLM.from_pretrained(out)


def test_bad_inputs_are_user_errors(setup, tmp_path):
    with pytest.raises(EtokitError, match="--data 'nope.jsonl' is neither"):
        train_bc.main(["--model", str(setup / "tiny"), "--data", "nope.jsonl", "--output-dir", str(tmp_path)])
    with pytest.raises(EtokitError, match="--output-dir is required"):
        train_bc.main(["--model", str(setup / "tiny"), "--data", str(setup / "expert.jsonl")])


def _forked_rank(rank, world_size, port, argv):
    """One rank of a gloo run, forked from the test process: torch and transformers are already
    imported, which is what makes the 2-process check fast enough for CI."""
    import os

    from accelerate.state import AcceleratorState

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "ACCELERATE_USE_CPU": "true",
            "ACCELERATE_MIXED_PRECISION": "no",
        }
    )
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool is not the child's
    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's single-process state
    train_bc.main(argv)


def test_two_gloo_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    """CI's version of the 2-process check below: two ranks forked from this process (the
    environment torchrun would give them), gloo on CPU, 2 steps: step 2's loss and the final
    weights depend on step 1's all-reduced gradients, so ranks that train alone fail."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one, two = tmp_path / "one", tmp_path / "two"
    train_bc.main(args(setup, one, "--num-epochs", "1", "--max-steps", "2"))
    argv = args(setup, two, "--num-epochs", "1", "--max-steps", "2", "--per-device-batch-size", "2")
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_forked_rank, args=(r, 2, port, argv)) for r in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=300)
    assert [rank.exitcode for rank in ranks] == [0, 0]
    assert (two / "checkpoints" / "step-2" / "random_states_1.pkl").exists()  # rank 1 existed and saved its RNG
    assert len(losses(one)) == 2 and losses(two) == pytest.approx(losses(one), rel=1e-4)
    # AdamW hides a gradient off by a constant factor from the weights; the norm does not.
    norms = [[row["grad_norm"] for row in read_log(out)] for out in (one, two)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~40 s on 2 cores: two launched processes import torch + transformers
def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    """A real 2-process (gloo) run: each process takes half of every step's examples, and the
    token-level normalisation makes the losses those of one process with a twice larger batch."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one, two = tmp_path / "one", tmp_path / "two"
    train_bc.main(args(setup, one, "--num-epochs", "1", "--max-steps", "2"))
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "etokit" / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(port),
        str(ROOT / "scripts" / "train_bc.py"),
        *args(setup, two, "--num-epochs", "1", "--max-steps", "2", "--per-device-batch-size", "2"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "checkpoints" / "step-2" / "random_states_1.pkl").exists()  # rank 1 existed
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
