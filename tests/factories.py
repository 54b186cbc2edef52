"""Small, deterministic trajectory and pair builders for tests (ETO's message layout)."""

from __future__ import annotations

import random

from etokit.data.schema import Pair, Trajectory

INSTRUCTION = "You are in a text world. Answer with 'Thought: ...' then 'Action: ...'."


def conversation(task: str, actions: list[str], observations: list[str]) -> list[dict]:
    msgs = [
        {"role": "user", "content": INSTRUCTION},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": task},
    ]
    for i, action in enumerate(actions):
        msgs.append({"role": "assistant", "content": f"Thought: step {i} of {task}.\nAction: {action}"})
        if i < len(observations):
            msgs.append({"role": "user", "content": f"Observation: {observations[i]}"})
    return msgs


def trajectory(task_id: str, reward: float, n_steps: int = 3, *, env: str = "textworld-express", source: str = "expert",
               seed: int = 0, **kw) -> Trajectory:
    rng = random.Random(f"{task_id}-{seed}-{reward}")
    actions = [rng.choice(["go north", "take apple", "open fridge", "cook egg", "look"]) for _ in range(n_steps)]
    observations = [f"You see {rng.randint(0, 9)} things." for _ in range(n_steps - 1)]
    messages = conversation(f"Your task is to finish task {task_id}.", actions, observations)
    return Trajectory(task_id=str(task_id), env=env, messages=messages, reward=reward, source=source, seed=seed, **kw)


def pair(task_id: str, iteration: int = 1, *, env: str = "textworld-express", outcome: str = "lose") -> Pair:
    good, bad = trajectory(task_id, 1.0, 3, env=env), trajectory(task_id, 0.25, 4, env=env, source="explore", seed=1)
    chosen, rejected = (good, bad) if outcome == "lose" else (bad, good)
    return Pair(
        task_id=str(task_id),
        env=env,
        prompt=good.messages[:3],
        chosen=chosen.messages[3:],
        rejected=rejected.messages[3:],
        chosen_reward=chosen.reward,
        rejected_reward=rejected.reward,
        outcome=outcome,
        mode="trajectory",
        iteration=iteration,
    )


def write_jsonl(path, records) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_row(), ensure_ascii=False) + "\n")


def build_policy(path):
    """A tiny random Llama saved to ``path``, re-initialized so that its replies depend on the prompt:
    with the default init and tied embeddings it echoes the prompt's last token (the special
    <|assistant|>) forever, which decodes to "" for every task."""
    from etokit.agent.protocol import load_icl, load_instruction
    from etokit.models.init_model import build_tiny_model, randomize_weights

    corpus = [load_instruction(e) for e in ("webshop", "textworld-express")]
    corpus += [m["content"] for e in ("webshop", "textworld-express") for m in load_icl(e)]
    model, tokenizer = build_tiny_model(corpus * 5, path, max_position_embeddings=4096)
    randomize_weights(model)
    model.save_pretrained(path)
    return model.eval(), tokenizer
