"""etokit's DPO loop vs TRL's DPOTrainer: tokens/s and peak memory on the same model, pairs, machine.

    python bench/dpo_vs_trl.py --quick              # ~2-3 min on 2 CPU cores
    python bench/dpo_vs_trl.py                      # ETO-like lengths, 64 pairs (~6 min)
    python bench/dpo_vs_trl.py --quick --trl-sweep  # time TRL's configurations, name the fastest
    python bench/dpo_vs_trl.py --device cuda --bf16 # on a GPU (not run here: no GPU was lent)

Model: a random Llama (hidden 256, 4 layers, 4k SentencePiece vocab; etokit.models "small").
Pairs (:func:`make_pairs`): ETO's layout -- the real instruction etokit ships for each of the four
environments (288-570 tokens with this tokenizer), "OK", a task turn, then Thought/Action turns and
observations; rejected runs a few rounds longer, and half the pairs share their first agent round
(``--shared-opening``, see make_pairs). Sequence lengths log-normal with a long tail: about
600-1800 tokens with ``--quick`` (16 pairs), 450-3000 otherwise (64 pairs); the instruction alone
is 290-570 tokens, so no ETO sequence is much shorter. The header line prints the share of tokens
that lie in a pair's common prefix (~43% quick, ~34% full).

Each side in its configuration of choice, fp32 on CPU (``--bf16``: bf16 autocast on both sides),
the same global batch of ``--batch-size`` pairs, one epoch, reference log-probs precomputed before
training:

- etokit: its defaults (scripts/train_dpo.py): on CPU the ``shared`` backend (each pair's common
  prefix computed once), 2048 tokens per forward, no gradient checkpointing; on CUDA packed rows
  through flash-attn varlen if installed, else FlexAttention, 16384 tokens per forward.
- TRL: ``precompute_ref_log_probs=True`` and its fastest configuration on this machine, found with
  ``--trl-sweep`` (gradient checkpointing on/off x micro-batch 1/2/4 pairs, gradient accumulation
  making up the batch): no gradient checkpointing, 1 pair per micro-batch (found when the bench was written;
  TRL's default, checkpointing on, was about 1.7x slower). ``padding_free`` cannot be tried:
  TRL 1.16 disables it and falls back to padding. TRL already computes log-probs through a chunked
  fused LM head (no full logits tensor).

Timed: reference pass + training (tokenization and model loading excluded on both sides; TRL 1.16
runs its reference pass inside ``DPOTrainer.__init__``, so its timer starts there). The two
workers alternate ``--repeats`` times and each side's fastest run counts (the machine is shared;
the minimum is the run least disturbed by other load); memory is each side's largest peak over its
runs. On a busy shared machine ``--threads 1`` (both sides) keeps OpenMP barriers from stalling on
a descheduled thread. tokens/s counts real (non-pad) input tokens: the tokens of every
prompt+chosen and prompt+rejected sequence, identical for both since both render the same chat
template (a shared prefix counts once per sequence, as it does for TRL). Peak memory: the
process's peak RSS (VmHWM, reset via /proc/self/clear_refs just before the timed section) minus
its RSS at that point; on CUDA, the peak of ``torch.cuda.max_memory_allocated`` over the timed
section minus the allocation at its start. Each side runs in its own subprocess.
The last line is ``dpo tokens/s: <ratio>x trl DPOTrainer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "go north south east west take apple egg open close fridge drawer cabinet cook heat cool put "
    "look inventory examine knife lettuce tomato pan pot counter table shelf sink microwave in on "
    "the a to from with you see nothing happens are facing kitchen room"
).split()


ENVS = ("alfworld", "scienceworld", "textworld-express", "webshop")


def make_pairs(n: int, lo: int, hi: int, seed: int, shared_opening: float = 0.5):
    """ETO-shaped pairs whose chosen sequences' token lengths spread log-normally between about lo
    and hi (rejected ones are a few rounds longer).

    Prompt = the real instruction etokit ships for one of the four environments (in turn), "OK",
    and a task turn with an initial observation, as in ETO (no 1-shot example in training data).
    Chosen = an expert-like trajectory of Thought/Action turns and observations; rejected = the
    agent's, a few rounds longer (failed episodes run on; ETO cuts them at the expert's length + 5).
    With probability ``shared_opening`` the rejected trajectory starts with the chosen one's first
    round (its first agent turn and observation): the BC policy explores the very training tasks
    it imitated, and often repeats the expert's opening move. Conservative: never more than one
    round, and half the pairs share nothing after the prompt."""
    from etokit.agent.protocol import load_instruction
    from etokit.data.schema import Pair

    rng = random.Random(seed)
    mu, sigma = math.log(math.sqrt(lo * hi)), math.log(hi / lo) / 4
    words = lambda k: " ".join(rng.choices(WORDS, k=k))  # noqa: E731
    pairs = []
    for i in range(n):
        env = ENVS[i % len(ENVS)]
        prompt = [
            {"role": "user", "content": load_instruction(env)},
            {"role": "assistant", "content": "OK"},
            {
                "role": "user",
                "content": f"You are in the middle of a room. Looking quickly around you, you see "
                f"{words(30)}.\nYour task is to: {words(10)}.",
            },
        ]
        prompt_tokens = 1.9 * sum(len(m["content"].split()) for m in prompt)  # measured with the bench tokenizer
        target = min(hi, max(lo, rng.lognormvariate(mu, sigma)))
        turns = max(1, int((target - prompt_tokens) / 45))  # ~45 tokens per action+observation round

        def traj(k):
            msgs = []
            for t in range(k):
                msgs.append({"role": "assistant", "content": f"Thought: {words(12)}.\nAction: {words(3)}"})
                if t < k - 1:
                    msgs.append({"role": "user", "content": "Observation: " + words(18)})
            return msgs

        chosen, rejected = traj(turns), traj(turns + rng.randint(1, 5))
        if turns > 1 and rng.random() < shared_opening:
            rejected[:2] = chosen[:2]
        pairs.append(
            Pair(
                task_id=str(i),
                env=env,
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                chosen_reward=1.0,
                rejected_reward=0.0,
            )
        )
    return pairs


def _rss_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_kind(device: str) -> str:
    return "GPU allocated" if device == "cuda" else "RSS"


def _memory_reset(device: str) -> int:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _rss_reset()


def _memory_peak(device: str) -> int:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def worker_etokit(a) -> dict:
    import torch
    from accelerate import Accelerator

    from etokit.data import read_jsonl
    from etokit.train.dpo import DPOConfig, step_batches, tokenize_pairs, train_step
    from etokit.train.model_loading import enable_gradient_checkpointing
    from etokit.train.logprobs import default_backend, default_max_tokens, sequence_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    pairs = read_jsonl(a.pairs, "pair")
    tokens = tokenize_pairs(tok, pairs, max_length=None)
    max_tokens = a.max_tokens or default_max_tokens(a.device)
    cfg = DPOConfig(
        model=a.model,
        data=a.pairs,
        output_dir=a.tmp,
        batch_size=a.batch_size,
        learning_rate=1e-6,
        max_tokens_per_micro_batch=max_tokens,
    )
    if a.etokit_gradient_checkpointing is not None:
        cfg.gradient_checkpointing = a.etokit_gradient_checkpointing
    accelerator = Accelerator(cpu=a.device == "cpu", mixed_precision="bf16" if a.bf16 else "no")
    backend = a.backend or default_backend(a.device, model.config)
    schedule = step_batches(len(tokens), cfg.batch_size, 1, 0)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)

    base = _memory_reset(a.device)
    t0, c0 = time.perf_counter(), time.process_time()
    model.eval()
    with accelerator.autocast():
        ref = sequence_logps(
            model,
            tokens.flat(),
            backend,
            max_tokens=max_tokens,
            pad_token_id=tok.pad_token_id,
            device=accelerator.device,
        ).view(-1, 2)
    model.train()
    n_tokens = 0
    for step in schedule:
        sums = train_step(accelerator, model, tokens, ref, step, len(step), backend, cfg, tok.pad_token_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens += int(sums["num_tokens"])
    peak = _memory_peak(a.device)  # synchronizes a GPU before the clock stops
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    config = (
        f"backend {backend}, {max_tokens} tokens/forward, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}"
    )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "train_tokens": n_tokens,
        "peak_memory_delta": peak - base,
        "config": config,
        "steps": len(schedule),
    }


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from etokit.data import read_jsonl

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in read_jsonl(a.pairs, "pair")]
    micro = a.trl_micro_batch
    args = DPOConfig(
        output_dir=a.tmp,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.batch_size // micro,
        num_train_epochs=1,
        learning_rate=1e-6,
        beta=0.1,
        max_length=None,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=micro,
        gradient_checkpointing=a.trl_gradient_checkpointing,
        use_cpu=a.device == "cpu",
        bf16=a.bf16,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    # TRL 1.16 runs its reference pass inside DPOTrainer.__init__, after tokenizing the dataset: the
    # timed section (and the memory baseline) starts with that pass, so that both sides are timed
    # over the same work (reference pass + training, no tokenization).
    timed: dict[str, float] = {}
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        timed.update(base=_memory_reset(a.device), t0=time.perf_counter(), c0=time.process_time())
        return precompute(self, *args, **kwargs)

    DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    peak = _memory_peak(a.device)
    seconds, cpu = time.perf_counter() - timed["t0"], time.process_time() - timed["c0"]
    base = timed["base"]
    config = (
        f"micro-batch {micro} pair(s) x {a.batch_size // micro} accumulation, gradient checkpointing "
        f"{'on' if a.trl_gradient_checkpointing else 'off'}, precomputed reference"
    )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_memory_delta": peak - base,
        "steps": trainer.state.global_step,
        "config": config,
    }


def run_worker(name: str, a, tmp: Path, data_tokens: int, **overrides) -> dict:
    """One timed run of a side in a fresh process -> its result with tokens/s."""
    opts = {**vars(a), **overrides}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--model",
        str(tmp / "model"),
        "--pairs",
        str(tmp / "pairs.jsonl"),
        "--tmp",
        str(tmp / name),
        "--batch-size",
        str(opts["batch_size"]),
        "--trl-micro-batch",
        str(opts["trl_micro_batch"]),
        "--device",
        opts["device"],
        "--trl-gradient-checkpointing" if opts["trl_gradient_checkpointing"] else "--no-trl-gradient-checkpointing",
    ]
    if opts["etokit_gradient_checkpointing"] is not None:
        cmd.append(
            "--etokit-gradient-checkpointing"
            if opts["etokit_gradient_checkpointing"]
            else "--no-etokit-gradient-checkpointing"
        )
    if opts["max_tokens"]:
        cmd += ["--max-tokens", str(opts["max_tokens"])]
    if opts["backend"]:
        cmd += ["--backend", opts["backend"]]
    if opts["bf16"]:
        cmd.append("--bf16")
    env = {**os.environ, "TQDM_DISABLE": "1", **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
        sys.exit(f"{name} worker failed:\n{res.stderr[-4000:]}")
    r = json.loads(line[0][7:])
    # both sides process every sequence twice (reference pass + training step)
    r["tokens_per_s"] = 2 * data_tokens / r["seconds"]
    print(
        f"{name:7s} {r['tokens_per_s']:9.0f} tokens/s  {r['seconds']:7.1f} s ({r['cpu_seconds']:.1f} s CPU)  "
        f"peak {_memory_kind(a.device)} delta {r['peak_memory_delta'] / 2**20:7.1f} MiB  steps {r['steps']}  "
        f"{r['config']}",
        flush=True,
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (~2-3 min on 2 cores)")
    p.add_argument("--pairs-count", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (both sides)")
    p.add_argument(
        "--shared-opening",
        type=float,
        default=0.5,
        help="fraction of pairs whose rejected trajectory repeats the chosen one's first round",
    )
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    p.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for both sides (default: torch's own choice); "
        "1 gives load-robust ratios on a busy shared machine",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: both sides on the GPU (memory = peak allocated GPU memory)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (the setting for a GPU run)")
    p.add_argument(
        "--backend",
        choices=["padded", "bucketed", "packed", "shared"],
        help="etokit log-prob backend (default: etokit's CPU default)",
    )
    p.add_argument("--max-tokens", type=int, help="etokit token budget per forward (default: etokit's CPU default)")
    p.add_argument(
        "--etokit-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: etokit's default (off)",
    )
    p.add_argument(
        "--trl-micro-batch", type=int, default=1, help="TRL pairs per forward (accumulation makes up the rest)"
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TRL's own default is on; off measured faster here",
    )
    p.add_argument("--trl-sweep", action="store_true", help="time TRL alone in each configuration and name the fastest")
    p.add_argument("--worker", choices=["etokit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        out = (worker_etokit if a.worker == "etokit" else worker_trl)(a)
        print("RESULT " + json.dumps(out))
        return

    from transformers import AutoTokenizer

    from etokit.agent.protocol import load_instruction
    from etokit.data import write_jsonl
    from etokit.models.init_model import build_tiny_model
    from etokit.train.dpo import tokenize_pairs

    n, lo, hi = (16, 500, 2000) if a.quick else (64, 500, 3000)
    n = a.pairs_count or n
    tmp = Path(tempfile.mkdtemp(prefix="etokit-bench-"))
    pairs = make_pairs(n, lo, hi, seed=0, shared_opening=a.shared_opening)
    write_jsonl(tmp / "pairs.jsonl", pairs)
    corpus = [m["content"] for q in pairs[:64] for m in q.prompt + q.chosen + q.rejected]
    build_tiny_model(corpus, tmp / "model", size="small", seed=0, max_position_embeddings=8192)
    tok = AutoTokenizer.from_pretrained(tmp / "model")
    t = tokenize_pairs(tok, pairs, max_length=None)
    lengths = sorted(len(s.input_ids) for s in t.flat())
    data_tokens = sum(lengths)
    instruction = {env: len(tok(load_instruction(env), add_special_tokens=False).input_ids) for env in ENVS}
    print(
        f"{n} pairs, {len(lengths)} sequences, {data_tokens} tokens; length min/median/max "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}; instruction tokens "
        f"{', '.join(f'{k} {v}' for k, v in instruction.items())}; common prefix "
        f"{2 * sum(t.shared_prefix) / data_tokens:.0%} of tokens; batch {a.batch_size} pairs; {os.cpu_count()} cores, "
        f"threads {a.threads or 'default'}",
        flush=True,
    )

    if a.trl_sweep:
        runs = []
        for gc in (True, False):
            for micro in (1, 2, 4):
                if a.batch_size % micro == 0:
                    r = run_worker("trl", a, tmp, data_tokens, trl_gradient_checkpointing=gc, trl_micro_batch=micro)
                    runs.append(r)
        best = max(runs, key=lambda r: r["tokens_per_s"])
        print(f"fastest TRL configuration: {best['config']} ({best['tokens_per_s']:.0f} tokens/s)")
        return

    results: dict[str, dict] = {}
    for _ in range(a.repeats):
        for name in ("etokit", "trl"):
            r = run_worker(name, a, tmp, data_tokens)
            best = results.setdefault(name, r)
            best["peak_memory_delta"] = max(best["peak_memory_delta"], r["peak_memory_delta"])
            best["cpu_seconds"] = min(best["cpu_seconds"], r["cpu_seconds"])
            if r["seconds"] < best["seconds"]:
                best.update(seconds=r["seconds"], tokens_per_s=r["tokens_per_s"])
    e, t_ = results["etokit"], results["trl"]
    # Process CPU time is much less sensitive to other load than wall time: a cross-check.
    print(f"CPU time: {t_['cpu_seconds'] / e['cpu_seconds']:.2f}x less than trl DPOTrainer (best runs)")
    ratio = e["peak_memory_delta"] / max(t_["peak_memory_delta"], 1)
    print(f"peak memory ({_memory_kind(a.device)} delta): {ratio:.2f}x trl DPOTrainer")
    print(f"dpo tokens/s: {e['tokens_per_s'] / t_['tokens_per_s']:.2f}x trl DPOTrainer")


if __name__ == "__main__":
    main()
