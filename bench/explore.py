"""Episodes/s of batched exploration against a one-episode-at-a-time greedy loop.

Same policy, same tasks, same machine, greedy decoding. The loop is the official pipeline's shape:
one episode at a time, the whole conversation encoded again at every step (the same engine with
one slot and ``kv_reuse=False``). Also measured: the batched engine without KV reuse, to show
what each part gives. All runs must produce the same trajectories on the tasks they share.

Default policy: a tiny random Llama (re-initialized so its replies vary with the prompt) on the
offline WebShop. ``--model DIR`` plays a real checkpoint (e.g. models/smollm2 from `make smollm2`)
on TextWorldExpress instead, 20 steps and 48 new tokens per reply as in the SmolLM2 demo.

    python bench/explore.py --quick                           # ~2 min on 2 CPU cores
    python bench/explore.py --quick --model models/smollm2    # ~15 min
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_policy(path: Path, size: str):
    from etokit.agent.protocol import load_icl, load_instruction
    from etokit.models.init_model import build_tiny_model, randomize_weights

    corpus = [load_instruction("webshop")] + [m["content"] for m in load_icl("webshop")]
    model, tokenizer = build_tiny_model(corpus * 5, path, size=size, max_position_embeddings=4096)
    randomize_weights(model)
    return model.eval(), tokenizer


def run(model, tokenizer, envs, task_ids, config) -> tuple[list, float]:
    from rich.progress import Progress

    from etokit.rollout.episodes import run_episodes
    from etokit.rollout.generator import Generator
    from etokit.rollout.jobs import Job

    generator = Generator(model, tokenizer, config)
    out = []
    start = time.perf_counter()
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"batch {len(envs)}", total=len(task_ids))
        for t in run_episodes(generator, envs, [Job(t) for t in task_ids], split="train"):
            out.append(t)
            progress.update(bar, advance=1)
    return sorted(out, key=lambda t: t.task_id), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer episodes (~2 min on 2 cores)")
    parser.add_argument("--batch-size", type=int, help="episodes in flight (default 32; 8 with --model)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--model", type=Path, help="a checkpoint folder to play TextWorldExpress with instead")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from etokit.envs.registry import make
    from etokit.rollout.generator import ExploreConfig

    import dataclasses

    torch.manual_seed(0)
    args.batch_size = args.batch_size or (8 if args.model else 32)
    if args.model is None:
        batched_tasks, loop_tasks = (64, 8) if args.quick else (256, 32)
        config = ExploreConfig(batch_size=args.batch_size, max_new_tokens=32, icl=False, max_steps=5)
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = build_policy(Path(tmp) / "policy", args.size)
        env_name, name = "webshop", args.size
    else:
        from etokit.train.model_loading import load_model_and_tokenizer

        batched_tasks, loop_tasks = (args.batch_size, 2) if args.quick else (2 * args.batch_size, 4)
        config = ExploreConfig(batch_size=args.batch_size, max_new_tokens=48, icl=False, max_steps=20)
        model, tokenizer = load_model_and_tokenizer(str(args.model))
        model.eval()
        env_name, name = "textworld-express", str(args.model)
    envs = [make(env_name) for _ in range(args.batch_size)]
    tasks = envs[0].task_ids("train")[:batched_tasks]
    full = dataclasses.replace(config, kv_reuse=False)

    loop, loop_s = run(model, tokenizer, envs[:1], tasks[:loop_tasks], full)
    plain, plain_s = run(model, tokenizer, envs, tasks, full)
    batched, batched_s = run(model, tokenizer, envs, tasks, config)
    same = [t.to_row() for t in batched[:loop_tasks]] == [t.to_row() for t in loop] and [
        t.to_row() for t in batched
    ] == [t.to_row() for t in plain]
    loop_rate, plain_rate, batched_rate = len(loop) / loop_s, len(plain) / plain_s, len(batched) / batched_s
    steps = sum(t.num_steps for t in batched)
    print(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), torch threads "
        f"{torch.get_num_threads()}, env {env_name}, {config.max_new_tokens} new tokens/reply, "
        f"{config.max_steps} steps/episode"
    )
    print(
        f"sequential loop (full prompt every step): {len(loop)} episodes in {loop_s:.1f}s = {loop_rate:.2f} episodes/s"
    )
    print(
        f"batched (batch {args.batch_size}), full prompt every step: {len(plain)} episodes in {plain_s:.1f}s = "
        f"{plain_rate:.2f} episodes/s ({plain_rate / loop_rate:.2f}x the loop)"
    )
    print(
        f"batched (batch {args.batch_size}), KV cache kept across steps: {len(batched)} episodes ({steps} steps) "
        f"in {batched_s:.1f}s = {batched_rate:.2f} episodes/s ({batched_rate / plain_rate:.2f}x without reuse)"
    )
    print(f"trajectories equal across the three runs on the tasks they share: {same}")
    print(f"explore episodes/s: {batched_rate / loop_rate:.2f}x sequential loop")


if __name__ == "__main__":
    main()
