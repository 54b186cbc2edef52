"""The whole ETO loop: behavioral cloning, then N iterations of exploration, contrastive pairs and
DPO, each policy evaluated on test-seen / test-unseen (both splits' episodes in one pool of
``eval_batch_size``) and published to the Hub.

    expert -> push-expert -> [init-model] -> bc -> eval-bc -> push-bc
    for k in 1..N: explore-k -> pairs-k -> push-explore-k -> push-pairs-k -> dpo-k -> eval-iter-k -> push-iter-k

Every stage, once done, is recorded in ``<run_dir>/manifest.json`` (written atomically) with its
outputs (files, commit shas, metrics). ``resume=True`` skips the recorded stages and re-runs the
first incomplete one, which picks up its own partial work: trajectory files are appended to and
skip the episodes already in them, and the training recipes always run with ``resume`` on (their
config, made from the run's ``bc`` / ``dpo`` section, is written to ``models/<stage>.yaml``; no
state checkpoint means a fresh start). Every stage is deterministic given the seeds, so a
resumed run ends with the outputs of an uninterrupted one, and re-pushing the same content makes
no new Hub commit (etokit.hub.publish.on_hub, the check every push makes).

Crash safety (tests/test_faults_crash.py SIGKILLs the run at points in every stage): every file a
later stage or a resumed run reads is either written atomically (temp file, fsync, rename: the
manifest, pair files, sorted episode files, training state checkpoints, saved models, the
reference log-prob cache) or an append log of fsynced lines whose torn last line is dropped when
it is opened again; the run folder is locked while a process runs it; a killed run's training
subprocesses stop with it rather than train on as orphans.

The training scripts are only ever launched as subprocesses (``accelerate launch``): they own
their distributed setup, and this loop stays a plain single process that drives them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from etokit.errors import EtokitError, ServiceUnavailable
from etokit.faults import faultpoint
from etokit.run.config import RunConfig, config_hash
from etokit.run.manifest import LOCK, RESULTS, Manifest, _remove_stale_temps, _RunLock, write_json_atomic
from etokit.run.report import (
    CARD_EVAL_NOTE,
    EVAL_SPLITS,
    _card_row,
    _eval_outputs,
    _metrics,
    _summary,
    result_rows,
    reward_chart,
)

console = Console(highlight=False)


StageHook = Callable[[str], None]


class Run:
    """One ETO run in ``cfg.run_dir``. ``after_stage(name)`` is called once a stage is recorded
    (tests raise from it to simulate a crash at a stage boundary)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, after_stage: StageHook | None = None):
        from etokit.train.config import save_config

        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.open(self.dir, config_hash(cfg), resume)
        save_config(cfg, self.dir)
        self.after_stage = after_stage
        self.skipped: list[str] = []

    # -- stage bookkeeping ----------------------------------------------------------------------

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.manifest.get(name)
        if done is not None:
            self.skipped.append(name)
            console.print(f"[dim]✓ {name} (done earlier)[/]")
            return done
        start = time.monotonic()
        with console.status(f"[bold]{name}[/] ..."):
            outputs = fn()
        seconds = time.monotonic() - start
        faultpoint("run.stage.before-record")  # the stage's work is done, the manifest does not say so yet
        self.manifest.done(name, outputs, seconds)
        console.print(f"[green]✓[/] {name} [dim]({seconds:.1f}s)[/] {_summary(outputs)}")
        if self.after_stage is not None:
            self.after_stage(name)
        return outputs

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        with _RunLock(self.dir / LOCK):
            _remove_stale_temps(self.dir)
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        expert = self.stage("expert", self.expert)
        self.stage("push-expert", lambda: self.push("expert", self.dir / expert["file"], split="train"))
        base = (
            self.stage("init-model", self.init_model)
            if not cfg.base_model
            else {"model": cfg.base_model, "revision": cfg.base_model_revision}
        )
        self.stage("bc", lambda: self.bc(base))
        self.stage("eval-bc", lambda: self.evaluate("bc"))
        self.stage("push-bc", lambda: self.push_checkpoint("bc", None))
        previous = "bc"
        for k in range(1, cfg.iterations + 1):
            name = f"iter-{k}"
            explore = self.stage(f"explore-{k}", lambda: self.explore(k, previous))
            pairs = self.stage(f"pairs-{k}", lambda: self.pairs(k, self.dir / explore["file"]))
            self.stage(f"push-explore-{k}", lambda: self.push("explore", self.dir / explore["file"], f"iter_{k}"))
            self.stage(
                f"push-pairs-{k}",
                lambda: self.push("pairs", self.dir / pairs["file"], f"iter_{k}", ties=pairs["stats"]["tie"]),
            )
            self.stage(f"dpo-{k}", lambda: self.dpo(k, previous, pairs))
            self.stage(f"eval-{name}", lambda: self.evaluate(name))
            self.stage(f"push-{name}", lambda: self.push_checkpoint(name, k))
            if cfg.early_stopping and self._unseen(name) < self._unseen(previous):
                console.print(
                    f"[yellow]early stop[/]: test-unseen reward of {name} ({self._unseen(name):.1f}) is "
                    f"below {previous}'s ({self._unseen(previous):.1f})"
                )
                break
            previous = name
        rows = self.results()
        from etokit.evaluate import panel

        # every row was evaluated on these tasks (the vs_bc records list any that were not)
        panels = {
            split: panel(cfg.env, split, [r["task_id"] for r in rows[0][split]["per_task"]]) for split in EVAL_SPLITS
        }
        write_json_atomic(self.dir / RESULTS, {"push_to": cfg.push_to, "env": cfg.env, "panels": panels, "rows": rows})
        return rows

    # -- stages ---------------------------------------------------------------------------------

    def expert(self) -> dict[str, Any]:
        """Expert trajectories for the train tasks: played with the env's expert (only successful
        ones are kept, as `etokit expert`) or taken from the given file / Hub dataset."""
        from etokit.data import JsonlAppender, write_jsonl

        cfg, out = self.cfg, self.dir / "data" / "expert.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        if cfg.expert_data:
            from etokit.train.data import load_training_records

            records = load_training_records(
                cfg.expert_data,
                "trajectory",
                config=cfg.expert_data_config,
                split=cfg.expert_data_split,
                revision=cfg.expert_data_revision,
                env=cfg.env,
                expert_reward=cfg.expert_reward,
            )
            records = [t for t in records if t.env == cfg.env]
            if not records:
                raise EtokitError(f"--expert-data {cfg.expert_data}: no trajectory of env {cfg.env!r}")
            records = records[: cfg.train_tasks] if cfg.train_tasks else records
            write_jsonl(out, records)
            failed = 0
            # A policy is explored and evaluated with the instruction it was cloned on: the expert
            # data's own when it is not etokit's (the paper's published trajectories word it otherwise).
            from etokit.agent.protocol import instruction_of

            instruction = instruction_of(records, cfg.env)
        else:
            instruction = None  # the environment's expert speaks etokit's protocol
            from etokit.agent.protocol import expert_trajectory
            from etokit.rollout.play import close_envs, open_envs

            envs = open_envs(cfg.env, 1, cfg.env_options)
            try:
                tasks = envs[0].task_ids("train")[: cfg.train_tasks]
                failed = 0
                with JsonlAppender(out, "trajectory") as appender:
                    for task_id in _track(tasks, "expert", skip=appender.existing_ids):
                        t = expert_trajectory(envs[0], task_id, "train")
                        if t.success:
                            appender.append(t)
                            faultpoint("expert.appended")
                        else:
                            failed += 1
            finally:
                close_envs(envs)
        return {
            "file": _rel(out, self.dir),
            "trajectories": _count_lines(out),
            "expert_failed": failed,
            "instruction": instruction,
        }

    def init_model(self) -> dict[str, Any]:
        from etokit.agent.protocol import load_icl
        from etokit.models.init_model import read_corpus
        from etokit.models.init_model import build_tiny_model

        out = self.dir / "models" / "base"
        texts = read_corpus(self.dir / self.manifest.get("expert")["file"])
        # The 1-shot example is in every exploration prompt but never in the training data: a
        # tokenizer that has seen it keeps that prompt within the context.
        texts += [m["content"] for m in load_icl(self.cfg.env)]
        build_tiny_model(texts, out, size=self.cfg.init_model_size, seed=self.cfg.seed, max_position_embeddings=4096)
        faultpoint("init-model.built")
        return {"model": _rel(out, self.dir), "revision": None, "size": self.cfg.init_model_size}

    def bc(self, base: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.dir / "models" / "bc"
        model = (
            str(self.dir / base["model"])
            if not Path(base["model"]).is_absolute() and (self.dir / base["model"]).exists()
            else base["model"]
        )
        recipe = cfg.bc_config(
            model=model,
            model_revision=base.get("revision"),
            data=str(self.dir / self.manifest.get("expert")["file"]),
            output_dir=str(out),
        )
        self._launch("bc", recipe, out)
        return {"model": _rel(out, self.dir), "weights_sha256": _weights_digest(out)}

    def explore(self, k: int, policy: str) -> dict[str, Any]:
        from etokit.data import read_jsonl
        from etokit.evaluate import summarize
        from etokit.pairs import is_step_wise

        out = self.dir / "data" / f"explore_iter{k}.jsonl"
        step_wise = None
        if self.cfg.pairs_mode != "trajectory":
            from etokit.rollout.jobs import index_experts

            file = self.dir / self.manifest.get("expert")["file"]
            step_wise = (index_experts(read_jsonl(file, "trajectory"), path=file), k)
        self._play(policy, {"train": out}, self.cfg.train_tasks, f"explore-{k}", step_wise=step_wise)
        played = read_jsonl(out, "trajectory")
        whole = [t for t in played if not is_step_wise(t)]
        outputs = {"file": _rel(out, self.dir), "policy": policy, **_metrics(summarize(whole or played))}
        if step_wise is not None:
            outputs["step_wise_episodes"] = len(played) - len(whole)
        return outputs

    def pairs(self, k: int, explore_file: Path) -> dict[str, Any]:
        from etokit.data import read_jsonl, write_jsonl
        from etokit.pairs import PairRule, build_pairs

        experts = read_jsonl(self.dir / self.manifest.get("expert")["file"], "trajectory")
        explored = read_jsonl(explore_file, "trajectory")
        rule = PairRule(rewards=self.cfg.pairs_rewards, expert_observation=self.cfg.pairs_expert_observation)
        pairs, stats = build_pairs(explored, experts, mode=self.cfg.pairs_mode, iteration=k, rule=rule)
        faultpoint("pairs.built")
        out = self.dir / "data" / f"pairs_iter{k}.jsonl"
        write_jsonl(out, pairs)  # atomic: a crash mid-write leaves no pairs file, never part of one
        return {"file": _rel(out, self.dir), "stats": stats.to_dict()}

    def push(self, card: str, path: Path, split: str, ties: int | None = None) -> dict[str, Any]:
        from etokit.data import load_records
        from etokit.hub.publish import push_dataset

        repo = self.cfg.datasets[card]
        if not _count_lines(path):  # e.g. an iteration whose episodes all tied with the expert
            return {"repo": repo, "split": split, "rows": 0, "skipped": "no rows"}
        records = load_records(path, "pair" if card == "pairs" else "trajectory")
        # Pushed before a crash but not recorded: push_dataset finds it on the Hub and commits nothing.
        result = push_dataset(
            records, repo, card=card, config_name=self.cfg.env, split=split, private=self.cfg.private, ties=ties
        )
        return {
            "repo": repo,
            "config": result.config_name,
            "split": split,
            "rows": result.rows,
            "data_commit": result.data_commit,
            "card_commit": result.card_commit,
        }

    def dpo(self, k: int, previous: str, pairs: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.dir / "models" / f"iter-{k}"
        policy = self.dir / self.manifest.get(_train_stage(previous))["model"]
        beta, lr = cfg.dpo_hparams(k)
        if not pairs["stats"]["pairs"]:
            # Nothing to prefer: the iteration keeps the explorer's weights (and says so).
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(policy, out, ignore=shutil.ignore_patterns("checkpoints", "runs"))
            return {
                "model": _rel(out, self.dir),
                "reference": previous,
                "beta": beta,
                "learning_rate": lr,
                "skipped": "no pairs",
                "weights_sha256": _weights_digest(out),
            }
        # The reference is the policy that explored (train_dpo's default: --model itself).
        recipe = cfg.dpo_config(
            k,
            model=str(policy),
            data=str(self.dir / pairs["file"]),
            output_dir=str(out),
            ref_cache_dir=str(self.dir / "ref-cache"),
        )
        self._launch("dpo", recipe, out)
        return {
            "model": _rel(out, self.dir),
            "reference": previous,
            "beta": beta,
            "learning_rate": lr,
            "weights_sha256": _weights_digest(out),
        }

    def evaluate(self, name: str) -> dict[str, Any]:
        from etokit.data import read_jsonl

        outs = {split: self.dir / "eval" / name / f"{split}.jsonl" for split in EVAL_SPLITS}
        # Both splits in one pool: a batched forward of twice the rows costs little more on CPU.
        batch_size = self.cfg.eval_batch_size or self.cfg.explore_batch_size
        self._play(name, outs, self.cfg.eval_tasks, f"eval {name}", batch_size=batch_size)
        return {
            split: {"file": _rel(out, self.dir), **_eval_outputs(read_jsonl(out, "trajectory"))}
            for split, out in outs.items()
        }

    def push_checkpoint(self, name: str, k: int | None) -> dict[str, Any]:
        from etokit.hub.checkpoint import push_checkpoint
        from etokit.report import publish_report
        from etokit.hub.checkpoint import card_datasets

        cfg = self.cfg
        folder = self.dir / self.manifest.get(_train_stage(name))["model"]
        rows = self.results(upto=name)
        chart = reward_chart(rows)
        from etokit.data.io import atomic_write

        with atomic_write(folder / "reward_per_iteration.md") as f:  # pushed with the weights: never torn
            f.write((chart + "\n").encode())
        if k is None:
            stage, data = "behavioral cloning (SFT)", [(cfg.datasets["expert"], cfg.env, "train", None)]
            hp = {
                "learning_rate": cfg.bc.learning_rate,
                "num_epochs": cfg.bc.num_epochs,
                "global_batch_size": cfg.bc.per_device_batch_size * cfg.bc.gradient_accumulation_steps,
                "warmup_ratio": cfg.bc.warmup_ratio,
                "lr_scheduler": cfg.bc.lr_scheduler,
            }
            base = cfg.base_model or None  # the card says "initialized from scratch" for init-model
        else:
            trained = self.manifest.get(f"dpo-{k}")
            stage, data = (
                "ETO (DPO on contrastive trajectory pairs)",
                [(cfg.datasets["pairs"], cfg.env, f"iter_{k}", None)],
            )
            hp = {
                "beta": trained["beta"],
                "learning_rate": trained["learning_rate"],
                "num_epochs": cfg.dpo.num_epochs,
                "batch_size": cfg.dpo.batch_size,
                "warmup_ratio": cfg.dpo.warmup_ratio,
                "lr_scheduler": cfg.dpo.lr_scheduler,
                "reference_model": f"{cfg.push_to}@{trained['reference']}",
            }
            if trained.get("skipped"):
                hp["note"] = "no contrastive pairs: weights of the previous iteration"
            base = f"{cfg.push_to}@{trained['reference']}"
        card = {
            "stage": stage,
            "iteration": k,
            "base_model": base,
            "datasets": [{**d, "local": False} for d in card_datasets(data)],
            "hyperparameters": {
                **hp,
                "seed": cfg.seed,
                "max_length": cfg.max_length,
                "prompt_instruction": "the expert data's" if self._instruction() else "etokit's",
                **({"expert_reward_stated": cfg.expert_reward} if cfg.expert_reward is not None else {}),
            },
            "eval": [_card_row(r, vs_bc=len(rows) > 1) for r in rows],
            "eval_note": CARD_EVAL_NOTE,
            "description": (
                f"An LLM agent for `{cfg.env}` trained with the ETO loop (`etokit run`). Average reward "
                f"x100 per stage on test-seen / test-unseen:\n\n```\n{chart}\n```"
            ),
            "tags": [cfg.env],
            **publish_report(self.dir, folder, upto=name),  # <run_dir>/report.html; figures + model-index
        }
        sha = push_checkpoint(
            folder, cfg.push_to, name, card=card, commit_message=f"etokit run: {name}", private=cfg.private
        )
        return {"repo": cfg.push_to, "revision": name, "commit": sha}

    # -- helpers --------------------------------------------------------------------------------

    def _instruction(self) -> str | None:
        """The instruction turn the expert data was written with, or None for etokit's own."""
        return self.manifest.get("expert").get("instruction")

    def _unseen(self, name: str) -> float:
        return self.manifest.get(f"eval-{name}")["test-unseen"]["avg_reward"]

    def results(self, upto: str | None = None) -> list[dict[str, Any]]:
        """One row per evaluated policy so far, ending at ``upto`` (etokit.run.report.result_rows)."""
        return result_rows(self.manifest.data["stages"], self.dir, upto)

    def _play(
        self,
        policy: str,
        outs: dict[str, Path],
        limit: int | None,
        what: str,
        *,
        batch_size: int | None = None,
        step_wise: tuple[dict, int] | None = None,
    ) -> None:
        """Greedy episodes of ``policy`` on each split of ``outs``, in one pool of ``batch_size``
        (default explore_batch_size), appended to the split's file (episodes already there are
        skipped: a crashed stage resumes where it stopped). ``step_wise`` = (experts by task,
        iteration): also (pairs_mode "mixture") or only ("step") step-wise episodes, steps_per_task
        per task, the steps drawn anew each iteration."""
        from etokit.rollout.generator import ExploreConfig, Generator
        from etokit.rollout.jobs import experts_of_tasks, plan_jobs, plan_step_jobs
        from etokit.rollout.play import RichProgress, play_splits
        from etokit.train.model_loading import load_model_and_tokenizer

        cfg = self.cfg
        folder = self.dir / self.manifest.get(_train_stage(policy))["model"]
        model, tokenizer = load_model_and_tokenizer(str(folder), dtype=cfg.generation_dtype)
        model.eval()
        batch_size = batch_size or cfg.explore_batch_size
        config = ExploreConfig(
            batch_size=batch_size,
            max_new_tokens=cfg.max_new_tokens,
            icl=cfg.icl,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
            instruction=self._instruction(),
        )

        def plan(first, split):
            tasks = first.task_ids(split)[:limit]
            jobs = plan_jobs(tasks, 1) if cfg.pairs_mode != "step" or step_wise is None else []
            if step_wise is not None:
                experts, k = step_wise
                jobs += plan_step_jobs(
                    experts_of_tasks(experts, tasks),
                    cfg.steps_per_task,
                    seed=cfg.seed * 1000 + k,
                    max_steps=config.max_steps or first.max_steps,
                )
            # The file's order: task by task, a task's whole episode first, then its step-wise ones by step.
            order = {t: i for i, t in enumerate(tasks)}
            return sorted(
                jobs, key=lambda j: (order[j.task_id], j.prefix_steps is not None, j.prefix_steps or 0, j.sample)
            )

        results = play_splits(
            cfg.env,
            outs,
            plan,
            Generator(model, tokenizer, config),
            batch_size=batch_size,
            env_options=cfg.env_options,
            experts=step_wise and step_wise[0],
            model_name=f"{cfg.push_to}@{policy}",
            model_revision=None,
            progress=RichProgress(console, what, transient=True),
        )
        failed = [t for result in results.values() for t in result.failed]
        if failed:  # the stage fails; a resume plays the failed episodes again
            raise EtokitError(
                f"{cfg.env} task {failed[0].task_id}: the environment failed ({failed[0].extra['error']})"
            )

    def _launch(self, recipe: str, config, out: Path) -> None:
        """Train ``recipe`` ("bc" / "dpo") with its ``config`` into ``out``: the config is written
        next to the stage's folder (``models/<stage>.yaml``) and the recipe reads it with --config."""
        from etokit.recipes.launch import recipe_command
        from etokit.train.config import write_config

        out.mkdir(parents=True, exist_ok=True)
        config_file = write_config(config, out.parent / f"{out.name}.yaml")
        # One process needs no launcher (Accelerator() alone sets it up); an accelerate config gets it.
        cmd = recipe_command(
            recipe, ["--config", str(config_file)], accelerate_config=self.cfg.accelerate_config, launcher=False
        )
        log = out / "launch.log"
        # The trainer must not outlive this process: an orphan still writing to `out` while a
        # resumed run trains there again would interleave two runs' checkpoints. Every rank
        # watches this pid and stops itself once it is gone (etokit.train.distributed.make_accelerator).
        from etokit.train.distributed import DRIVER_PID_ENV

        env = {**os.environ, DRIVER_PID_ENV: str(os.getpid())}
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            # An outage in the recipe (its push) stays an outage for whoever runs the loop.
            error = ServiceUnavailable if done.returncode == ServiceUnavailable.exit_code else EtokitError
            raise error(f"the {recipe.upper()} recipe failed (exit {done.returncode}): {tail[0]} (full log: {log})")


def _train_stage(policy: str) -> str:
    return "bc" if policy == "bc" else f"dpo-{policy.split('-')[1]}"


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip()) if path.exists() else 0


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _track(items, what: str, *, total: int | None = None, skip=frozenset()):
    from rich.progress import track

    items = [i for i in items if i not in skip] if not hasattr(items, "__next__") else items
    return track(items, description=what, total=total, console=console, transient=True)
