"""etokit's DPO loop vs TRL's DPOTrainer: tokens/s and peak memory on the same model, pairs, machine.

    python bench/dpo_vs_trl.py --quick      # ~2 min on 2 CPU cores
    python bench/dpo_vs_trl.py              # ETO-like lengths (200-3000 tokens), longer

Model: a random Llama (hidden 256, 4 layers, 4k SentencePiece vocab; etokit.models "small").
Pairs: multi-turn ETO-shaped conversations (instruction, "OK", task, then Thought/Action turns
and observations), rejected ~ chosen + a few turns, lengths log-normal with a long tail.

Both sides: fp32 on CPU, the same global batch, one epoch, reference log-probs precomputed
before training (TRL: ``precompute_ref_log_probs=True``; its ``padding_free`` is disabled in
TRL 1.16 and falls back to padding), gradient checkpointing on (TRL's default;
``--no-gradient-checkpointing`` turns it off on both sides). Timed: reference pass + training
(tokenization and model loading excluded on both sides). The two workers alternate
``--repeats`` times and each side's fastest run counts (the machine is shared; the minimum is the
run least disturbed by other load); memory is each side's largest peak over its runs. On a busy
shared machine ``--threads 1`` (both sides) keeps OpenMP barriers from stalling on a descheduled
thread, which otherwise penalises whichever side runs more, smaller kernels. tokens/s counts real (non-pad) input tokens: the tokens of every
prompt+chosen and prompt+rejected sequence, identical for both since both render the same chat
template. Peak memory: the process's peak RSS (VmHWM, reset via /proc/self/clear_refs just
before the timed section) minus its RSS at that point; each side runs in its own subprocess.
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
WORDS = ("go north south east west take apple egg open close fridge drawer cabinet cook heat cool put "
         "look inventory examine knife lettuce tomato pan pot counter table shelf sink microwave in on "
         "the a to from with you see nothing happens are facing kitchen room").split()


def make_pairs(n: int, lo: int, hi: int, seed: int):
    """ETO-shaped pairs whose token lengths spread log-normally between about lo and hi."""
    from etokit.data.schema import Pair

    rng = random.Random(seed)
    mu, sigma = math.log(math.sqrt(lo * hi)), math.log(hi / lo) / 4
    pairs = []
    for i in range(n):
        target = min(hi, max(lo, rng.lognormvariate(mu, sigma)))
        turns = max(1, int(target / 45))  # ~45 tokens per action+observation round

        def traj(k):
            msgs = []
            for t in range(k):
                msgs.append({"role": "assistant", "content": f"Thought: {' '.join(rng.choices(WORDS, k=12))}.\n"
                                                             f"Action: {' '.join(rng.choices(WORDS, k=3))}"})
                if t < k - 1:
                    msgs.append({"role": "user", "content": "Observation: " + " ".join(rng.choices(WORDS, k=18))})
            return msgs

        prompt = [{"role": "user", "content": "Interact with a household to solve a task. " + " ".join(rng.choices(WORDS, k=40))},
                  {"role": "assistant", "content": "OK"},
                  {"role": "user", "content": "Your task is to: " + " ".join(rng.choices(WORDS, k=10))}]
        pairs.append(Pair(task_id=str(i), env="bench", prompt=prompt, chosen=traj(turns),
                          rejected=traj(turns + rng.randint(1, 5)), chosen_reward=1.0, rejected_reward=0.0))
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


def worker_etokit(a) -> dict:
    import torch
    from accelerate import Accelerator

    from etokit.data import read_jsonl
    from etokit.train.dpo import DPOConfig, step_batches, tokenize_pairs, train_step
    from etokit.train.common import enable_gradient_checkpointing
    from etokit.train.logprobs import default_backend, default_max_tokens, sequence_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    pairs = read_jsonl(a.pairs, "pair")
    tokens = tokenize_pairs(tok, pairs, max_length=None)
    max_tokens = a.max_tokens or default_max_tokens("cpu")
    cfg = DPOConfig(model=a.model, data=a.pairs, output_dir=a.tmp, batch_size=a.batch_size, learning_rate=1e-6,
                    max_tokens_per_micro_batch=max_tokens, gradient_checkpointing=a.gradient_checkpointing)
    accelerator = Accelerator(cpu=True)
    backend = a.backend or default_backend("cpu")
    schedule = step_batches(len(tokens), cfg.batch_size, 1, 0)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)

    base = _rss_reset()
    t0 = time.perf_counter()
    model.eval()
    ref = sequence_logps(model, tokens.flat(), backend, max_tokens=max_tokens, pad_token_id=tok.pad_token_id).view(-1, 2)
    model.train()
    n_tokens = 0
    for step in schedule:
        sums = train_step(accelerator, model, tokens, ref, step, len(step), backend, cfg, tok.pad_token_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens += int(sums["num_tokens"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "train_tokens": n_tokens, "peak_rss_delta": _status("VmHWM") - base,
            "backend": f"{backend}, {max_tokens} tokens/forward", "steps": len(schedule)}


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
    args = DPOConfig(
        output_dir=a.tmp, per_device_train_batch_size=a.trl_micro_batch,
        gradient_accumulation_steps=a.batch_size // a.trl_micro_batch, num_train_epochs=1, learning_rate=1e-6,
        beta=0.1, max_length=None, precompute_ref_log_probs=True, precompute_ref_batch_size=a.trl_micro_batch,
        gradient_checkpointing=a.gradient_checkpointing, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10_000,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    base = _rss_reset()
    t0 = time.perf_counter()
    trainer.train()  # the reference pass runs inside, when the train dataloader is built
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_delta": _status("VmHWM") - base, "steps": trainer.state.global_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (~2 min on 2 cores)")
    p.add_argument("--pairs-count", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (both sides)")
    p.add_argument("--trl-micro-batch", type=int, default=2, help="TRL per-device batch (grad accumulation makes up the rest)")
    p.add_argument("--max-tokens", type=int, help="etokit token budget per forward (default: etokit's CPU default)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="on both sides (TRL's default: on)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both sides (default: torch's own choice); "
                                                 "1 gives load-robust ratios on a busy shared machine")
    p.add_argument("--backend", choices=["padded", "bucketed", "packed"], help="etokit log-prob backend (default: CPU default)")
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

    from etokit.data import write_jsonl
    from etokit.models.init_model import build_tiny_model
    from etokit.train.dpo import tokenize_pairs

    n, lo, hi = (16, 150, 900) if a.quick else (64, 200, 3000)
    n = a.pairs_count or n
    tmp = Path(tempfile.mkdtemp(prefix="etokit-bench-"))
    pairs = make_pairs(n, lo, hi, seed=0)
    write_jsonl(tmp / "pairs.jsonl", pairs)
    corpus = [m["content"] for q in pairs[:64] for m in q.prompt + q.chosen + q.rejected]
    build_tiny_model(corpus, tmp / "model", size="small", seed=0, max_position_embeddings=8192)
    tok = AutoTokenizer.from_pretrained(tmp / "model")
    t = tokenize_pairs(tok, pairs, max_length=None)
    lengths = sorted(len(s.input_ids) for s in t.flat())
    data_tokens = sum(lengths)
    print(f"{n} pairs, {len(lengths)} sequences, {data_tokens} tokens; length min/median/max "
          f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}; batch {a.batch_size} pairs; {os.cpu_count()} cores, "
          f"threads {a.threads or 'default'}; gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}", flush=True)

    results: dict[str, dict] = {}
    for _ in range(a.repeats):
        for name in ("etokit", "trl"):
            cmd = [sys.executable, __file__, "--worker", name, "--model", str(tmp / "model"), "--pairs",
                   str(tmp / "pairs.jsonl"), "--tmp", str(tmp / name), "--batch-size", str(a.batch_size),
                   "--trl-micro-batch", str(a.trl_micro_batch),
                   "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"]
            if a.max_tokens:
                cmd += ["--max-tokens", str(a.max_tokens)]
            if a.backend:
                cmd += ["--backend", a.backend]
            env = {**os.environ, "TQDM_DISABLE": "1", **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                sys.exit(f"{name} worker failed:\n{res.stderr[-4000:]}")
            r = json.loads(line[0][7:])
            # both sides process every sequence twice (reference pass + training step)
            r["tokens_per_s"] = 2 * data_tokens / r["seconds"]
            print(f"{name:7s} {r['tokens_per_s']:9.0f} tokens/s  {r['seconds']:7.1f} s  "
                  f"peak RSS delta {r['peak_rss_delta'] / 2**20:7.1f} MiB  steps {r['steps']}"
                  + (f"  backend {r['backend']}" if "backend" in r else ""), flush=True)
            best = results.setdefault(name, r)
            best["peak_rss_delta"] = max(best["peak_rss_delta"], r["peak_rss_delta"])
            if r["seconds"] < best["seconds"]:
                best.update(seconds=r["seconds"], tokens_per_s=r["tokens_per_s"])
    e, t_ = results["etokit"], results["trl"]
    print(f"peak memory (RSS delta): {e['peak_rss_delta'] / max(t_['peak_rss_delta'], 1):.2f}x trl DPOTrainer")
    print(f"dpo tokens/s: {e['tokens_per_s'] / t_['tokens_per_s']:.2f}x trl DPOTrainer")


if __name__ == "__main__":
    main()
