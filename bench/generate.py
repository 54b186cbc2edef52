"""Episodes/s of batched generation on the slot engine, against the engine the project started with.

Every engine keeps each episode's prompt K/V between steps (etokit/rollout/kv_reuse.py). The
reference (``kv_cache="concat"``) grows transformers' DynamicCache by concatenation at every forward
and re-encodes each reply. The slot engine (``"slots"``, the default; etokit/rollout/slot_pool.py)
keeps each episode's K/V, replies included, in a slot of its own, runs the rows' new tokens packed
without padding, and reads the shared prompt prefix once for all rows. ``--engines`` adds the
in-place engine in between (``"in-place"``: a left-padded batch cache rebuilt each step). Same model,
tasks, batch and greedy decoding in one run; the trajectories are compared token for token, and
where they differ the first differing step of each episode is printed (the engines' floating-point
orders differ, so a near-tie can break the other way).

The shape is an evaluation's: TextWorldExpress, the 1-shot prompt, 48-token replies, 20 steps, 32
episodes in flight. Decode and prefill tokens/s are printed as a fraction of a roofline measured
on the spot: the rate of the model's own linear-layer matmul shapes (rows = the batch for decode,
512 for prefill) divided by its matmul FLOPs per token (attention's FLOPs, which grow with the
context, are left out, so the fraction is an upper bound of the share of the arithmetic peak).

    python bench/generate.py --quick --model models/smollm2   # a few minutes on 2 CPU cores
    python bench/generate.py --model models/smollm2           # 32 episodes x 20 steps (about 40 min)
    python bench/generate.py --quick                          # no checkpoint: a tiny random Llama
"""

from __future__ import annotations

import argparse
import dataclasses
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
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        weights = {s: torch.randn(s, device=device, dtype=dtype) for s in set(shapes)}
        inputs = {i: torch.randn(rows, i, device=device, dtype=dtype) for _, i in weights}
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for o, i in shapes:
                torch.nn.functional.linear(inputs[i], weights[(o, i)])
            sync()
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
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda; the slot engine is CPU-only, so on cuda `slots` runs the in-place engine",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the policy's precision, K/V cache included (default float32; the run's generation_dtype)",
    )
    parser.add_argument(
        "--repeats", type=int, help="runs of each engine, alternated A B B A (default 2 with --quick, else 1)"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["concat", "slots"],
        choices=["concat", "in-place", "slots"],
        help="kv_cache engines, the first the baseline (default: concat slots)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from etokit.envs.registry import make
    from etokit.rollout.generator import ExploreConfig, Generator

    episodes = args.episodes or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 1)
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
    model.to(args.device, getattr(torch, args.dtype))
    config = ExploreConfig(batch_size=episodes, max_new_tokens=args.max_new_tokens, icl=True, max_steps=steps)
    envs = [make("textworld-express") for _ in range(episodes)]
    tasks = envs[0].task_ids("test-unseen")[:episodes]

    decode_rate, flops = matmul_roofline(model, episodes)
    prefill_rate, _ = matmul_roofline(model, 512)
    print(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.config._attn_implementation}, {args.dtype}), torch threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.2f}; TextWorldExpress test-unseen, 1-shot prompt, {episodes} episodes in flight, "
        f"{steps} steps, {args.max_new_tokens} new tokens/reply"
    )
    print(
        f"roofline: {flops:.3f} GFLOP/token in matmuls; the model's linear shapes run at {decode_rate:.0f} "
        f"GFLOP/s with {episodes} rows (decode: {decode_rate / flops:.0f} tok/s) and {prefill_rate:.0f} "
        f"GFLOP/s with 512 rows (prefill: {prefill_rate / flops:.0f} tok/s)"
    )

    names = {
        "concat": "reference (DynamicCache, concatenated)",
        "in-place": "in place (batch cache rebuilt per step)",
        "slots": "slots (a slot per episode, shared prefix)",
    }
    engines = {names[e]: dataclasses.replace(config, kv_cache=e) for e in args.engines}
    # Alternated (A B B A ...) so that a change of the host's load during the run weighs on both engines.
    order = [label for r in range(repeats) for label in (list(engines) if r % 2 == 0 else list(engines)[::-1])]
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
            f"{label} [{type(d).__name__}]: {len(trajectories)} episodes ({sum(t.num_steps for t in trajectories)} steps) in "
            f"{took:.1f}s = {len(trajectories) / took:.3f} episodes/s; decode {decode_tps:.0f} tok/s "
            f"({decode_tps / (decode_rate / flops):.0%} of roofline, {d.decoded} tokens in {d.decode_s:.1f}s), "
            f"prefill {prefill_tps:.0f} tok/s ({prefill_tps / (prefill_rate / flops):.0%} of roofline, "
            f"{d.prefilled} tokens in {d.prefill_s:.1f}s; {d.reused} prompt tokens reused); load average "
            f"{os.getloadavg()[0]:.2f}{'' if same_run else '; DIFFERENT from its first run'}"
        )
    baseline, *others = rows
    for label in others:
        differ = [(a, b) for a, b in zip(rows[baseline], rows[label]) if a != b]
        print(f"{label}: trajectories equal to the baseline's token for token: {not differ}")
        for a, b in differ:  # where an episode first differs: the step, and both replies there
            turns = [i for i, (x, y) in enumerate(zip(a["messages"], b["messages"])) if x != y]
            at = turns[0] if turns else min(len(a["messages"]), len(b["messages"]))
            print(
                f"  {a['task_id']}: first differs at message {at} of {len(a['messages'])}/{len(b['messages'])} "
                f"(reward {a['reward']:g} vs {b['reward']:g})"
            )
    against = "reference" if args.engines[0] == "concat" else args.engines[0]
    print(f"{name} episodes/s: {seconds[baseline] / seconds[list(engines)[-1]]:.2f}x {against} engine")


if __name__ == "__main__":
    main()
