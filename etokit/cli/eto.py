"""`etokit explore`, `etokit build-pairs`, `etokit eval`, `etokit compare`: ETO's exploration phase,
its contrastive pairs, the evaluation of a policy on the test splits, and the paired comparison of
two evaluations of the same tasks."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from etokit.cli._console import console
from rich.table import Table

from etokit.cli._errors import user_errors
from etokit.cli._options import HUB_SOURCE_HELP, ExpertRewardOpt, check_output, env_name, finite_float
from etokit.errors import EtokitError
from etokit.rollout.generator import KV_CACHES


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="Policy: a local folder or a Hub repo, optionally REPO@REVISION (branch, tag or commit).",
        show_default=False,
    ),
]
EnvNameOpt = Annotated[
    str,
    typer.Option(
        "--env", help="Environment: webshop, scienceworld, alfworld or textworld-express.", show_default=False
    ),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N tasks of the split.")]
TaskIdsOpt = Annotated[
    Optional[str], typer.Option("--task-ids", help="Comma-separated task ids to play instead of the whole split.")
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Episodes played together: one generate call per step for all of them (and one environment each).",
    ),
]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Cap on the tokens of one reply.")]
MaxStepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-steps",
        min=1,
        help="Agent turns per episode (a step-wise episode's replayed "
        "expert steps count too). Default: the environment's limit.",
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16.")
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the model (auto_map). Off by default: only opt in for a repo you trust.",
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="transformers (batched, each episode's KV cache kept across steps) or vllm (GPU hosts, extra "
        "`vllm`; one process).",
    ),
]
NoKvReuseOpt = Annotated[
    bool,
    typer.Option(
        "--no-kv-reuse",
        help="transformers engine: encode the whole conversation again at every step (same replies, "
        "slower; for models whose cache cannot be kept).",
    ),
]


# ExploreConfig.kv_cache's values, from the one list of them (etokit/rollout/generator.py).
KvCache = Enum("KvCache", {name.replace("-", "_"): name for name in KV_CACHES}, type=str)


KvCacheOpt = Annotated[
    KvCache,
    typer.Option(
        "--kv-cache",
        help="transformers engine with KV reuse: how each episode's cache is held. slots (default): a slot per "
        "episode for its whole life, its replies' K/V kept, the shared prompt prefix read once for all episodes "
        "(CPU; elsewhere in-place runs); in-place: a left-padded batch cache rebuilt each step, written in place; "
        "concat: transformers' DynamicCache grown by concatenation (the reference; slowest).",
    ),
]
NoIclOpt = Annotated[
    bool,
    typer.Option(
        "--no-icl",
        help="Leave the 1-shot example out of the prompt (the paper keeps it at exploration and evaluation).",
    ),
]

_EXPLORE_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit explore --model ./sft --env textworld-express --split train --out explore_iter1.jsonl
  $ etokit explore --model me/eto-agent@iter-1 --env webshop --limit 500 --batch-size 32 --out explore.jsonl
  $ etokit explore --model ./sft --env webshop --temperature 0.7 --samples-per-task 4 --out samples.jsonl
  $ etokit explore --model ./sft --env webshop --step-wise-expert expert.jsonl --steps-per-task 2 --out step.jsonl
  $ accelerate launch --num_processes 2 -m etokit explore --model ./sft --env webshop --out explore.jsonl
"""

_PAIRS_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit build-pairs --expert expert.jsonl --explore explore_iter1.jsonl --out pairs_iter1.jsonl --iteration 1
  $ etokit build-pairs --expert webshop_sft.json --env webshop --explore explore.jsonl --out webshop_pm.json
  $ etokit build-pairs --mode step --expert expert.jsonl --explore step.jsonl --out step_pairs.jsonl
  $ etokit build-pairs --mode mixture --expert expert.jsonl --explore both.jsonl --out mixture_pairs.jsonl
  $ etokit build-pairs --mode self-play --explore samples.jsonl --out pairs.jsonl
"""

_EVAL_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit eval --model ./eto-iter1 --env textworld-express --split test-seen --limit 100
  $ etokit eval --model me/eto-agent@iter-2 --env webshop --split test-seen --out eval_iter2.json
  $ etokit eval --model ./bc --env webshop --split test-seen --task-ids 3,17,42 --out eval_bc.json
  $ etokit eval --model ./eto-iter1 --panel eval_bc.json --out eval_iter1.json   [dim]# the same tasks again[/dim]
"""

_COMPARE_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit eval --model ./bc --env webshop --split test-seen --limit 200 --out eval_bc.json
  $ etokit eval --model ./eto-iter1 --env webshop --split test-seen --limit 200 --out eval_iter1.json
  $ etokit compare eval_bc.json eval_iter1.json
  $ etokit compare --run runs/twx bc iter-2                [dim]# both test splits of an `etokit run`[/dim]
  $ etokit compare --run runs/twx iter-1 iter-2 --split test-unseen --out iter2_vs_iter1.json
"""


# ------------------------------------------------------------------------------------ shared


InstructionFromOpt = Annotated[
    Optional[str],
    typer.Option(
        "--instruction-from",
        help="Expert data whose instruction turn the prompt uses, the one a policy cloned on it was "
        f"trained with: {HUB_SOURCE_HELP}. Default: etokit's own instruction for --env (with "
        "--step-wise-expert: that data's).",
        show_default=False,
    ),
]


def _instruction_from(source: str | None, env: str, experts=None) -> str | None:
    """The instruction turn of expert data (None: etokit's own), from --instruction-from or else
    from the step-wise expert trajectories already loaded."""
    from etokit.agent.protocol import instruction_of

    if source is not None:
        from etokit.data.sources import load_source

        # Only the first turn is read: a reward stated here would never be used.
        experts = load_source(source, "trajectory", env=env, expert_reward=1.0, option="--instruction-from").records
    return instruction_of(list(experts), env) if experts else None


def _resolve_model(model: str) -> tuple[str, str | None, str]:
    """``PATH_OR_REPO[@REV]`` -> (name, revision asked for, what it resolves to: commit sha or local fingerprint)."""
    from etokit.rollout.generator import model_revision, split_model_ref

    name, revision = split_model_ref(model)
    return name, revision, model_revision(name, revision)


def _load_policy(model: str, dtype: str, trust_remote_code: bool = False):
    from etokit.train.distributed import process_state
    from etokit.train.model_loading import DTYPES, load_model_and_tokenizer

    if dtype not in DTYPES:  # before the model is resolved on the Hub
        raise EtokitError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    name, revision, sha = _resolve_model(model)
    with console.status(f"Loading {model}..."):
        policy, tokenizer = load_model_and_tokenizer(
            name,
            revision=sha if not sha.startswith("local:") else revision,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    policy.to(process_state().device).eval()
    return name, sha, policy, tokenizer


def _load_engine(model: str, dtype: str, trust_remote_code: bool, engine: str):
    """(name, revision sha, ExploreConfig -> generator) for ``--engine``; checked before loading."""
    from etokit.rollout.generator import Generator

    if engine == "transformers":
        name, sha, policy, tokenizer = _load_policy(model, dtype, trust_remote_code)
        return name, sha, lambda config: Generator(policy, tokenizer, config)
    if engine != "vllm":
        raise EtokitError(f"--engine {engine!r}: expected transformers or vllm")
    import importlib.util

    from etokit.train.distributed import process_state

    if importlib.util.find_spec("vllm") is None:
        raise EtokitError("--engine vllm needs vLLM (a CUDA host): pip install 'etokit[vllm]'")
    if process_state().num_processes > 1:
        raise EtokitError(
            "--engine vllm runs in one process (vLLM spreads a model over GPUs itself); "
            "run it without accelerate launch"
        )
    from transformers import AutoTokenizer

    from etokit.rollout.vllm_engine import VLLMGenerator

    name, _, sha = _resolve_model(model)
    revision = None if sha.startswith("local:") else sha
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    return (
        name,
        sha,
        lambda config: VLLMGenerator(
            name, tokenizer, config, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
        ),
    )


def _check_env_split(env: str, split: str) -> None:
    """The environment and split named on the command line, checked before a model loads."""
    from etokit.data.names import check_env_name
    from etokit.envs.base import SPLITS

    check_env_name(env)
    if split not in SPLITS:
        raise EtokitError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")


def _task_ids(envs, env: str, split: str, limit: int | None, task_ids: str | list[str] | None) -> list[str]:
    from etokit.envs.base import SPLITS

    if split not in SPLITS:
        raise EtokitError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    available = envs[0].task_ids(split)
    if task_ids is not None:
        wanted = [t.strip() for t in task_ids.split(",") if t.strip()] if isinstance(task_ids, str) else task_ids
        known = set(available)
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise EtokitError(f"--task-ids: {', '.join(unknown[:5])} not in {env}/{split}")
        available = list(dict.fromkeys(wanted))
    return available[:limit] if limit else available


def _metrics_table(title: str, result) -> Table:
    from etokit.evaluate import format_ci

    # Intervals: percentile bootstrap over the tasks (etokit.stats), 10k resamples, seed 0.
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("episodes", str(result.episodes))
    table.add_row("avg reward (x100) [95% CI]", format_ci(result.avg_reward_ci, result.avg_reward))
    table.add_row("success rate [95% CI]", format_ci(result.success_rate_ci, result.success_rate, percent=True))
    table.add_row("avg steps", f"{result.avg_steps:.2f}")
    table.add_row("invalid-action rate", f"{result.invalid_action_rate:.1%}")
    if result.errors:
        table.add_row("env errors", f"[red]{result.errors}[/]")
    return table


# ----------------------------------------------------------------------------------- explore


@user_errors
def explore(
    model: ModelOpt,
    env: EnvNameOpt,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="JSONL file the trajectories are appended to (resumed when it exists).",
            show_default=False,
        ),
    ],
    split: Annotated[str, typer.Option("--split", help="Task split: train, test-seen or test-unseen.")] = "train",
    limit: LimitOpt = None,
    task_ids: TaskIdsOpt = None,
    samples_per_task: Annotated[
        int,
        typer.Option(
            "--samples-per-task", "-n", min=1, help="Episodes per task (Best-of-N / self-play; use with --temperature)."
        ),
    ] = 1,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, callback=finite_float, help="0 = greedy (the paper).")
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p", min=0.0, max=1.0, callback=finite_float, help="Nucleus sampling when --temperature > 0."
        ),
    ] = 1.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Sampling seed (recorded per trajectory as seed + sample "
            "index; samples also depend on --batch-size); also picks the "
            "steps of --steps-per-task.",
        ),
    ] = 0,
    step_wise_expert: Annotated[
        Optional[str],
        typer.Option(
            "--step-wise-expert",
            help="Step-wise exploration (paper App. B): expert trajectories of this env, "
            f"{HUB_SOURCE_HELP}. Each "
            "episode replays a task's expert steps 1..t-1 in the environment and the "
            "conversation, then the policy plays from step t. Tasks without an expert are "
            "skipped.",
            show_default=False,
        ),
    ] = None,
    steps_per_task: Annotated[
        Optional[int],
        typer.Option(
            "--steps-per-task",
            min=1,
            help="With --step-wise-expert: how many distinct steps t of each task's N expert "
            "steps to play from (drawn with --seed; steps past --max-steps are not "
            "drawn). Default: all N.",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchSizeOpt = 16,
    max_new_tokens: MaxNewTokensOpt = 256,
    max_steps: MaxStepsOpt = None,
    no_icl: NoIclOpt = False,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    engine: EngineOpt = "transformers",
    no_kv_reuse: NoKvReuseOpt = False,
    expert_reward: ExpertRewardOpt = None,
    instruction_from: InstructionFromOpt = None,
    kv_cache: KvCacheOpt = KvCache.slots,
) -> None:
    """Let the policy play every task of a split and record each episode as a trajectory (ETO's
    exploration phase). Episodes are batched: one generate call per step for all live episodes.
    Re-running skips the (task, sample, step) episodes already in --out. Under `accelerate launch`
    the tasks are sharded across processes and merged into --out by the main process; --out ends in
    task order. An episode whose environment failed is printed and not written: a re-run plays it."""
    from etokit.train.distributed import process_state

    from etokit.data import read_jsonl
    from etokit.rollout.generator import ExploreConfig
    from etokit.rollout.jobs import index_experts, plan_jobs, plan_step_jobs
    from etokit.rollout.play import RichProgress, play

    if samples_per_task > 1 and temperature == 0:
        raise EtokitError("--samples-per-task > 1 needs --temperature > 0: greedy samples of a task are identical")
    if steps_per_task is not None and step_wise_expert is None:
        raise EtokitError("--steps-per-task needs --step-wise-expert (the expert whose steps are replayed)")
    _check_env_split(env, split)
    check_output(out, inputs=(Path(step_wise_expert) if step_wise_expert else None,), suffixes=(".jsonl",))
    if out.exists():
        read_jsonl(out, "trajectory")  # a wrong --out is reported before the model loads, and left as it is
    experts = None
    if step_wise_expert is not None:  # checked before the model loads
        from etokit.data.sources import load_source

        loaded = load_source(
            step_wise_expert,
            "trajectory",
            env=env,
            split=split,
            expert_reward=expert_reward,
            option="--step-wise-expert",
        )
        experts = index_experts(loaded.records, path=loaded.path)
    state = process_state()
    name, sha, make_generator = _load_engine(model, dtype, trust_remote_code, engine)
    config = ExploreConfig(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        icl=not no_icl,
        seed=seed,
        max_steps=max_steps,
        kv_reuse=not no_kv_reuse,
        instruction=_instruction_from(instruction_from, env, experts and experts.values()),
        kv_cache=kv_cache.value,
    )

    def plan(first):  # the planned order is the output's order: the split's (or --task-ids') task order
        if experts is None:
            return plan_jobs(_task_ids([first], env, split, limit, task_ids), samples_per_task)
        tasks, keyed = _step_wise_tasks([first], env, split, limit, task_ids, experts, step_wise_expert)
        return plan_step_jobs(
            {t: keyed[t] for t in tasks},
            steps_per_task,
            seed=seed,
            samples_per_task=samples_per_task,
            max_steps=max_steps or first.max_steps,
        )

    result = play(
        env,
        split,
        plan,
        make_generator(config),
        batch_size=batch_size,
        out=out,
        experts=experts,
        model_name=name,
        model_revision=sha,
        state=state,
        progress=RichProgress(console, "explore"),
    )
    if not state.is_main_process:
        return
    _print_failures(result)
    from etokit.evaluate import summarize

    written = result.episodes
    summary = summarize(written)
    console.print(
        f"[green]✓[/] {env}/{split}: {len(written)} {'step-wise ' if experts else ''}episodes written, "
        f"{result.skipped} "
        f"already in {out}, {len(result.failed)} errors; avg reward {summary.avg_reward / 100:.3f}, success rate "
        f"{summary.success_rate:.1%}, invalid actions {summary.invalid_action_rate:.1%} (model revision {sha})"
    )


def _print_failures(result) -> None:
    """Each episode whose environment failed (recorded nowhere: etokit.rollout.play)."""
    from etokit.rollout.play import describe_failure

    for t in result.failed:
        console.print(f"[red]error[/] {describe_failure(t)}")


def _step_wise_tasks(
    envs, env: str, split: str, limit: int | None, task_ids: str | None, experts: dict, path: Path
) -> tuple[list[str], dict]:
    """The tasks of the split (or --task-ids) that have an expert, in split order, and the experts
    keyed by those task ids; --limit counts those (an expert file is often a subset of the split)."""
    from etokit.rollout.jobs import experts_of_tasks

    tasks = _task_ids(envs, env, split, None, task_ids)
    experts = experts_of_tasks(experts, tasks)
    if task_ids is not None:
        missing = [t for t in tasks if t not in experts]
        if missing:
            raise EtokitError(f"--task-ids: {', '.join(missing[:5])} has no expert trajectory in {path}")
    tasks = [t for t in tasks if t in experts]
    if not tasks:
        raise EtokitError(f"--step-wise-expert {path}: none of its tasks is in {env}/{split}")
    return (tasks[:limit] if limit else tasks), experts


# ------------------------------------------------------------------------------- build-pairs


@user_errors
def build_pairs(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Pairs file: .jsonl (etokit) or .json (official ETO format). "
            "Its win/tie/lose counts go to <name>.stats.json.",
            show_default=False,
        ),
    ],
    explore: Annotated[
        Path, typer.Option("--explore", help="Explored trajectories (etokit or official format).", show_default=False)
    ],
    expert: Annotated[
        Optional[str],
        typer.Option(
            "--expert",
            help=f"Expert trajectories, the reference of trajectory, step and mixture modes: {HUB_SOURCE_HELP}.",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="trajectory (agent vs expert, the paper), step (step-wise "
            "episodes vs the expert from step t, paper App. B), mixture "
            "(both, from one file) or self-play (the agent's best vs worst "
            "sample of a task).",
        ),
    ] = "trajectory",
    iteration: Annotated[
        Optional[int], typer.Option("--iteration", min=0, help="ETO iteration K, stored on every pair.")
    ] = None,
    env: Annotated[
        Optional[str],
        typer.Option("--env", callback=env_name, help="Environment of official ETO files, which do not record it."),
    ] = None,
    expert_reward: ExpertRewardOpt = None,
    rewards: Annotated[
        str,
        typer.Option(
            "--rewards",
            help="official: score as construct_preference.py (every "
            "ScienceWorld and ALFWorld expert 1.0, an ALFWorld agent "
            "1.0 if its reward is non-zero, else 0.0); stored: compare "
            "the stored rewards (a deviation, recorded on the pairs).",
        ),
    ] = "official",
    expert_observation: Annotated[
        str,
        typer.Option(
            "--expert-observation",
            help="drop-pair: an expert side ending on an observation drops "
            "the pair, as construct_preference.py; trim: cut the "
            "observation and keep the pair (a deviation, recorded on "
            "the pairs).",
        ),
    ] = "drop-pair",
) -> None:
    """Build contrastive trajectory pairs for DPO with the official ETO rule (construct_preference.py):
    an explored trajectory worse than the expert's gives (chosen = expert, rejected = agent), a
    better one the reverse, equal scores are dropped as ties. Step mode compares step-wise episodes
    (explore --step-wise-expert) the same way, from the teacher-forced step on. Prints and stores the
    win/tie/lose counts (per mode and in total for mixture)."""
    from etokit.data import atomic_write, load_records, to_eto_rows, write_json, write_jsonl
    from etokit.pairs import EXPERT_OBSERVATION_RULES, PAIR_MODES, REWARD_RULES, PairRule, is_step_wise
    from etokit.pairs import build_pairs as make_pairs

    if mode not in PAIR_MODES:
        raise EtokitError(f"--mode {mode!r}: expected one of {', '.join(PAIR_MODES)}")
    for flag, value, allowed in (
        ("--rewards", rewards, REWARD_RULES),
        ("--expert-observation", expert_observation, EXPERT_OBSERVATION_RULES),
    ):
        if value not in allowed:
            raise EtokitError(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
    rule = PairRule(rewards=rewards, expert_observation=expert_observation)
    if mode != "self-play" and expert is None:
        raise EtokitError(f"--expert is required in {mode} mode (or use --mode self-play)")
    check_output(out, inputs=(explore, Path(expert) if expert else None), suffixes=(".jsonl", ".json"))
    explored = load_records(explore, "trajectory", env=env).records
    experts = None
    if expert is not None:
        from etokit.data.sources import load_source

        # The expert's env: --env, else the explored episodes' (an official Hub split names it too).
        experts = load_source(
            expert,
            "trajectory",
            env=env or (explored[0].env if explored else None),
            expert_reward=expert_reward,
            option="--expert",
        ).records
    step_wise = sum(map(is_step_wise, explored))
    used = {"step": step_wise, "mixture": len(explored)}.get(mode, len(explored) - step_wise)
    if not used:
        raise EtokitError(
            f"--explore {explore}: no step-wise episodes for --mode step (explore with --step-wise-expert)"
            if mode == "step"
            else f"--explore {explore}: all {len(explored)} episodes are step-wise; use --mode step or mixture"
        )
    if used < len(explored):
        kind = "ordinary" if mode == "step" else "step-wise"
        console.print(f"[dim]{len(explored) - used} {kind} episodes in {explore} are not used in {mode} mode[/]")
    pairs, stats = make_pairs(explored, experts, mode=mode, iteration=iteration, rule=rule)
    if not pairs:
        raise EtokitError(f"no pairs: {stats.to_dict()} (nothing differs in reward from its reference)")
    if out.suffix == ".json":
        write_json(out, to_eto_rows(pairs))
    else:
        write_jsonl(out, pairs)
    stats_file = out.with_suffix(".stats.json")
    with atomic_write(stats_file) as f:
        f.write((json.dumps(stats.to_dict(), indent=2) + "\n").encode())

    table = Table(title=f"{mode} pairs" + (f", iteration {iteration}" if iteration is not None else ""))
    table.add_column("outcome", style="bold")
    columns = {**stats.by_mode, "total": stats} if stats.by_mode else {"tasks" if mode != "step" else "episodes": stats}
    for name in columns:
        table.add_column(name, justify="right")
    expert_based = mode != "self-play"
    rows = [("win", "win"), ("tie (dropped)", "tie"), ("lose", "lose")] if expert_based else [("tie (dropped)", "tie")]
    rows += [("missing expert (skipped)", "missing_expert")] if expert_based else []
    rows += [("unusable (dropped)", "unusable")] if stats.unusable else []
    rows += [("pairs", "pairs")] if stats.by_mode else []
    for label, name in rows:
        table.add_row(label, *(str(getattr(s, name)) for s in columns.values()))
    console.print(table)
    console.print(
        f"[green]✓[/] {stats.pairs} pairs written to {out}; counts in {stats_file}. "
        f"Publish with: etokit push-pairs {out} --repo-id ... --ties {stats.tie}"
    )


# -------------------------------------------------------------------------------------- eval


@user_errors
def eval_(
    model: ModelOpt,
    env: Annotated[
        Optional[str],
        typer.Option(
            "--env",
            help="Environment: webshop, scienceworld, alfworld or textworld-express (or --panel).",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        Optional[str],
        typer.Option("--split", help="test-seen (default) or test-unseen (train also works).", show_default=False),
    ] = None,
    limit: LimitOpt = None,
    task_ids: TaskIdsOpt = None,
    panel_file: Annotated[
        Optional[Path],
        typer.Option(
            "--panel",
            help="Play the task panel of an `etokit eval --out` file again: its env, split and task ids, in order.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="JSON file: the metrics with their 95% intervals, "
            "the task panel (env, split, task ids) and each "
            "task's result; the input of `etokit compare`.",
        ),
    ] = None,
    trajectories: Annotated[
        Optional[Path], typer.Option("--trajectories", help="Also write the evaluation episodes to this JSONL file.")
    ] = None,
    batch_size: BatchSizeOpt = 16,
    max_new_tokens: MaxNewTokensOpt = 256,
    max_steps: MaxStepsOpt = None,
    no_icl: NoIclOpt = False,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    engine: EngineOpt = "transformers",
    no_kv_reuse: NoKvReuseOpt = False,
    instruction_from: InstructionFromOpt = None,
    kv_cache: KvCacheOpt = KvCache.slots,
) -> None:
    """Evaluate a policy on a test split: greedy decoding with the 1-shot prompt (as the paper),
    reporting average reward x100, success rate, average steps and invalid-action rate. An episode
    whose environment failed is printed, kept in --out with its error (out of the averages) and
    left out of --trajectories."""
    from etokit.train.distributed import process_state

    from etokit.data import atomic_write, write_jsonl
    from etokit.evaluate import eval_report, summarize
    from etokit.rollout.generator import ExploreConfig
    from etokit.rollout.jobs import Job
    from etokit.rollout.play import RichProgress, play

    for path, suffix in ((out, ".json"), (trajectories, ".jsonl")):
        if path is not None and path.suffix != suffix:
            raise EtokitError(f"{path}: expected a {suffix} file")
    wanted: str | list[str] | None = task_ids
    if panel_file is not None:
        from etokit.evaluate import load_panel

        recorded = load_panel(panel_file)
        for option, given, value in (("--env", env, recorded["env"]), ("--split", split, recorded["split"])):
            if given is not None and given != value:
                raise EtokitError(f"{option} {given}: --panel {panel_file} is a panel of {value}")
        if limit is not None or task_ids is not None:
            raise EtokitError(f"--panel {panel_file} fixes the tasks: leave out --limit and --task-ids")
        env, split, wanted = recorded["env"], recorded["split"], recorded["task_ids"]
    if env is None:
        raise EtokitError("--env is required (or --panel FILE of an earlier evaluation)")
    split = split or "test-seen"
    _check_env_split(env, split)
    state = process_state()
    name, sha, make_generator = _load_engine(model, dtype, trust_remote_code, engine)
    config = ExploreConfig(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        icl=not no_icl,
        max_steps=max_steps,
        kv_reuse=not no_kv_reuse,
        kv_cache=kv_cache.value,
        instruction=_instruction_from(instruction_from, env),
    )
    outcome = play(
        env,
        split,
        lambda first: [Job(t) for t in _task_ids([first], env, split, limit, wanted)],
        make_generator(config),
        batch_size=batch_size,
        model_name=name,
        model_revision=sha,
        state=state,
        progress=RichProgress(console, "eval"),
    )
    if not state.is_main_process:
        return
    _print_failures(outcome)
    # A failed episode is no trajectory (it is not in --trajectories) but its task stays in the
    # report, with its error: counted, out of the averages, not comparable (etokit.rollout.play).
    tasks, played = [job.task_id for job in outcome.planned], outcome.played
    result = summarize(played)
    console.print(_metrics_table(f"{env}/{split} — {name} ({sha[:16]})", result))
    if out is not None:
        report = eval_report(
            played, env=env, split=split, model=name, model_revision=sha, task_ids=tasks, result=result
        )
        with atomic_write(out) as f:
            f.write((json.dumps(report, indent=2) + "\n").encode())
        console.print(f"[green]✓[/] metrics written to {out}")
    if trajectories is not None:
        write_jsonl(trajectories, outcome.episodes)
        console.print(f"[green]✓[/] {len(outcome.episodes)} episodes written to {trajectories}")


# ----------------------------------------------------------------------------------- compare


@user_errors
def compare(
    a: Annotated[
        str,
        typer.Argument(
            help="The baseline: an `etokit eval --out` file, or with --run a stage (bc, iter-1, ...).",
            show_default=False,
        ),
    ],
    b: Annotated[str, typer.Argument(help="The evaluation compared with it, the same way.", show_default=False)],
    run_dir: Annotated[
        Optional[Path],
        typer.Option("--run", help="An `etokit run` folder: A and B are its evaluated stages.", show_default=False),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option("--split", help="With --run: only this test split (default both).")
    ] = None,
    allow_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-mismatch", help="Compare the tasks both have when the panels differ (default: refuse, exit 2)."
        ),
    ] = False,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.5, max=0.999, help="Level of the intervals.")
    ] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resamples.")] = 0,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Also write the comparison to this JSON file.")
    ] = None,
) -> None:
    """Compare two evaluations of the same tasks: the mean per-task difference B - A in average
    reward x100 with its paired-bootstrap interval (tasks resampled, 10,000 times), and how many
    tasks went up, down or stayed the same, per split. Exit code 2 when the task panels differ."""
    from etokit.cli._console import print_unwrapped
    from etokit.data import atomic_write
    from etokit.evaluate import compare_panels, load_eval_results

    if out is not None:
        check_output(out, suffixes=(".json",), inputs=[] if run_dir else [Path(a), Path(b)])
    if run_dir is not None:
        from etokit.run import EVAL_SPLITS, run_eval_panels

        if split is not None and split not in EVAL_SPLITS:
            raise EtokitError(f"--split {split!r}: a run evaluates {' and '.join(EVAL_SPLITS)}")
        panels_a, panels_b = run_eval_panels(run_dir, a), run_eval_panels(run_dir, b)
        pairs = [(panels_a[s], panels_b[s]) for s in ([split] if split else EVAL_SPLITS)]
    else:
        if split is not None:
            raise EtokitError("--split only applies with --run (an `etokit eval` file holds one split)")
        pairs = [(load_eval_results(Path(a)), load_eval_results(Path(b)))]
    results = [
        compare_panels(pa, pb, allow_mismatch=allow_mismatch, confidence=confidence, seed=seed) for pa, pb in pairs
    ]

    level = f"{confidence:.0%}" if round(confidence * 100, 6).is_integer() else f"{confidence:.1%}"
    table = Table(title=f"{b} vs {a}: average reward x100, {level} bootstrap intervals over tasks")
    for column in ("split", "A", "B", "B - A (paired)", "up", "down", "same", "tasks"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for c in results:
        table.add_row(
            c.split,
            c.a.format(),
            c.b.format(),
            c.diff.diff.format(sign=True),
            str(c.diff.up),
            str(c.diff.down),
            str(c.diff.same),
            str(c.diff.n),
        )
    print_unwrapped(table)
    for c, (pa, pb) in zip(results, pairs):
        if c.diff.missing_in_a or c.diff.missing_in_b or pa.errors or pb.errors:
            console.print(
                f"[yellow]{c.split}[/]: compared on the {c.diff.n} common tasks; left out "
                f"{len(c.diff.missing_in_b) + len(pa.errors)} of A and "
                f"{len(c.diff.missing_in_a) + len(pb.errors)} of B"
            )
    if out is not None:
        with atomic_write(out) as f:
            f.write(
                (
                    json.dumps(
                        {
                            "a": a,
                            "b": b,
                            "run": str(run_dir) if run_dir else None,
                            "unit": "reward x100",
                            "comparisons": [c.to_dict() for c in results],
                        },
                        indent=2,
                    )
                    + "\n"
                ).encode()
            )
        console.print(f"[green]✓[/] comparison written to {out}")


def register(app: typer.Typer) -> None:
    panel = "ETO"
    app.command("explore", epilog=_EXPLORE_EXAMPLES, rich_help_panel=panel)(explore)
    app.command("build-pairs", epilog=_PAIRS_EXAMPLES, rich_help_panel=panel)(build_pairs)
    app.command("eval", epilog=_EVAL_EXAMPLES, rich_help_panel=panel)(eval_)
    app.command("compare", epilog=_COMPARE_EXAMPLES, rich_help_panel=panel)(compare)
