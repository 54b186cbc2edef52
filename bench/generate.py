"""Episodes/s of batched generation with the KV cache written in place, against today's engine.

Both engines keep each episode's prompt K/V between steps and borrow a shared prefix for a new
episode (etokit/rollout/kv_reuse.py). The reference grows transformers' DynamicCache by concatenation at
every forward (each decode step copies every layer's whole cache); the new path preallocates the
cache and writes each step in place (etokit/rollout/slot_cache.py). Same model, tasks, batch and greedy
decoding in one run; the trajectories must be equal token for token.

The shape is an evaluation's: TextWorldExpress, the 1-shot prompt, 48-token replies, 20 steps, 32
episodes in flight. Decode and prefill tokens/s are printed as a fraction of a roofline measured
on the spot: the rate of the model's own linear-layer matmul shapes (rows = the batch for decode,
512 for prefill) divided by its matmul FLOPs per token (attention's FLOPs, which grow with the
context, are left out, so the fraction is an upper bound of the share of the arithmetic peak).

    python bench/generate.py --quick --model models/smollm2   # a few minutes on 2 CPU cores
    python bench/generate.py --model models/smollm2           # 32 episodes x 20 steps
    python bench/generate.py --quick                          # no checkpoint: a tiny random Llama
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_policy(path: Path):
    """A random Llama with SmolLM2's head layout (grouped K/V heads) and a tokenizer trained on the
    TextWorldExpress prompts, when no checkpoint is at hand."""
    from etokit.agent.protocol import load_icl, load_instruction
    from etokit.models.init_model import build_tiny_model, randomize_weights

    corpus = [load_instruction("textworld-express")] + [m["content"] for m in load_icl("textworld-express")]
    model, tokenizer = build_tiny_model(corpus * 5, path, size="tiny", max_position_embeddings=4096)
    randomize_weights(model)
    return model.eval(), tokenizer


def matmul_roofline(model, rows: int, repeats: int = 3) -> tuple[float, float]:
    """(GFLOP/s of the model's linear shapes at ``rows`` rows, matmul GFLOP per token)."""
    import torch

    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = sum(2 * o * i for o, i in shapes)  # lm_head included: decode and prefill compute it for one position
    best = float("inf")
    with torch.inference_mode():
        weights = {s: torch.randn(s) for s in set(shapes)}
        inputs = {i: torch.randn(rows, i) for _, i in weights}
        for _ in range(repeats):
            start = time.perf_counter()
            for o, i in shapes:
                torch.nn.functional.linear(inputs[i], weights[(o, i)])
            best = min(best, time.perf_counter() - start)
    return rows * flops / best / 1e9, flops / 1e9


def run(generator, envs, task_ids):
    from etokit.rollout.episodes import run_episodes
    from etokit.rollout.jobs import Job

    start = time.perf_counter()
    out = list(run_episodes(generator, envs, [Job(t) for t in task_ids], split="test-unseen"))
    return sorted(out, key=lambda t: t.task_id), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("models/smollm2"),
        help="checkpoint folder (default models/smollm2; a tiny random Llama when it is absent)",
    )
    parser.add_argument("--quick", action="store_true", help="8 episodes of 3 steps (a few minutes on 2 cores)")
    parser.add_argument("--episodes", type=int, help="episodes (default 32; 8 with --quick), all in flight")
    parser.add_argument("--steps", type=int, help="steps per episode (default 20; 3 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine, alternated (default 2)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from etokit.envs.registry import make
    from etokit.rollout.generator import ExploreConfig, Generator

    episodes = args.episodes or (8 if args.quick else 32)
    steps = args.steps or (3 if args.quick else 20)
    torch.manual_seed(0)
    if (args.model / "config.json").exists():
        from etokit.train.model_loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(str(args.model))
        model.eval()
        name = "smollm2" if "smollm2" in args.model.name.lower() else args.model.name
    else:
        print(f"{args.model} not found: a tiny random Llama instead (`make smollm2` prepares SmolLM2-135M)")
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = tiny_policy(Path(tmp) / "policy")
        name = "tiny-llama"
    config = ExploreConfig(
        batch_size=episodes, max_new_tokens=args.max_new_tokens, icl=True, max_steps=steps, kv_in_place=True
    )
    reference_config = dataclasses.replace(config, kv_in_place=False)
    envs = [make("textworld-express") for _ in range(episodes)]
    tasks = envs[0].task_ids("test-unseen")[:episodes]

    decode_rate, flops = matmul_roofline(model, episodes)
    prefill_rate, _ = matmul_roofline(model, 512)
    print(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.config._attn_implementation}), torch threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.2f}; TextWorldExpress test-unseen, 1-shot prompt, {episodes} episodes in flight, "
        f"{steps} steps, {args.max_new_tokens} new tokens/reply"
    )
    print(
        f"roofline: {flops:.3f} GFLOP/token in matmuls; the model's linear shapes run at {decode_rate:.0f} "
        f"GFLOP/s with {episodes} rows (decode: {decode_rate / flops:.0f} tok/s) and {prefill_rate:.0f} "
        f"GFLOP/s with 512 rows (prefill: {prefill_rate / flops:.0f} tok/s)"
    )

    engines = {"reference (DynamicCache, concatenated)": reference_config, "in place (preallocated slots)": config}
    # Alternated (A B B A ...) so that a change of the host's load during the run weighs on both engines.
    order = [label for r in range(args.repeats) for label in (list(engines) if r % 2 == 0 else list(engines)[::-1])]
    seconds = dict.fromkeys(engines, 0.0)
    rows: dict[str, list] = {}
    for label in order:
        generator = Generator(model, tokenizer, engines[label])
        trajectories, took = run(generator, envs, tasks)
        seconds[label] += took
        rows.setdefault(label, [t.to_row() for t in trajectories])
        same_run = rows[label] == [t.to_row() for t in trajectories]
        d = generator.decoder
        decode_tps, prefill_tps = d.decoded / max(d.decode_s, 1e-9), d.prefilled / max(d.prefill_s, 1e-9)
        print(
            f"{label}: {len(trajectories)} episodes ({sum(t.num_steps for t in trajectories)} steps) in "
            f"{took:.1f}s = {len(trajectories) / took:.3f} episodes/s; decode {decode_tps:.0f} tok/s "
            f"({decode_tps / (decode_rate / flops):.0%} of roofline, {d.decoded} tokens in {d.decode_s:.1f}s), "
            f"prefill {prefill_tps:.0f} tok/s ({prefill_tps / (prefill_rate / flops):.0%} of roofline, "
            f"{d.prefilled} tokens in {d.prefill_s:.1f}s; {d.reused} prompt tokens reused); load average "
            f"{os.getloadavg()[0]:.2f}{'' if same_run else '; DIFFERENT from its first run'}"
        )
    ref, new = rows.values()
    same = ref == new
    print(f"trajectories equal token for token: {same}")
    if not same:
        differ = [json.loads(r)["task_id"] if isinstance(r, str) else r["task_id"] for r, u in zip(ref, new) if r != u]
        print(f"tasks whose trajectories differ: {differ}")
    ref_s, new_s = seconds.values()
    print(f"{name} episodes/s: {ref_s / new_s:.2f}x reference engine")


if __name__ == "__main__":
    main()
