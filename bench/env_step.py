"""Environment steps per second: etokit's ScienceWorld adapter vs the official wrapper's
``env.step()`` (same JVM jar, same tasks, same gold action sequences, same run), plus
TextWorldExpress and the offline shop when present.

    python bench/env_step.py --quick      # ~2 min on 2 cores

Last line: ``scienceworld steps/s: <ratio>x env.step()``.
"""

from __future__ import annotations

import argparse
import time

from rich.progress import track


# Short-to-medium gold paths over several task types.
def sample_tasks(n_types: int, seed: int = 0) -> list[str]:
    """One train variation for each of `n_types` task types (all 24 in the full run), drawn with a fixed
    seed: the workload exploration plays, not a hand-picked set."""
    import random

    from etokit.envs.scienceworld import load_splits, parse_task_id

    by_type: dict[str, list[str]] = {}
    for task_id in load_splits()["train"]:
        by_type.setdefault(parse_task_id(task_id)[0], []).append(task_id)
    rng = random.Random(seed)
    types = rng.sample(sorted(by_type), min(n_types, len(by_type)))
    return [rng.choice(by_type[t]) for t in types]


def bench_scienceworld(task_ids: list[str], repeats: int) -> tuple[float, float]:
    from scienceworld import ScienceWorldEnv as OfficialEnv

    from etokit.envs import make
    from etokit.envs.scienceworld import parse_task_id

    ours = make("scienceworld", max_steps=1000)
    gold = {t: ours.expert(t) for t in track(task_ids, description="gold paths")}
    official = OfficialEnv("", envStepLimit=1000)
    ours_steps = ours_time = official_steps = official_time = 0.0
    try:
        # Untimed warm-up of both JVMs (class loading, JIT) on one episode each.
        ours.reset(task_ids[0])
        official.load(*parse_task_id(task_ids[0]), "easy")
        official.reset()
        for action in gold[task_ids[0]][:5]:
            ours.step(action)
            official.step(action)
        for _ in range(repeats):
            for task_id in track(task_ids, description="scienceworld"):
                ours.reset(task_id)
                start = time.perf_counter()
                n = 0
                for action in gold[task_id]:
                    n += 1
                    if ours.step(action).done:
                        break
                ours_time += time.perf_counter() - start
                ours_steps += n

                # The official path replays exactly the same n actions.
                task, variation = parse_task_id(task_id)
                official.load(task, variation, "easy")
                official.reset()
                start = time.perf_counter()
                for action in gold[task_id][:n]:
                    official.step(action)
                official_time += time.perf_counter() - start
                official_steps += n
    finally:
        ours.close()
        official.close()
    return ours_steps / ours_time, official_steps / official_time


def bench_steps(env_name: str, episodes: int) -> float:
    from etokit.envs import make

    env = make(env_name)
    steps, elapsed = 0, 0.0
    try:
        for task_id in env.task_ids("train")[:episodes]:
            actions = env.expert(task_id) or []
            env.reset(task_id)
            start = time.perf_counter()
            for action in actions:
                steps += 1
                if env.step(action).done:
                    break
            elapsed += time.perf_counter() - start
    finally:
        env.close()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer episodes (~2 min on 2 cores)")
    args = parser.parse_args()
    task_ids, repeats = (sample_tasks(8), 1) if args.quick else (sample_tasks(24), 2)
    print(f"scienceworld tasks: {', '.join(task_ids)}")

    twx = bench_steps("textworld-express", 20 if args.quick else 200)
    print(f"textworld-express: {twx:,.0f} steps/s (etokit adapter, gold paths)")
    try:
        import etokit.envs.webshop as webshop

        shop = bench_steps("webshop", 20 if args.quick else 200) if hasattr(webshop, "WebShopEnv") else None
    except ImportError:
        shop = None
    if shop is not None:
        print(f"webshop (offline shop): {shop:,.0f} steps/s")
    ours, official = bench_scienceworld(task_ids, repeats)
    print(
        f"scienceworld: etokit adapter {ours:,.1f} steps/s, official env.step() {official:,.1f} steps/s "
        f"({len(task_ids)} tasks x {repeats}, gold paths)"
    )
    print(f"scienceworld steps/s: {ours / official:.1f}x env.step()")


if __name__ == "__main__":
    main()
