"""The whole ETO loop: behavioral cloning, then N iterations of exploration, contrastive pairs and
DPO, each policy evaluated on test-seen / test-unseen and published to the Hub.

    expert -> push-expert -> [init-model] -> bc -> eval-bc -> push-bc
    for k in 1..N: explore-k -> pairs-k -> push-explore-k -> push-pairs-k -> dpo-k -> eval-iter-k -> push-iter-k

Every stage, once done, is recorded in ``<run_dir>/manifest.json`` (written atomically) with its
outputs (files, commit shas, metrics). ``resume=True`` skips the recorded stages and re-runs the
first incomplete one, which picks up its own partial work: trajectory files are appended to and
skip the episodes already in them, and the training scripts are always launched with ``--resume``
(no state checkpoint means a fresh start). Every stage is deterministic given the seeds, so a
resumed run ends with the outputs of an uninterrupted one, and re-pushing the same content makes
no new Hub commit.

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

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from etokit.errors import EtokitError, ServiceUnavailable
from etokit.faults import faultpoint

console = Console(highlight=False)

MANIFEST = "manifest.json"
RESULTS = "results.json"
LOCK = ".lock"
EVAL_SPLITS = ("test-seen", "test-unseen")


@dataclass
class RunConfig:
    """`etokit run` options. ETO's defaults (paper / official scripts) unless noted."""

    run_dir: str = field(default="", metadata={"help": "local folder of this run: manifest, data, checkpoints"})
    push_to: str = field(default="", metadata={"help": "Hub model repo NAMESPACE/NAME; every checkpoint is a "
                                                       "branch + tag of it (bc, iter-1, ...)"})
    dataset_prefix: str | None = field(default=None, metadata={"help": "datasets go to PREFIX-expert, PREFIX-explore, "
                                                                       "PREFIX-pairs (default: push_to)"})
    env: str = field(default="textworld-express", metadata={"help": "webshop, scienceworld, alfworld, textworld-express"})
    env_options: dict = field(default_factory=dict, metadata={"help": "keyword options of the environment"})
    base_model: str = field(default="", metadata={"help": "model to clone the expert into (folder or Hub repo); "
                                                          "empty: a tiny Llama built by init-model from the expert text"})
    base_model_revision: str | None = None
    init_model_size: str = field(default="tiny", metadata={"choices": ["tiny", "small"]})
    expert_data: str | None = field(default=None, metadata={"help": "expert trajectories: local file or Hub dataset "
                                                                    "repo; empty: play the env's expert on train"})
    expert_data_config: str | None = None
    expert_data_split: str | None = field(default=None, metadata={"help": "Hub split (default: the env's, e.g. "
                                                                          "scienceworld of the paper's data)"})
    expert_data_revision: str | None = None
    expert_reward: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "reward stated for "
                                        "official expert rows without one (WebShop's Hub copy); recorded in the cards"})
    train_tasks: int | None = field(default=None, metadata={"gt": 0, "help": "first N train tasks (expert + "
                                                                             "exploration); default all"})
    eval_tasks: int | None = field(default=None, metadata={"gt": 0, "help": "first N tasks of each test split"})
    iterations: int = field(default=3, metadata={"help": "ETO iterations after BC"})
    early_stopping: bool = field(default=False, metadata={"help": "stop once test-unseen reward drops vs the "
                                                                  "previous iteration"})
    seed: int = 0
    # exploration and evaluation: greedy, 1-shot prompt (the paper)
    explore_batch_size: int = field(default=16, metadata={"gt": 0})
    max_new_tokens: int = field(default=256, metadata={"gt": 0})
    max_steps: int | None = field(default=None, metadata={"gt": 0, "help": "agent turns per episode (env default)"})
    icl: bool = field(default=True, metadata={"help": "the 1-shot example in exploration/evaluation prompts (paper: "
                                                      "on)"})
    # behavioral cloning (official SFT script: lr 2e-5, 3 epochs, global batch 64, 3% warmup, cosine)
    bc_learning_rate: float = field(default=2e-5, metadata={"gt": 0})
    bc_num_epochs: int = field(default=3, metadata={"gt": 0})
    bc_per_device_batch_size: int = field(default=4, metadata={"gt": 0})
    bc_gradient_accumulation_steps: int = field(default=16, metadata={"gt": 0})
    bc_warmup_ratio: float = 0.03
    bc_lr_scheduler: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "constant",
                                                                         "constant_with_warmup"]})
    bc_max_steps: int | None = field(default=None, metadata={"gt": 0})
    bc_args: list[str] = field(default_factory=list, metadata={"help": "extra flags for the BC recipe (etokit.recipes.train_bc)"})
    # DPO: per-iteration beta / lr lists, the last value repeats (ETO: 0.1 / 1e-6, then 0.5 / 5e-7)
    dpo_beta: list[float] = field(default_factory=lambda: [0.1, 0.5], metadata={"gt": 0})
    dpo_learning_rate: list[float] = field(default_factory=lambda: [1e-6, 5e-7], metadata={"gt": 0})
    dpo_num_epochs: int = field(default=3, metadata={"gt": 0})
    dpo_batch_size: int = field(default=32, metadata={"gt": 0})
    dpo_warmup_ratio: float = 0.1
    dpo_max_steps: int | None = field(default=None, metadata={"gt": 0})
    dpo_args: list[str] = field(default_factory=list, metadata={"help": "extra flags for the DPO recipe (etokit.recipes.train_dpo)"})
    # contrastive pairs (paper App. B): "step" plays step-wise episodes from the expert's first t-1 steps
    # instead of whole episodes, "mixture" plays both and pairs both
    pairs_mode: str = field(default="trajectory", metadata={"choices": ["trajectory", "step", "mixture"]})
    # the pair rule (etokit.pairs.PairRule): the defaults are construct_preference.py's, the others
    # documented deviations recorded on the pairs and in the dataset card
    pairs_rewards: str = field(default="official", metadata={"choices": ["official", "stored"],
                                                             "help": "official: ScienceWorld/ALFWorld experts "
                                                                     "score 1.0; stored: compare stored rewards"})
    pairs_expert_observation: str = field(default="drop-pair", metadata={
        "choices": ["drop-pair", "trim"], "help": "an expert ending on an observation: drop the pair (official) "
                                                  "or trim it"})
    steps_per_task: int | None = field(default=None, metadata={"gt": 0, "help": "step-wise episodes per task and "
                                                                                "iteration (None: every step t)"})
    max_length: int = field(default=4096, metadata={"gt": 0, "help": "training tokens per sequence"})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate config file for training"})
    private: bool = False

    def __post_init__(self):
        for name in ("run_dir", "push_to"):
            if not getattr(self, name):
                raise EtokitError(f"--{name.replace('_', '-')} is required")
        if self.push_to.count("/") != 1:
            raise EtokitError(f"--push-to must be NAMESPACE/NAME, got {self.push_to!r}")
        for name in ("dpo_beta", "dpo_learning_rate"):
            if not getattr(self, name):
                raise EtokitError(f"--{name.replace('_', '-')} needs at least one value")
        if self.accelerate_config:
            from etokit.configs import resolve

            try:
                resolve(self.accelerate_config, "accelerate")
            except EtokitError as e:
                raise EtokitError(f"--accelerate-config: {e}") from None
        from etokit.envs.registry import ENV_CLASSES

        if self.env not in ENV_CLASSES:
            raise EtokitError(f"--env {self.env!r}: expected one of {', '.join(ENV_CLASSES)}")
        # Local inputs are checked now, before the run dir is made, not when their stage comes.
        if self.base_model:
            from etokit.models.files import check_model_dir

            check_model_dir(self.base_model, option="--base-model")
        if self.expert_data and Path(self.expert_data).exists():
            from etokit.data.sources import load_source

            load_source(self.expert_data, "trajectory", env=self.env, expert_reward=self.expert_reward,
                        option="--expert-data")

    @property
    def datasets(self) -> dict[str, str]:
        prefix = self.dataset_prefix or self.push_to
        return {kind: f"{prefix}-{kind}" for kind in ("expert", "explore", "pairs")}

    def dpo_hparams(self, k: int) -> tuple[float, float]:
        """(beta, learning rate) of iteration ``k`` (1-based)."""
        pick = lambda values: values[min(k, len(values)) - 1]  # noqa: E731
        return pick(self.dpo_beta), pick(self.dpo_learning_rate)


def config_hash(cfg: RunConfig) -> str:
    """What the stages' outputs depend on. ``iterations`` and ``early_stopping`` are left out: a
    finished run can be extended with more iterations on --resume."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("iterations", "early_stopping")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ manifest


class Manifest:
    """``manifest.json``: the config hash and, in order, each completed stage with its outputs."""

    def __init__(self, path: Path, cfg_hash: str):
        self.path = path
        self.data: dict[str, Any] = {"config_hash": cfg_hash, "stages": []}

    @classmethod
    def open(cls, run_dir: Path, cfg_hash: str, resume: bool) -> "Manifest":
        path = run_dir / MANIFEST
        manifest = cls(path, cfg_hash)
        if path.exists():
            if not resume:
                raise EtokitError(f"{run_dir} already holds a run ({MANIFEST}); pass --resume to continue it or "
                                  "choose another --run-dir")
            try:
                manifest.data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise EtokitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
            if manifest.data.get("config_hash") != cfg_hash:
                raise EtokitError(f"--resume: the config differs from the one {run_dir} was started with "
                                  f"(hash {cfg_hash} vs {manifest.data.get('config_hash')}); see "
                                  f"{run_dir / 'etokit_config.yaml'}")
        return manifest

    def get(self, name: str) -> dict[str, Any] | None:
        return next((s["outputs"] for s in self.data["stages"] if s["name"] == name), None)

    def done(self, name: str, outputs: dict[str, Any], seconds: float) -> None:
        self.data["stages"].append({"name": name, "outputs": outputs, "seconds": round(seconds, 2),
                                    "config_hash": self.data["config_hash"]})
        write_json_atomic(self.path, self.data, point="manifest.before-rename")

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.data["stages"]]


def write_json_atomic(path: Path, data: Any, point: str | None = None) -> None:
    """Temp file, fsync, rename, fsync of the folder: a crash leaves the old file or the new one,
    and a recorded stage stays recorded after a power cut. ``point``: a fault point between the
    temp file and the rename."""
    from etokit.data.io import atomic_write

    with atomic_write(path) as f:
        f.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
        if point:
            f.flush()
            faultpoint(point)


# --------------------------------------------------------------------------------------- loop


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
        base = self.stage("init-model", self.init_model) if not cfg.base_model else {
            "model": cfg.base_model, "revision": cfg.base_model_revision}
        self.stage("bc", lambda: self.bc(base))
        self.stage("eval-bc", lambda: self.evaluate("bc"))
        self.stage("push-bc", lambda: self.push_checkpoint("bc", None))
        previous = "bc"
        for k in range(1, cfg.iterations + 1):
            name = f"iter-{k}"
            explore = self.stage(f"explore-{k}", lambda: self.explore(k, previous))
            pairs = self.stage(f"pairs-{k}", lambda: self.pairs(k, self.dir / explore["file"]))
            self.stage(f"push-explore-{k}", lambda: self.push("explore", self.dir / explore["file"], f"iter_{k}"))
            self.stage(f"push-pairs-{k}", lambda: self.push("pairs", self.dir / pairs["file"], f"iter_{k}",
                                                            ties=pairs["stats"]["tie"]))
            self.stage(f"dpo-{k}", lambda: self.dpo(k, previous, pairs))
            self.stage(f"eval-{name}", lambda: self.evaluate(name))
            self.stage(f"push-{name}", lambda: self.push_checkpoint(name, k))
            if cfg.early_stopping and self._unseen(name) < self._unseen(previous):
                console.print(f"[yellow]early stop[/]: test-unseen reward of {name} ({self._unseen(name):.1f}) is "
                              f"below {previous}'s ({self._unseen(previous):.1f})")
                break
            previous = name
        rows = self.results()
        from etokit.evaluate import panel

        # every row was evaluated on these tasks (the vs_bc records list any that were not)
        panels = {split: panel(cfg.env, split, [r["task_id"] for r in rows[0][split]["per_task"]])
                  for split in EVAL_SPLITS}
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
            from etokit.train.common import load_training_records

            records = load_training_records(cfg.expert_data, "trajectory", config=cfg.expert_data_config,
                                            split=cfg.expert_data_split, revision=cfg.expert_data_revision,
                                            env=cfg.env, expert_reward=cfg.expert_reward)
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
        return {"file": _rel(out, self.dir), "trajectories": _count_lines(out), "expert_failed": failed,
                "instruction": instruction}

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
        model = str(self.dir / base["model"]) if not Path(base["model"]).is_absolute() and \
            (self.dir / base["model"]).exists() else base["model"]
        args = ["--model", model, "--data", str(self.dir / self.manifest.get("expert")["file"]),
                "--output-dir", str(out), "--learning-rate", repr(cfg.bc_learning_rate),
                "--num-epochs", str(cfg.bc_num_epochs), "--per-device-batch-size", str(cfg.bc_per_device_batch_size),
                "--gradient-accumulation-steps", str(cfg.bc_gradient_accumulation_steps),
                "--warmup-ratio", repr(cfg.bc_warmup_ratio), "--lr-scheduler", cfg.bc_lr_scheduler,
                "--max-length", str(cfg.max_length), "--seed", str(cfg.seed), "--report-to", "none", "--resume"]
        if base.get("revision"):
            args += ["--model-revision", base["revision"]]
        if cfg.bc_max_steps:
            args += ["--max-steps", str(cfg.bc_max_steps)]
        self._launch("bc", args + list(cfg.bc_args), out)
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
        self._play(policy, "train", out, self.cfg.train_tasks, f"explore-{k}", step_wise=step_wise)
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
        head = _published(repo, self.cfg.env, split, records.records)
        if head is not None:  # pushed before a crash, not yet recorded: pushing again would add a card commit
            return {"repo": repo, "config": self.cfg.env, "split": split, "rows": len(records), "data_commit": head,
                    "card_commit": head}
        result = push_dataset(records, repo, card=card, config_name=self.cfg.env, split=split,
                              private=self.cfg.private, ties=ties)
        return {"repo": repo, "config": result.config_name, "split": split, "rows": result.rows,
                "data_commit": result.data_commit, "card_commit": result.card_commit}

    def dpo(self, k: int, previous: str, pairs: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.dir / "models" / f"iter-{k}"
        policy = self.dir / self.manifest.get(_train_stage(previous))["model"]
        beta, lr = cfg.dpo_hparams(k)
        if not pairs["stats"]["pairs"]:
            # Nothing to prefer: the iteration keeps the explorer's weights (and says so).
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(policy, out, ignore=shutil.ignore_patterns("checkpoints", "runs"))
            return {"model": _rel(out, self.dir), "reference": previous, "beta": beta, "learning_rate": lr,
                    "skipped": "no pairs", "weights_sha256": _weights_digest(out)}
        # The reference is the policy that explored (train_dpo's default: --model itself).
        args = ["--model", str(policy), "--data", str(self.dir / pairs["file"]), "--output-dir", str(out),
                "--beta", repr(beta), "--learning-rate", repr(lr), "--num-epochs", str(cfg.dpo_num_epochs),
                "--batch-size", str(cfg.dpo_batch_size), "--warmup-ratio", repr(cfg.dpo_warmup_ratio),
                "--max-length", str(cfg.max_length), "--seed", str(cfg.seed), "--iteration", str(k),
                "--ref-cache-dir", str(self.dir / "ref-cache"), "--report-to", "none", "--resume"]
        if cfg.dpo_max_steps:
            args += ["--max-steps", str(cfg.dpo_max_steps)]
        self._launch("dpo", args + list(cfg.dpo_args), out)
        return {"model": _rel(out, self.dir), "reference": previous, "beta": beta, "learning_rate": lr,
                "weights_sha256": _weights_digest(out)}

    def evaluate(self, name: str) -> dict[str, Any]:
        from etokit.data import read_jsonl

        outputs = {}
        for split in EVAL_SPLITS:
            out = self.dir / "eval" / name / f"{split}.jsonl"
            self._play(name, split, out, self.cfg.eval_tasks, f"eval {name}")
            outputs[split] = {"file": _rel(out, self.dir), **_eval_outputs(read_jsonl(out, "trajectory"))}
        return outputs

    def push_checkpoint(self, name: str, k: int | None) -> dict[str, Any]:
        from etokit.hub.checkpoint import push_checkpoint
        from etokit.report import publish_report
        from etokit.train.common import card_datasets

        cfg = self.cfg
        folder = self.dir / self.manifest.get(_train_stage(name))["model"]
        rows = self.results(upto=name)
        chart = reward_chart(rows)
        from etokit.data.io import atomic_write

        with atomic_write(folder / "reward_per_iteration.md") as f:  # pushed with the weights: never torn
            f.write((chart + "\n").encode())
        if k is None:
            stage, data = "behavioral cloning (SFT)", [(cfg.datasets["expert"], cfg.env, "train", None)]
            hp = {"learning_rate": cfg.bc_learning_rate, "num_epochs": cfg.bc_num_epochs,
                  "global_batch_size": cfg.bc_per_device_batch_size * cfg.bc_gradient_accumulation_steps,
                  "warmup_ratio": cfg.bc_warmup_ratio, "lr_scheduler": cfg.bc_lr_scheduler}
            base = cfg.base_model or None  # the card says "initialized from scratch" for init-model
        else:
            trained = self.manifest.get(f"dpo-{k}")
            stage, data = "ETO (DPO on contrastive trajectory pairs)", [(cfg.datasets["pairs"], cfg.env, f"iter_{k}", None)]
            hp = {"beta": trained["beta"], "learning_rate": trained["learning_rate"], "num_epochs": cfg.dpo_num_epochs,
                  "batch_size": cfg.dpo_batch_size, "warmup_ratio": cfg.dpo_warmup_ratio,
                  "lr_scheduler": "constant_with_warmup", "reference_model": f"{cfg.push_to}@{trained['reference']}"}
            if trained.get("skipped"):
                hp["note"] = "no contrastive pairs: weights of the previous iteration"
            base = f"{cfg.push_to}@{trained['reference']}"
        card = {
            "stage": stage, "iteration": k, "base_model": base,
            "datasets": [{**d, "local": False} for d in card_datasets(data)],
            "hyperparameters": {**hp, "seed": cfg.seed, "max_length": cfg.max_length,
                                "prompt_instruction": "the expert data's" if self._instruction() else "etokit's",
                                **({"expert_reward_stated": cfg.expert_reward} if cfg.expert_reward is not None else {})},
            "eval": [_card_row(r, vs_bc=len(rows) > 1) for r in rows],
            "eval_note": CARD_EVAL_NOTE,
            "description": (f"An LLM agent for `{cfg.env}` trained with the ETO loop (`etokit run`). Average reward "
                            f"x100 per stage on test-seen / test-unseen:\n\n```\n{chart}\n```"),
            "tags": [cfg.env],
            **publish_report(self.dir, folder, upto=name),  # <run_dir>/report.html; figures + model-index
        }
        sha = push_checkpoint(folder, cfg.push_to, name, card=card, commit_message=f"etokit run: {name}",
                              private=cfg.private)
        return {"repo": cfg.push_to, "revision": name, "commit": sha}

    # -- helpers --------------------------------------------------------------------------------

    def _instruction(self) -> str | None:
        """The instruction turn the expert data was written with, or None for etokit's own."""
        return self.manifest.get("expert").get("instruction")

    def _unseen(self, name: str) -> float:
        return self.manifest.get(f"eval-{name}")["test-unseen"]["avg_reward"]

    def results(self, upto: str | None = None) -> list[dict[str, Any]]:
        """One row per evaluated policy (BC, iter-1, ...) in order, ending at ``upto``: per split
        the averages with their 95% intervals over tasks, the per-task results and, after BC, the
        paired difference from BC (``vs_bc``, reward x100, on the same tasks)."""
        rows = []
        for stage in self.manifest.data["stages"]:
            if not stage["name"].startswith("eval-"):
                continue
            name = stage["name"][len("eval-"):]
            row = {"model": name}
            for split in EVAL_SPLITS:
                out = stage["outputs"][split]
                if "per_task" not in out:  # recorded before per-task results were kept: from its episodes
                    from etokit.data import read_jsonl

                    out = {**out, **_eval_outputs(read_jsonl(self.dir / out["file"], "trajectory"))}
                row[split] = {k: out[k] for k in ("avg_reward", "success_rate", "episodes", "avg_reward_ci",
                                                  "success_rate_ci", "per_task")}
                if rows:
                    row[split]["vs_bc"] = _vs(rows[0][split]["per_task"], out["per_task"], rows[0]["model"], name,
                                              split)
            rows.append(row)
            if name == upto:
                break
        for stage in self.manifest.data["stages"]:
            if stage["name"].startswith("pairs-"):
                name = f"iter-{stage['name'][len('pairs-'):]}"
                for row in rows:
                    if row["model"] == name:
                        row["pairs"] = stage["outputs"]["stats"]
        return rows

    def _play(self, policy: str, split: str, out: Path, limit: int | None, what: str,
              step_wise: tuple[dict, int] | None = None) -> None:
        """Greedy episodes of ``policy`` on ``split``, appended to ``out`` (episodes already there
        are skipped: a crashed stage resumes where it stopped). ``step_wise`` = (experts by task,
        iteration): also (pairs_mode "mixture") or only ("step") step-wise episodes, steps_per_task
        per task, the steps drawn anew each iteration."""
        from etokit.rollout.generator import ExploreConfig, Generator
        from etokit.rollout.jobs import experts_of_tasks, plan_jobs, plan_step_jobs
        from etokit.rollout.play import RichProgress, play
        from etokit.train.common import load_model_and_tokenizer

        cfg = self.cfg
        folder = self.dir / self.manifest.get(_train_stage(policy))["model"]
        model, tokenizer = load_model_and_tokenizer(str(folder))
        model.eval()
        config = ExploreConfig(batch_size=cfg.explore_batch_size, max_new_tokens=cfg.max_new_tokens,
                               icl=cfg.icl, seed=cfg.seed, max_steps=cfg.max_steps, instruction=self._instruction())

        def plan(first):
            tasks = first.task_ids(split)[:limit]
            jobs = plan_jobs(tasks, 1) if cfg.pairs_mode != "step" or step_wise is None else []
            if step_wise is not None:
                experts, k = step_wise
                jobs += plan_step_jobs(experts_of_tasks(experts, tasks), cfg.steps_per_task, seed=cfg.seed * 1000 + k,
                                       max_steps=config.max_steps or first.max_steps)
            # The file's order: task by task, a task's whole episode first, then its step-wise ones by step.
            order = {t: i for i, t in enumerate(tasks)}
            return sorted(jobs, key=lambda j: (order[j.task_id], j.prefix_steps is not None, j.prefix_steps or 0,
                                               j.sample))

        result = play(cfg.env, split, plan, Generator(model, tokenizer, config), batch_size=cfg.explore_batch_size,
                      env_options=cfg.env_options, out=out, experts=step_wise and step_wise[0],
                      model_name=f"{cfg.push_to}@{policy}", model_revision=None,
                      progress=RichProgress(console, what, transient=True))
        for t in result.failed[:1]:  # the stage fails; a resume plays the failed episodes again
            raise EtokitError(f"{cfg.env} task {t.task_id}: the environment failed ({t.extra['error']})")

    def _launch(self, recipe: str, args: list[str], out: Path) -> None:
        from etokit.recipes.launch import recipe_command

        # One process needs no launcher (Accelerator() alone sets it up); an accelerate config gets it.
        cmd = recipe_command(recipe, args, accelerate_config=self.cfg.accelerate_config, launcher=False)
        out.mkdir(parents=True, exist_ok=True)
        log = out / "launch.log"
        # The trainer must not outlive this process: an orphan still writing to `out` while a
        # resumed run trains there again would interleave two runs' checkpoints. Every rank
        # watches this pid and stops itself once it is gone (etokit.train.common.make_accelerator).
        from etokit.train.common import DRIVER_PID_ENV

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


# ------------------------------------------------------------------------------------ helpers


def run_eval_panels(run_dir: Path, name: str) -> dict[str, Any]:
    """The evaluations of policy ``name`` (bc, iter-1, ...) recorded in ``run_dir``'s manifest, as
    comparison panels by split (`etokit compare --run`)."""
    from etokit.data import read_jsonl
    from etokit.evaluate import panel_from_per_task, per_task

    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        raise EtokitError(f"{run_dir}: no {MANIFEST} (not an `etokit run` folder)")
    try:
        stages = json.loads(path.read_text())["stages"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EtokitError(f"{path}: not a run manifest ({e})") from None
    evaluated = {s["name"][len("eval-"):]: s["outputs"] for s in stages if s["name"].startswith("eval-")}
    if name not in evaluated:
        raise EtokitError(f"{run_dir} has no evaluation of {name!r} (evaluated: {', '.join(evaluated) or 'none yet'})")
    panels = {}
    for split in EVAL_SPLITS:
        out = evaluated[name][split]
        rows = out.get("per_task")
        if rows is None:  # recorded before per-task results were kept
            rows = per_task(read_jsonl(run_dir / out["file"], "trajectory"))
        panels[split] = panel_from_per_task(f"{run_dir}:{name}", None, split, rows)
    return panels



def _published(repo: str, config: str, split: str, records) -> str | None:
    """The head commit of dataset ``repo`` if it already holds exactly ``records`` as
    ``config``/``split`` with its card entry, else None."""
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from etokit.data import to_dataset
    from etokit.hub.publish import STATS_FILE

    api = HfApi()
    try:
        head = api.dataset_info(repo).sha
        stats = json.loads(Path(api.hf_hub_download(repo, STATS_FILE, repo_type="dataset", revision=head)).read_text())
        if split not in stats.get(config, {}):
            return None
        remote = datasets.load_dataset(repo, config, split=split, revision=head)
    except (HfHubHTTPError, OSError, ValueError):  # no repo, no card, no such split yet
        return None
    return head if remote.to_list() == to_dataset(records).to_list() else None


_TEMP_NAME = re.compile(r"^\..+\.([0-9a-f]{8}\.tmp|tmp-\d+)$")  # atomic_write's temp files (and older ones)


class _RunLock:
    """An exclusive lock on the run folder for as long as this process runs it: two `etokit run
    --resume` on one folder would both append the same episodes. The kernel drops the lock when
    the process dies, however it dies, so a crash never leaves the folder locked."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self) -> "_RunLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise EtokitError(f"{self.path.parent} is in use by another etokit run (pid {holder}); wait for it to "
                              "finish or stop it before --resume") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def _remove_stale_temps(run_dir: Path) -> None:
    """Temp files of atomic writes that a crash left before their rename: never read, only clutter.
    Only called with the run lock held, so no live writer owns them."""
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if d != "checkpoints"]  # the trainers' own business
        for name in files:
            if _TEMP_NAME.match(name):
                Path(root, name).unlink(missing_ok=True)


def _train_stage(policy: str) -> str:
    return "bc" if policy == "bc" else f"dpo-{policy.split('-')[1]}"


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip()) if path.exists() else 0


def _metrics(result) -> dict[str, Any]:
    def rounded(v):  # floats at any depth (the intervals are nested)
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return round(v, 6) if isinstance(v, float) else v

    return rounded(result.to_dict())


def _eval_outputs(played) -> dict[str, Any]:
    """An evaluation's record: the summary (with intervals) and each task's result. The model is
    the stage's (PUSH_TO@stage, its commit in the push stage), not repeated here: the record must
    not depend on the repo, so that a resumed run's equals an uninterrupted one's."""
    from etokit.evaluate import per_task, summarize

    return {**_metrics(summarize(played)), "per_task": per_task(played)}


def _vs(base: list[dict[str, Any]], other: list[dict[str, Any]], base_name: str, name: str,
        split: str) -> dict[str, Any]:
    """``name`` against ``base`` task for task (reward x100): the paired-bootstrap difference."""
    from etokit.evaluate import compare_panels, panel_from_per_task

    a = panel_from_per_task(base_name, None, split, base)
    b = panel_from_per_task(name, None, split, other)
    # A run's evaluations share their panel (same config, env errors stop the stage); were one to
    # differ, the record lists the tasks left out rather than ending a finished run.
    return _metrics(compare_panels(a, b, allow_mismatch=True).diff)


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _track(items, what: str, *, total: int | None = None, skip=frozenset()):
    from rich.progress import track

    items = [i for i in items if i not in skip] if not hasattr(items, "__next__") else items
    return track(items, description=what, total=total, console=console, transient=True)


def _summary(outputs: dict[str, Any]) -> str:
    if "stats" in outputs:
        s = outputs["stats"]
        return f"pairs {s['pairs']} (win {s['win']} / tie {s['tie']} / lose {s['lose']})"
    if "test-unseen" in outputs:
        from etokit.evaluate import format_ci

        return " ".join(f"{split} {format_ci(outputs[split].get('avg_reward_ci'), outputs[split]['avg_reward'])}"
                        for split in EVAL_SPLITS)
    if "commit" in outputs:
        return f"{outputs['repo']}@{outputs['revision']} {outputs['commit'][:12]}"
    if "data_commit" in outputs:
        return f"{outputs['repo']} {outputs['split']}: {outputs['rows']} rows"
    if "avg_reward" in outputs:
        return f"avg reward {outputs['avg_reward']:.1f}, success {outputs['success_rate']:.0%}"
    return ""


def _reward(entry: dict[str, Any]) -> str:
    from etokit.evaluate import format_ci

    return format_ci(entry.get("avg_reward_ci"), entry["avg_reward"])


def _success(entry: dict[str, Any]) -> str:
    from etokit.evaluate import format_ci

    return format_ci(entry.get("success_rate_ci"), entry["success_rate"], percent=True)


def _vs_bc(entry: dict[str, Any]) -> str:
    """``+3.1 [+0.4, +5.9] 7/2/41``: the paired difference from BC and the tasks up / down / same."""
    d = entry.get("vs_bc")
    if not d:
        return "-"
    return f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] {d['up']}/{d['down']}/{d['same']}"


def _card_row(row: dict[str, Any], vs_bc: bool = True) -> dict[str, str]:
    """One row of a model card's eval table; ``vs_bc``: with the columns of the difference from BC
    (a card with iterations; BC's own cell is "-")."""
    out = {"Stage": "BC" if row["model"] == "bc" else row["model"]}
    for split, label in (("test-seen", "seen"), ("test-unseen", "unseen")):
        out[f"{label} reward x100 [95% CI]"] = _reward(row[split])
        out[f"{label} success [95% CI]"] = _success(row[split])
        if vs_bc:
            out[f"{label} vs BC [95% CI] up/down/same"] = _vs_bc(row[split])
    return out


CARD_EVAL_NOTE = ("Means over the test tasks (one greedy episode each) with their 95% percentile-bootstrap "
                  "interval over tasks (10,000 resamples). *vs BC*: the mean per-task difference in reward x100 "
                  "from the BC checkpoint on the same tasks, its 95% paired-bootstrap interval, and how many tasks "
                  "went up / down / stayed the same.")


def reward_chart(rows: list[dict[str, Any]], width: int = 40) -> str:
    """Average reward (x100) per stage as a text bar chart (no plotting dependency), each value
    followed by its 95% interval over tasks."""
    lines = []
    for row in rows:
        label = "BC" if row["model"] == "bc" else row["model"]
        for split in EVAL_SPLITS:
            value = row[split]["avg_reward"]
            bar = "#" * round(width * max(0.0, min(value, 100.0)) / 100)
            ci = row[split].get("avg_reward_ci")
            tail = f" [{ci['lo']:.1f}, {ci['hi']:.1f}]" if ci else ""
            lines.append(f"{label:<8} {split:<12} {bar:<{width}} {value:5.1f}{tail}")
    return "\n".join(lines)


def results_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="ETO results (average reward x100 / success rate, 95% bootstrap intervals over tasks; "
                        "vs BC: paired difference, tasks up/down/same)")
    table.add_column("stage", style="bold")
    for split in EVAL_SPLITS:
        table.add_column(f"{split} reward", justify="right")
        table.add_column(f"{split} success", justify="right")
        table.add_column(f"{split} vs BC", justify="right")
    table.add_column("pairs win/tie/lose", justify="right")
    for row in rows:
        p = row.get("pairs")
        table.add_row("BC" if row["model"] == "bc" else row["model"],
                      *[v for split in EVAL_SPLITS for v in (_reward(row[split]), _success(row[split]),
                                                             _vs_bc(row[split]))],
                      f"{p['win']}/{p['tie']}/{p['lose']}" if p else "-")
    return table
