"""Episodes/s of batched exploration against a one-episode-at-a-time greedy loop.

Same tiny random Llama (re-initialized so its replies vary with the prompt), same WebShop offline
tasks, same machine, greedy decoding; the loop is the same engine with one slot (batch size 1).
The batched run must also produce the same trajectories as the loop on the tasks both played.

    python bench/explore.py --quick       # ~2 min on 2 CPU cores
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

    from etokit.explore import Generator, Job, run_episodes

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
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from etokit.envs.registry import make
    from etokit.explore import ExploreConfig

    torch.manual_seed(0)
    batched_tasks, loop_tasks = (64, 8) if args.quick else (256, 32)
    config = ExploreConfig(batch_size=args.batch_size, max_new_tokens=32, icl=False, max_steps=5)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build_policy(Path(tmp) / "policy", args.size)
    envs = [make("webshop") for _ in range(args.batch_size)]
    tasks = envs[0].task_ids("train")[:batched_tasks]

    loop, loop_s = run(model, tokenizer, envs[:1], tasks[:loop_tasks], config)
    batched, batched_s = run(model, tokenizer, envs, tasks, config)
    same = [t.to_row() for t in batched[:loop_tasks]] == [t.to_row() for t in loop]
    loop_rate, batched_rate = len(loop) / loop_s, len(batched) / batched_s
    steps = sum(t.num_steps for t in batched)
    print(f"model: {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), torch threads "
          f"{torch.get_num_threads()}, env webshop (offline), {config.max_new_tokens} new tokens/reply, "
          f"{config.max_steps} steps/episode")
    print(f"sequential loop: {len(loop)} episodes in {loop_s:.1f}s = {loop_rate:.2f} episodes/s")
    print(f"batched (batch {args.batch_size}): {len(batched)} episodes ({steps} steps) in {batched_s:.1f}s = "
          f"{batched_rate:.2f} episodes/s")
    print(f"batched trajectories equal the loop's on the {loop_tasks} shared tasks: {same}")
    print(f"explore episodes/s: {batched_rate / loop_rate:.2f}x sequential loop")


if __name__ == "__main__":
    main()
