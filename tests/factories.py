"""Small, deterministic builders for tests: trajectories and pairs (ETO's message layout), a tiny
policy, stand-ins for an environment and a generator, and exact binomial quantiles."""

from __future__ import annotations

import math
import random

from etokit.data.schema import Pair, Trajectory
from etokit.envs import Reset, Step
from etokit.rollout.generator import ExploreConfig

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


def trajectory(
    task_id: str,
    reward: float,
    n_steps: int = 3,
    *,
    env: str = "textworld-express",
    source: str = "expert",
    seed: int = 0,
    **kw,
) -> Trajectory:
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


class FakeEnv:
    """The parts of the Env protocol every environment double shares (TWX's prompts, always usable)."""

    name = "textworld-express"
    max_steps = 4

    @classmethod
    def check(cls):
        return True, "test env"

    def close(self):
        pass


class CounterEnv(FakeEnv):
    """Say the task's name to win: ``say t3`` on task t3."""

    def task_ids(self, split):
        return [f"{split[0]}{i}" for i in range(10)]

    def reset(self, task_id, max_steps=None):
        self.task, self.n = task_id, 0
        return Reset(task_id=task_id, instruction=f"Your task is to say {task_id}.", observation="You are in a room.")

    def step(self, action):
        self.n += 1
        reward = 1.0 if action == f"say {self.task}" else 0.0
        return Step(observation=f"You said {action}.", reward=reward, done=reward == 1.0 or self.n >= self.max_steps)


def _counter_task(messages):
    return next(m["content"] for m in messages if m["content"].startswith("Your task is to say"))


def counter_script(messages):
    """A ScriptedGenerator script for CounterEnv. Even tasks: a reply without an action, then the winning action. Odd tasks: empty replies."""
    task = _counter_task(messages).split("say ")[1].split(".")[0]
    if int(task[1:]) % 2:
        return ""
    from etokit.agent.protocol import load_icl

    replies = sum(m["role"] == "assistant" for m in messages[2 + len(load_icl("textworld-express")) :])
    return "I am thinking." if replies == 0 else f"Thought: I know it.\nAction: say {task}\nObservation: fake"


class ScriptedGenerator:
    """Stands in for Generator: the reply is a function of the conversation so far."""

    def __init__(self, script, **config):
        self.script, self.config, self.calls = script, ExploreConfig(**config), []

    def encode(self, messages):
        return list(messages)

    def fits(self, ids):
        return True

    def generate(self, batch, keys=None, seeds=None):
        self.calls.append(len(batch))
        return [self.script(messages) for messages in batch]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p), summed exactly."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


def exact_quantile_count(n: int, p: float, q: float) -> tuple[int, float]:
    """The q-quantile j of Binomial(n, p) and how far the CDF is from q on either side of it
    (the margin that makes a 10k-resample estimate land on j with overwhelming probability)."""
    for j in range(n + 1):
        if binomial_cdf(j, n, p) >= q:
            below = binomial_cdf(j - 1, n, p) if j else 0.0
            return j, min(q - below, binomial_cdf(j, n, p) - q)
    raise AssertionError("unreachable")
