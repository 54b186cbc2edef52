"""The batched exploration engine and `etokit explore`.

Two kinds of policy: a scripted generator (known replies, so episode logic is checked exactly)
and a tiny random Llama (real tokenizer, chat template, left padding and generate; its replies
are junk, which the engine must still record and terminate on).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from etokit.agent.protocol import INVALID_FORMAT_OBS, load_instruction
from tests.factories import CounterEnv, ScriptedGenerator, counter_script as _script
from etokit.cli import app
from etokit.data import read_jsonl
from etokit.rollout.episodes import EMPTY_REPLY, run_episodes
from etokit.rollout.generator import ExploreConfig, Generator, cut_at_stop
from etokit.rollout.jobs import Job, merge_shards, plan_jobs, shard

runner = CliRunner()


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shops():
    from etokit.envs.registry import make

    return [make("webshop") for _ in range(4)]


# ------------------------------------------------------------------------------ episode logic


def test_episodes_record_invalid_empty_and_winning_replies():
    envs = [CounterEnv() for _ in range(3)]
    gen = ScriptedGenerator(_script, icl=True)
    jobs = [Job(f"t{i}") for i in range(10)]
    out = {t.task_id: t for t in run_episodes(gen, envs, jobs, split="train", model_name="m", model_revision="r")}
    assert sorted(out) == sorted(j.task_id for j in jobs)
    task_turn = "Your task is to say t4.\nYou are in a room."
    win, empty = out["t4"], out["t3"]
    # The 1-shot example was in the prompt but is not recorded.
    assert [m["content"] for m in win.messages[:3]] == [load_instruction("textworld-express"), "OK", task_turn]
    assert win.messages[3:] == [
        {"role": "assistant", "content": "I am thinking."},
        {"role": "user", "content": f"Observation: {INVALID_FORMAT_OBS}"},
        {"role": "assistant", "content": "Thought: I know it.\nAction: say t4\nObservation: fake"},
    ]
    assert (win.reward, win.success, win.num_steps, win.extra["invalid_actions"]) == (1.0, True, 2, 1)
    assert (win.source, win.model, win.model_revision, win.seed, win.split) == ("explore", "m", "r", 0, "train")
    assert empty.num_steps == CounterEnv.max_steps and empty.reward == 0.0 and not empty.success
    assert empty.extra["empty_replies"] == [0, 1, 2, 3] and empty.extra["invalid_actions"] == 4
    assert [m["content"] for m in empty.messages[3::2]] == [EMPTY_REPLY] * 4
    assert empty.messages[-1]["role"] == "assistant"
    # One generate row per agent step, never more rows than slots, and the freed slots refilled.
    assert sum(gen.calls) == sum(t.num_steps for t in out.values())
    assert max(gen.calls) == 3 and len(gen.calls) < sum(gen.calls) / 2


def test_max_steps_option_overrides_the_env_limit():
    gen = ScriptedGenerator(lambda m: "", max_steps=2)
    (t,) = run_episodes(gen, [CounterEnv()], [Job("t1")], split="train")
    assert t.num_steps == 2 and len(t.messages) == 3 + 3


def test_a_failing_env_ends_the_episode_as_an_error():
    class Broken(CounterEnv):
        def step(self, action):
            raise RuntimeError("simulator died\nsegfault")

    (t,) = run_episodes(ScriptedGenerator(lambda m: "Action: go"), [Broken()], [Job("t0")], split="train")
    assert t.extra["error"] == "RuntimeError: segfault" and t.extra["stopped"] == "error"
    assert t.messages[-1] == {"role": "assistant", "content": "Action: go"}


def test_stop_strings_cut_the_reply():
    assert cut_at_stop("Thought: a\nAction: b\nObservation: c\nTask: d") == "Thought: a\nAction: b"
    assert cut_at_stop("Action: b") == "Action: b"


def test_plan_jobs_skips_recorded_episodes():
    assert plan_jobs(["a", "b"], 2, {Job("a", 1), Job("b", 0)}) == [Job("a", 0), Job("b", 1)]


# ---------------------------------------------------------------------------- real tiny model


def _play(policy, envs, task_ids, **config):
    gen = Generator(policy.model, policy.tokenizer, ExploreConfig(**config))
    return sorted(run_episodes(gen, envs, [Job(t) for t in task_ids], split="train"), key=lambda t: t.task_id)


def test_batched_exploration_equals_one_episode_at_a_time(policy, shops):
    """Left-padded batches of different prompts give the same greedy trajectories as batch size 1
    (fp32; checked on this model: the replies are long junk strings, so any change in a logit
    argmax anywhere would show)."""
    tasks = shops[0].task_ids("train")[:5]
    config = dict(icl=False, max_new_tokens=10, max_steps=3)
    batched = _play(policy, shops[:4], tasks, **config)
    sequential = _play(policy, shops[:1], tasks, **config)
    assert [t.to_row() for t in batched] == [t.to_row() for t in sequential]
    replies = {m["content"] for t in batched for m in t.messages[3::2]}
    assert len(replies) > 8  # the replies differ across tasks and steps: the comparison has teeth
    for t in batched:
        assert t.num_steps == 3 and t.messages[-1]["role"] == "assistant"
        assert (
            t.extra["invalid_actions"]
            == sum(m["content"] == f"Observation: {INVALID_FORMAT_OBS}" for m in t.messages) + 1
        )


@pytest.mark.parametrize(
    "icl, attention, kv_cache",
    [(False, "sdpa", "slots"), (True, "sdpa", "slots"), (True, "sdpa", "in-place"), (False, "eager", "in-place")],
)
def test_kv_reuse_equals_reencoding_every_step(policy, shops, icl, attention, kv_cache):
    """Keeping each episode's KV cache between steps (and borrowing the shared instruction / 1-shot
    prefix for a new episode) gives the greedy trajectories of re-encoding the whole conversation
    with model.generate at every step. Three slots for seven tasks: episodes start mid-run. The
    slot engine runs its own attention; the in-place engine gives SDPA a boolean mask and eager
    attention an additive one."""
    tasks = shops[0].task_ids("train")[20:27]
    config = dict(icl=icl, max_new_tokens=12, max_steps=4)
    policy.model.set_attn_implementation(attention)
    try:
        gen = Generator(policy.model, policy.tokenizer, ExploreConfig(kv_cache=kv_cache, **config))
        assert type(gen.decoder).__name__ == ("SlotDecoder" if kv_cache == "slots" else "KVReuseDecoder")
        if kv_cache == "in-place":
            assert gen.decoder.bool_mask == (attention == "sdpa")
        kept = sorted(run_episodes(gen, shops[:3], [Job(t) for t in tasks], split="train"), key=lambda t: t.task_id)
        full = _play(policy, shops[:3], tasks, kv_reuse=False, **config)
    finally:
        policy.model.set_attn_implementation("sdpa")
    assert [t.to_row() for t in kept] == [t.to_row() for t in full]
    # The comparison has teeth: most prompt tokens came from the kept cache, not a prefill.
    assert gen.decoder.reused > 2 * gen.decoder.prefilled
    assert len({m["content"] for t in kept for m in t.messages[3::2]}) > 8


def test_kv_reuse_sampling_is_seeded(policy, shops):
    tasks = shops[0].task_ids("train")[:3]
    config = dict(icl=False, max_new_tokens=8, max_steps=2, temperature=1.0, top_p=0.9)
    a, b = (_play(policy, shops[:3], tasks, seed=3, **config) for _ in range(2))
    c = _play(policy, shops[:3], tasks, seed=4, **config)
    assert [t.to_row() for t in a] == [t.to_row() for t in b]
    assert [t.messages for t in a] != [t.messages for t in c]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_in_place_cache_equals_the_concatenated_cache(policy, attention):
    """The preallocated cache written in place (etokit/rollout/slot_cache.py) gives the token ids of
    transformers' DynamicCache grown by concatenation, step after step: rows of different lengths,
    a row that keeps its episode's cache, new episodes that borrow the shared prefix (refilled
    slots, started mid-run) and rows that stop at different tokens and leave the batch."""
    from etokit.rollout.kv_reuse import KVReuseDecoder

    tok = policy.tokenizer
    base = tok(load_instruction("webshop"), add_special_tokens=False)["input_ids"][:120]
    words = ["shoes", "a red lamp for the desk under 30 dollars", "blue", "tea kettle, steel", "socks"]
    steps = [[("a", 0), ("b", 1), ("c", 2)], [("a", 3), ("d", 4), ("c", 0)], [("d", 2), ("e", 1), ("a", 4)]]
    policy.model.set_attn_implementation(attention)
    try:
        runs = {}
        for in_place in (True, False):
            decoder = KVReuseDecoder(
                policy.model,
                pad_id=tok.pad_token_id,
                eos_ids=[tok.eos_token_id],
                max_new_tokens=14,
                stopped=lambda ids, checked: ids[-1] % 7 == 0,
                in_place=in_place,
            )
            convo, out = {}, []
            for step in steps:
                for key, w in step:  # an episode's prompt grows by its last reply and a new turn
                    convo[key] = convo.get(key, base) + tok(words[w], add_special_tokens=False)["input_ids"]
                replies = decoder.generate([convo[k] for k, _ in step], [k for k, _ in step])
                for (key, _), reply in zip(step, replies):
                    convo[key] = convo[key] + reply
                out.append(replies)
            runs[in_place] = out, decoder
    finally:
        policy.model.set_attn_implementation("sdpa")
    (slots, decoder), (concatenated, _) = runs[True], runs[False]
    assert slots == concatenated
    # The comparison has teeth: replies stop at different lengths and most prompt tokens were reused.
    assert len({len(r) for replies in slots for r in replies}) > 2
    assert decoder.reused > decoder.prefilled


def test_sampled_episodes_do_not_depend_on_the_batch(policy):
    """Each reply samples from a generator seeded by (run seed, task, sample, step): the same
    episodes whether played alone or with seven others, in any order (issue 18, item 5)."""
    from etokit.envs.registry import make

    envs = [make("webshop") for _ in range(8)]
    tasks = envs[0].task_ids("train")[:8]
    config = ExploreConfig(icl=False, max_new_tokens=8, max_steps=2, temperature=1.0, seed=5)
    jobs = [Job(t, s) for t in tasks[:4] for s in (0, 1)]

    def play(n_envs, order):
        gen = Generator(policy.model, policy.tokenizer, config)
        got = run_episodes(gen, envs[:n_envs], [jobs[i] for i in order], split="train")
        return [t.to_row() for t in sorted(got, key=lambda t: (t.task_id, t.extra["sample"]))]

    alone = play(1, range(8))
    assert play(8, range(8)) == alone
    assert play(3, reversed(range(8))) == alone
    # Samples 0 and 1 of a task differ: the seed is the reply's, not the run's.
    assert alone[0]["messages"] != alone[1]["messages"]


def test_kv_reuse_falls_back_where_the_cache_is_not_one_tensor_per_layer(policy):
    from types import SimpleNamespace as NS

    from etokit.rollout.kv_reuse import kv_reuse_unsupported

    assert kv_reuse_unsupported(policy.model) is None
    assert "sliding" in kv_reuse_unsupported(NS(config=NS(sliding_window=4096)))
    assert kv_reuse_unsupported(NS(config=NS(sliding_window=4096, use_sliding_window=False))) is None
    assert "layers" in kv_reuse_unsupported(NS(config=NS(layer_types=["full_attention", "sliding_attention"])))
    assert "flash" in kv_reuse_unsupported(NS(config=NS(_attn_implementation="flash_attention_2")))
    gen = Generator(policy.model, policy.tokenizer, ExploreConfig(kv_reuse=False))
    assert gen.decoder is None


def test_sharded_across_two_ranks_equals_one_process(policy, shops):
    """Simulated ranks: accelerate's own split_between_processes on a two-process state, each
    shard played separately, merged; equal to a single-process run (greedy)."""
    from accelerate import PartialState

    tasks = shops[0].task_ids("train")[10:15]
    jobs = [Job(t) for t in tasks]
    config = dict(icl=False, max_new_tokens=8, max_steps=2)
    shards = []
    for rank in range(2):
        state = SimpleNamespace(
            num_processes=2,
            process_index=rank,
            split_between_processes=lambda items, apply_padding=False, rank=rank: PartialState.split_between_processes(
                SimpleNamespace(num_processes=2, process_index=rank), items, apply_padding
            ),
        )
        mine = shard(jobs, state)
        assert len(mine) == (3 if rank == 0 else 2)
        shards.append(_play(policy, shops[:2], [j.task_id for j in mine], **config))
    single = _play(policy, shops[:3], tasks, **config)
    assert [t.to_row() for t in merge_shards(jobs, shards)] == [t.to_row() for t in single]
    # A padded split replays the last job on the short rank: the merge keeps it once.
    assert [t.task_id for t in merge_shards(jobs, [shards[0], shards[1] + shards[1][-1:]])] == tasks


# -------------------------------------------------------------------------------------- CLI


_FAST = ["--env", "webshop", "--no-icl", "--max-steps", "2", "--max-new-tokens", "8", "--batch-size", "2"]


def test_explore_cli_writes_and_resumes(policy, tmp_path):
    out = tmp_path / "explore.jsonl"
    first = runner.invoke(app, ["explore", "--model", str(policy.path), *_FAST, "--limit", "3", "--out", str(out)])
    assert first.exit_code == 0, first.output
    rows = read_jsonl(out, "trajectory")
    assert len(rows) == 3 and len({r.task_id for r in rows}) == 3
    for r in rows:
        assert r.source == "explore" and r.model == str(policy.path) and r.model_revision.startswith("local:")
        assert r.num_steps == 2 and r.seed == 0 and r.env == "webshop" and r.split == "train"
    second = runner.invoke(app, ["explore", "--model", str(policy.path), *_FAST, "--limit", "5", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "2 episodes written, 3 already in" in " ".join(second.output.split())
    assert [r.to_row() for r in read_jsonl(out, "trajectory")[:3]] == [r.to_row() for r in rows]
    assert len(read_jsonl(out, "trajectory")) == 5


def test_explore_cli_samples_per_task(policy, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = runner.invoke(
        app,
        [
            "explore",
            "--model",
            str(policy.path),
            *_FAST,
            "--task-ids",
            "200,201",
            "--samples-per-task",
            "2",
            "--temperature",
            "1.0",
            "--seed",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out, "trajectory")
    assert sorted((r.task_id, r.extra["sample"], r.seed) for r in rows) == [
        ("200", 0, 5),
        ("200", 1, 6),
        ("201", 0, 5),
        ("201", 1, 6),
    ]
    assert all(r.extra["temperature"] == 1.0 for r in rows)


def test_explore_cli_from_a_hub_revision_records_the_commit(policy, tmp_path, hub, repo_name):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_name)
    sha = api.upload_folder(folder_path=str(policy.path), repo_id=repo_name).oid
    api.create_tag(repo_name, tag="iter-1")
    out = tmp_path / "hub.jsonl"
    result = runner.invoke(
        app, ["explore", "--model", f"{repo_name}@iter-1", *_FAST, "--limit", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(out, "trajectory")
    assert row.model == repo_name and row.model_revision == sha


def test_explore_cli_user_errors(policy, tmp_path):
    out = tmp_path / "x.jsonl"
    for args, message in [
        (["--task-ids", "nope"], "--task-ids: nope"),
        (["--samples-per-task", "2"], "--temperature"),
        (["--split", "dev"], "--split 'dev'"),
    ]:
        result = runner.invoke(app, ["explore", "--model", str(policy.path), *_FAST, *args, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(app, ["explore", "--model", str(tmp_path / "missing"), *_FAST, "--out", str(out)])
    assert result.exit_code == 2 and "missing" in result.output, result.output
    assert not out.exists() or not out.read_text()
