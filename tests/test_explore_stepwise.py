"""Step-wise exploration (paper App. B): episodes that replay the expert's first t-1 steps, then
let the agent play from step t; `etokit explore --step-wise-expert`.

A scripted stairs environment checks the engine exactly (which state the agent starts in, step
counting, failures); TextWorldExpress with a tiny random Llama checks the real path end to end.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from etokit.agent.protocol import expert_trajectory, load_icl
from etokit.cli import app
from etokit.data import DataError, read_jsonl
from etokit.data.schema import Trajectory
from etokit.envs import Reset, Step
from etokit.rollout.episodes import run_episodes
from etokit.rollout.generator import ExploreConfig, Generator
from etokit.rollout.jobs import Job, expert_steps, index_experts, job_of, plan_step_jobs
from tests.factories import ScriptedGenerator, write_jsonl

runner = CliRunner()
ICL_LEN = len(load_icl("textworld-express"))


class StairsEnv:
    """Task "sN": climb N stairs in order ("climb 1", "climb 2", ...); "where" tells the stair
    the agent is on, so a reply shows which state the episode really is in. Uses the TWX prompts."""

    name = "textworld-express"
    max_steps = 6

    def __init__(self, fail_at_step: int | None = None):
        self.fail_at_step, self.failures = fail_at_step, 0

    @classmethod
    def check(cls):
        return True, "test env"

    def task_ids(self, split):
        return [f"s{n}" for n in range(1, 6)]

    def reset(self, task_id, max_steps=None):
        self.n, self.stair, self.steps = int(task_id[1:]), 0, 0
        return Reset(task_id=task_id, instruction=f"Your task is to climb {self.n} stairs.", observation="")

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at_step:
            self.failures += 1
            raise RuntimeError("simulator died")
        if action == f"climb {self.stair + 1}":
            self.stair += 1
        observation = f"You are on stair {self.stair}." if action in ("where", f"climb {self.stair}") else "You slip."
        return Step(
            observation=observation,
            reward=self.stair / self.n,
            done=self.stair == self.n or self.steps >= self.max_steps,
        )

    def expert(self, task_id):
        return [f"climb {i}" for i in range(1, int(task_id[1:]) + 1)]

    def close(self):
        pass


def _where(messages):
    # The 1-shot example is in every prompt (and never recorded: see the checks on the messages).
    assert messages[2]["content"] == load_icl("textworld-express")[0]["content"]
    return "Thought: Where am I?\nAction: where"


def _play(jobs, experts, envs=None, **config):
    gen = ScriptedGenerator(_where, **config)
    out = list(run_episodes(gen, envs or [StairsEnv(), StairsEnv()], jobs, split="train", experts=experts))
    return {job_of(t): t for t in out}, gen


def test_the_agent_plays_on_from_the_replayed_expert_prefix():
    expert = expert_trajectory(StairsEnv(), "s4", "train")
    assert expert_steps(expert) == 4 and expert.reward == 1.0
    jobs = [Job("s4", 0, p) for p in range(4)]
    out, gen = _play(jobs, {"s4": expert})
    assert sorted(out, key=jobs.index) == jobs
    for p in range(4):
        t = out[Job("s4", 0, p)]
        end = 3 + 2 * p
        # The expert's turns and observations of steps 1..t-1, then the agent's, who is on stair t-1.
        assert t.messages[:end] == expert.messages[:end]
        assert t.messages[end : end + 2] == [
            {"role": "assistant", "content": "Thought: Where am I?\nAction: where"},
            {"role": "user", "content": f"Observation: You are on stair {p}."},
        ]
        assert all(m["content"].endswith("Action: where") for m in t.messages[end::2])
        # Steps count from the episode's start: the prefix uses p of the env's 6.
        assert t.num_steps == 6 and sum(m["role"] == "assistant" for m in t.messages[3:]) == 6
        assert t.reward == p / 4 and t.extra["step_wise"] == {"prefix_steps": p, "expert_steps": 4}
        assert t.extra["invalid_actions"] == 0 and t.messages[-1]["role"] == "assistant"
    assert sum(gen.calls) == sum(6 - p for p in range(4))  # the prefix costs no generation


def test_max_steps_counts_the_prefix():
    expert = expert_trajectory(StairsEnv(), "s4", "train")
    out, _ = _play([Job("s4", 0, 2), Job("s4", 0, 3)], {"s4": expert}, max_steps=3)
    assert out[Job("s4", 0, 2)].num_steps == 3 and len(out[Job("s4", 0, 2)].messages) == 3 + 2 * 2 + 1
    failed = out[Job("s4", 0, 3)]
    assert failed.extra["stopped"] == "prefix" and failed.messages == []
    assert failed.extra["error"] == "a prefix of 3 expert steps leaves none of the 3 steps to the agent"


def test_a_prefix_that_cannot_be_replayed_is_recorded_with_its_reason_not_retried():
    env = StairsEnv()
    good = expert_trajectory(env, "s3", "train")
    # A 3-stair expert replayed on the 2-stair task: the environment ends the episode at its step 2.
    too_long = Trajectory(task_id="s2", env=env.name, reward=1.0, messages=[dict(m) for m in good.messages])
    other_view = Trajectory(task_id="s3", env=env.name, reward=1.0, messages=[dict(m) for m in good.messages])
    other_view.messages[6]["content"] = "Observation: You are on stair 9."
    out, _ = _play([Job("s2", 0, 2)], {"s2": too_long})
    assert out[Job("s2", 0, 2)].extra["error"] == (
        "the environment ended the episode at expert step 2 of the 2-step prefix (reward 1)"
    )
    out, _ = _play([Job("s3", 0, 2)], {"s3": other_view})
    (t,) = out.values()
    assert t.extra["stopped"] == "prefix" and "env_retries" not in t.extra
    assert t.extra["error"].startswith(
        "after expert step 2 ('climb 2') the environment shows 'Observation: You are "
        "on stair 2.', the expert saw 'Observation: You are on stair 9.'"
    )
    assert job_of(t) == Job("s3", 0, 2)  # the record keys like the job it failed


def test_a_prefix_too_long_for_the_context_is_an_error_record():
    class Short(ScriptedGenerator):
        max_context = 99

        def fits(self, ids):  # ids are the messages here: room for the prompt (1-shot example included) + 2 steps
            return len(ids) <= 3 + ICL_LEN + 4

    expert = expert_trajectory(StairsEnv(), "s4", "train")
    gen = Short(_where, env_retries=1)
    out = {
        job_of(t): t
        for t in run_episodes(
            gen, [StairsEnv()], [Job("s4", 0, 1), Job("s4", 0, 3)], split="train", experts={"s4": expert}
        )
    }
    assert out[Job("s4", 0, 1)].extra["stopped"] == "context" and "error" not in out[Job("s4", 0, 1)].extra
    failed = out[Job("s4", 0, 3)]
    assert failed.extra["stopped"] == "prefix" and "env_retries" not in failed.extra
    assert failed.extra["error"].startswith("the prompt and the 3-step expert prefix are ")


def test_an_environment_failure_in_the_prefix_is_retried_from_the_reset():
    env = StairsEnv(fail_at_step=2)
    expert = expert_trajectory(StairsEnv(), "s3", "train")
    out, _ = _play([Job("s3", 0, 2)], {"s3": expert}, envs=[env], env_retries=1)
    (t,) = out.values()
    assert env.failures == 2 and t.extra["stopped"] == "error" and t.extra["error"] == "RuntimeError: simulator died"
    assert t.extra["step_wise"] == {"prefix_steps": 2}


def test_the_invalid_action_rate_counts_the_agents_replies_only():
    from etokit.evaluate import summarize

    expert = expert_trajectory(StairsEnv(), "s4", "train")
    out, _ = _play([Job("s4", 0, 3)], {"s4": expert})
    (t,) = out.values()
    t.extra["invalid_actions"] = 3  # of the agent's 6 - 3 replies
    assert summarize([t]).invalid_action_rate == 1.0 and summarize([t]).avg_steps == 6


def test_plan_step_jobs_draws_reproducible_distinct_steps_per_task():
    env = StairsEnv()
    experts = {t: expert_trajectory(env, t, "train") for t in ("s5", "s3", "s1")}
    jobs = plan_step_jobs(experts, 2, seed=0)
    assert [j.task_id for j in jobs] == ["s5", "s5", "s3", "s3", "s1"]  # s1 has one step: K >= N plays all
    steps = {t: [j.prefix_steps + 1 for j in jobs if j.task_id == t] for t in experts}
    assert all(s == sorted(set(s)) and all(1 <= x <= int(t[1:]) for x in s) for t, s in steps.items())
    assert plan_step_jobs(experts, 2, seed=0) == jobs
    assert plan_step_jobs({"s3": experts["s3"]}, 2, seed=0) == [j for j in jobs if j.task_id == "s3"]
    assert {tuple(plan_step_jobs({"s5": experts["s5"]}, 2, seed=s)) for s in range(10)} != {tuple(jobs[:2])}
    assert (
        plan_step_jobs(experts, None, seed=0)
        == plan_step_jobs(experts, 5, seed=3)
        == [Job(t, 0, p) for t, n in (("s5", 5), ("s3", 3), ("s1", 1)) for p in range(n)]
    )
    assert plan_step_jobs(experts, 2, seed=0, done=set(jobs[1:])) == jobs[:1]
    assert set(jobs) < set(plan_step_jobs(experts, 3, seed=0))  # more steps per task extend the fewer
    # Samples per step, and a step-wise episode from step 1 is not the ordinary episode of its task.
    assert plan_step_jobs({"s1": experts["s1"]}, 1, seed=0, samples_per_task=2) == [Job("s1", 0, 0), Job("s1", 1, 0)]
    assert Job("s1", 0, 0) != Job("s1")
    # An episode limit of 3 steps: only t <= 3 (prefix <= 2) is drawn, still K per task where K fit,
    # and a draw within the limit is the unlimited draw.
    limited = plan_step_jobs(experts, 2, seed=0, max_steps=3)
    assert all(j.prefix_steps <= 2 for j in limited) and len([j for j in limited if j.task_id == "s5"]) == 2
    assert [j for j in limited if j.task_id != "s5"] == [j for j in jobs if j.task_id != "s5"]
    assert plan_step_jobs(experts, None, seed=0, max_steps=2) == [
        Job(t, 0, p) for t in ("s5", "s3") for p in (0, 1)
    ] + [Job("s1", 0, 0)]


def test_index_experts_names_the_row_that_cannot_be_replayed(tmp_path):
    env = StairsEnv()
    experts = [expert_trajectory(env, t, "train") for t in ("s2", "s3")]
    experts[1].messages[5]["content"] = "Thought: I just climb."
    assert list(index_experts(experts[:1])) == ["s2"]
    with pytest.raises(DataError) as e:
        index_experts(experts, path=tmp_path / "expert.jsonl")
    assert str(e.value) == (
        f"{tmp_path / 'expert.jsonl'}, row 1 (id 's3'), field 'messages[5].content': an expert "
        "turn without an Action: line cannot be replayed"
    )


# ------------------------------------------------------------------- TextWorldExpress, tiny model


@pytest.fixture(scope="module")
def twx():
    from etokit.envs.registry import make

    envs = [make("textworld-express") for _ in range(2)]
    tasks = envs[0].task_ids("train")[:2]
    experts = {t: expert_trajectory(envs[0], t, "train") for t in tasks}
    assert all(e.reward == 1.0 and expert_steps(e) >= 5 for e in experts.values())
    yield SimpleNamespace(envs=envs, tasks=tasks, experts=experts)
    for env in envs:
        env.close()


def test_step_one_is_the_ordinary_greedy_episode(policy, twx):
    gen = Generator(policy.model, policy.tokenizer, ExploreConfig(max_new_tokens=4, max_steps=2))
    ordinary = sorted(run_episodes(gen, twx.envs, [Job(t) for t in twx.tasks], split="train"), key=lambda t: t.task_id)
    step_one = sorted(
        run_episodes(gen, twx.envs, [Job(t, 0, 0) for t in twx.tasks], split="train", experts=twx.experts),
        key=lambda t: t.task_id,
    )
    for a, b in zip(ordinary, step_one):
        assert b.extra.pop("step_wise") == {"prefix_steps": 0, "expert_steps": expert_steps(twx.experts[a.task_id])}
        assert a.to_row() == b.to_row()
    assert len({m["content"] for t in ordinary for m in t.messages[3::2]}) > 2  # real, varied replies


def test_the_environment_is_in_the_experts_state_after_the_prefix(twx):
    """The agent's first action after the prefix gets what a fresh replay of the expert's actions
    and that action gets: the environment itself was stepped, not only the conversation."""
    task = twx.tasks[0]
    expert = twx.experts[task]
    p = expert_steps(expert) - 2
    gen = ScriptedGenerator(lambda m: "Thought: What do I hold?\nAction: inventory", max_steps=p + 2)
    (t,) = run_episodes(gen, twx.envs[:1], [Job(task, 0, p)], split="train", experts=twx.experts)
    assert t.messages[: 3 + 2 * p] == expert.messages[: 3 + 2 * p] and t.num_steps == p + 2
    env = twx.envs[1]
    actions = env.expert(task)
    env.reset(task)
    before = env.step("inventory")
    env.reset(task)
    for action in actions[:p]:
        env.step(action)
    after = env.step("inventory")
    assert after.observation != before.observation  # the prefix changed what the agent holds
    assert t.messages[3 + 2 * p + 1] == {"role": "user", "content": f"Observation: {after.observation}"}
    assert t.reward == after.reward > 0


def test_explore_cli_step_wise_resume_and_step_pairs(policy, twx, tmp_path):
    expert_file, out = tmp_path / "expert.jsonl", tmp_path / "step.jsonl"
    write_jsonl(expert_file, twx.experts.values())
    # Seed 9 draws late steps (t = 8 or 9 of 11 and 13): long prefixes, and the episodes stay
    # short with --max-steps 2 past the last prefix (the tiny model is slow on a busy CPU).
    max_steps = max(j.prefix_steps for j in plan_step_jobs(twx.experts, 2, seed=9)) + 2
    args = [
        "explore",
        "--model",
        str(policy.path),
        "--env",
        "textworld-express",
        "--step-wise-expert",
        str(expert_file),
        "--max-new-tokens",
        "3",
        "--max-steps",
        str(max_steps),
        "--batch-size",
        "2",
        "--seed",
        "9",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--steps-per-task", "1"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out, "trajectory")
    wanted = plan_step_jobs(twx.experts, 1, seed=9)
    assert sorted(map(job_of, rows), key=wanted.index) == wanted and len(wanted) == 2
    for t in rows:
        expert, p = twx.experts[t.task_id], t.extra["step_wise"]["prefix_steps"]
        # The first 2(t-1) turns after the task are the expert's, its observation after step t-1 included.
        assert t.messages[: 3 + 2 * p] == expert.messages[: 3 + 2 * p]
        assert t.messages[3 + 2 * p]["role"] == "assistant" and p < t.num_steps <= max_steps
        assert t.source == "explore" and t.seed == 9 and t.extra["step_wise"]["expert_steps"] == expert_steps(expert)
    # Resuming plays only what is missing: nothing, then the second step of each task.
    again = runner.invoke(app, [*args, "--steps-per-task", "1"])
    assert again.exit_code == 0 and "0 step-wise episodes written, 2 already in" in " ".join(again.output.split())
    more = runner.invoke(app, [*args, "--steps-per-task", "2"])
    assert more.exit_code == 0 and "2 step-wise episodes written, 2 already in" in " ".join(more.output.split())
    rows = read_jsonl(out, "trajectory")
    assert sorted(map(job_of, rows), key=str) == sorted(plan_step_jobs(twx.experts, 2, seed=9), key=str)

    pairs_file = tmp_path / "pairs.jsonl"
    result = runner.invoke(
        app,
        [
            "build-pairs",
            "--mode",
            "step",
            "--expert",
            str(expert_file),
            "--explore",
            str(out),
            "--out",
            str(pairs_file),
        ],
    )
    assert result.exit_code == 0, result.output
    pairs = read_jsonl(pairs_file, "pair")
    assert len(pairs) == sum(r.reward < 1.0 for r in rows) >= 3  # junk replies lose to the expert
    for pair in pairs:
        expert, p = twx.experts[pair.task_id], pair.extra["prefix_steps"]
        assert pair.mode == "step" and pair.outcome == "lose"
        assert pair.prompt == expert.messages[: 3 + 2 * p] and pair.chosen == expert.messages[3 + 2 * p :]
        assert pair.rejected[0]["role"] == "assistant" and pair.rejected[0] != pair.chosen[0]


def test_explore_cli_step_wise_user_errors(policy, twx, tmp_path):
    expert_file, bad, out = tmp_path / "expert.jsonl", tmp_path / "bad.jsonl", tmp_path / "x.jsonl"
    experts = list(twx.experts.values())
    write_jsonl(expert_file, experts)
    broken = Trajectory(**{**experts[1].__dict__, "messages": [dict(m) for m in experts[1].messages]})
    broken.messages[3]["content"] = "Thought: no action here."
    write_jsonl(bad, [experts[0], broken])
    base = [
        "explore",
        "--model",
        str(policy.path),
        "--env",
        "textworld-express",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    for args, message in [
        (["--steps-per-task", "2"], "--steps-per-task needs --step-wise-expert"),
        (["--step-wise-expert", str(expert_file), "--steps-per-task", "0"], "--steps-per-task"),
        (["--step-wise-expert", str(bad)], f"{bad}, row 1 (id '{twx.tasks[1]}'), field 'messages[3].content'"),
        (
            ["--step-wise-expert", str(expert_file), "--env", "webshop"],
            "env is 'textworld-express', expected 'webshop'",
        ),
        (["--step-wise-expert", str(expert_file), "--task-ids", "5"], "--task-ids: 5 has no expert trajectory"),
        (["--step-wise-expert", str(expert_file), "--split", "test-seen"], "none of its tasks is in"),
    ]:
        result = runner.invoke(app, [*base, *args])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and message in text and "Traceback" not in text, result.output
    assert not out.exists() or not out.read_text()
