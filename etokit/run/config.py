"""`etokit run`'s config: what the run does (env, data, iterations, exploration, pairs), the
training recipes' own configs as its sections ``bc`` / ``dpo`` with DPO's per-iteration
``dpo_schedule``, and the config hash a resumed run must match.

The run makes each stage's recipe config from its section (:meth:`RunConfig.bc_config`,
:meth:`RunConfig.dpo_config`) and launches the recipe on it; the fields it fills in itself
(``RUN_SETS``) are refused in a section."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from etokit.errors import EtokitError
from etokit.train.config import BCConfig, DPOConfig
from etokit.train.model_loading import DTYPES

# Recipe options the run sets for each stage, and where their value comes from: a section that sets
# one is refused (the run would silently override it).
RUN_SETS = {
    "model": "the base model (base_model) for BC, the previous policy for DPO",
    "model_revision": "base_model_revision",
    "data": "the run's expert data (BC) and pairs of the iteration (DPO)",
    **{name: "the run's own data files" for name in ("data_config", "data_split", "data_env", "data_revision")},
    "expert_reward": "the run-level expert_reward",
    "output_dir": "<run_dir>/models/<stage>",
    "max_length": "the run-level max_length (both recipes)",
    "seed": "the run-level seed",
    "resume": "always on: a resumed run continues the stage's training",
    **{name: "the run pushes each checkpoint itself (push_to, private)" for name in ("push_to", "revision", "private")},
}
DPO_RUN_SETS = {
    **RUN_SETS,
    "ref_model": "the policy that explored (ETO)",
    "ref_model_revision": "the policy that explored (ETO)",
    "ref_cache_dir": "<run_dir>/ref-cache",
    "iteration": "the iteration",
    "beta": "dpo_schedule.beta, per iteration",
    "learning_rate": "dpo_schedule.learning_rate, per iteration",
}


def _refuse_run_set(section, name: str, run_sets: dict[str, str]) -> None:
    """The stage's fields that ``run_sets`` names must keep their defaults: the run sets them."""
    for f in dataclasses.fields(section):
        if f.name in run_sets and getattr(section, f.name) != (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()
        ):
            raise EtokitError(f"config key {name}.{f.name}: the run sets it ({run_sets[f.name]}); remove it")


@dataclass(kw_only=True)
class BCStage(BCConfig):
    """The run's BC stage: the BC recipe's config with ETO's global batch of 64 (4 x 16) and no
    tracker. Its RUN_SETS fields are the run's; they are filled in per stage (RunConfig.bc_config),
    where the recipe's own checks run."""

    gradient_accumulation_steps: int = field(default=16, metadata={"gt": 0})
    report_to: str = "none"

    def __post_init__(self):
        _refuse_run_set(self, "bc", RUN_SETS)


@dataclass(kw_only=True)
class DPOStage(DPOConfig):
    """The run's DPO stages: the DPO recipe's config with no tracker; beta and learning rate come
    from the run's dpo_schedule, the other DPO_RUN_SETS fields from the run (RunConfig.dpo_config)."""

    beta: float | None = field(default=None, metadata={"help": "per iteration: dpo_schedule.beta"})
    learning_rate: float | None = field(default=None, metadata={"help": "per iteration: dpo_schedule.learning_rate"})
    report_to: str = "none"

    def __post_init__(self):
        _refuse_run_set(self, "dpo", DPO_RUN_SETS)


@dataclass
class DPOSchedule:
    """DPO's values per iteration: iteration k takes the k-th, the last one repeats (ETO: beta 0.1 and
    lr 1e-6 at iteration 1, then 0.5 and 5e-7)."""

    beta: list[float] = field(default_factory=lambda: [0.1, 0.5], metadata={"gt": 0})
    learning_rate: list[float] = field(default_factory=lambda: [1e-6, 5e-7], metadata={"gt": 0})

    def __post_init__(self):
        for name in ("beta", "learning_rate"):
            if not getattr(self, name):
                raise EtokitError(f"--dpo-schedule.{name.replace('_', '-')} needs at least one value")

    def at(self, k: int) -> tuple[float, float]:
        """(beta, learning rate) of iteration ``k`` (1-based)."""
        pick = lambda values: values[min(k, len(values)) - 1]  # noqa: E731
        return pick(self.beta), pick(self.learning_rate)


def _recipe_config(cls, section, **stage: Any):
    """``cls`` (the recipe's config) from the run's ``section`` and the values the run sets for the
    stage; the recipe's own checks run here."""
    return cls(**{**dataclasses.asdict(section), **stage})


@dataclass
class RunConfig:
    """`etokit run` options. ETO's defaults (paper / official scripts) unless noted."""

    run_dir: str = field(default="", metadata={"help": "local folder of this run: manifest, data, checkpoints"})
    push_to: str = field(
        default="",
        metadata={"help": "Hub model repo NAMESPACE/NAME; every checkpoint is a branch + tag of it (bc, iter-1, ...)"},
    )
    dataset_prefix: str | None = field(
        default=None, metadata={"help": "datasets go to PREFIX-expert, PREFIX-explore, PREFIX-pairs (default: push_to)"}
    )
    env: str = field(
        default="textworld-express", metadata={"help": "webshop, scienceworld, alfworld, textworld-express"}
    )
    env_options: dict = field(default_factory=dict, metadata={"help": "keyword options of the environment"})
    base_model: str = field(
        default="",
        metadata={
            "help": "model to clone the expert into (folder or Hub repo); "
            "empty: a tiny Llama built by init-model from the expert text"
        },
    )
    base_model_revision: str | None = None
    init_model_size: str = field(default="tiny", metadata={"choices": ["tiny", "small"]})
    expert_data: str | None = field(
        default=None,
        metadata={"help": "expert trajectories: local file or Hub dataset repo; empty: play the env's expert on train"},
    )
    expert_data_config: str | None = None
    expert_data_split: str | None = field(
        default=None, metadata={"help": "Hub split (default: the env's, e.g. scienceworld of the paper's data)"}
    )
    expert_data_revision: str | None = None
    expert_reward: float | None = field(
        default=None,
        metadata={
            "min": 0,
            "max": 1,
            "help": "reward stated for official expert rows without one (WebShop's Hub copy); recorded in the cards",
        },
    )
    train_tasks: int | None = field(
        default=None, metadata={"gt": 0, "help": "first N train tasks (expert + exploration); default all"}
    )
    eval_tasks: int | None = field(default=None, metadata={"gt": 0, "help": "first N tasks of each test split"})
    iterations: int = field(default=3, metadata={"help": "ETO iterations after BC"})
    early_stopping: bool = field(
        default=False, metadata={"help": "stop once test-unseen reward drops vs the previous iteration"}
    )
    seed: int = 0
    # exploration and evaluation: greedy, 1-shot prompt (the paper)
    explore_batch_size: int = field(default=16, metadata={"gt": 0})
    eval_batch_size: int | None = field(
        default=None,
        metadata={
            "gt": 0,
            "help": "episodes in flight in an evaluation, test-seen and test-unseen in one pool "
            "(default: explore_batch_size)",
        },
    )
    max_new_tokens: int = field(default=256, metadata={"gt": 0})
    max_steps: int | None = field(default=None, metadata={"gt": 0, "help": "agent turns per episode (env default)"})
    icl: bool = field(
        default=True, metadata={"help": "the 1-shot example in exploration/evaluation prompts (paper: on)"}
    )
    generation_dtype: str = field(
        default="float32",
        metadata={
            "choices": list(DTYPES),
            "help": "precision of the policy in the explore and eval stages (etokit explore --dtype; auto: the "
            "checkpoint's). The paper explores and evaluates in half precision; bfloat16 halves the bytes read "
            "per token, but greedy replies can differ from float32's where two tokens are within its rounding",
        },
    )
    # The training stages: each recipe's own config (`etokit train bc` / `etokit train dpo` options, YAML
    # sections `bc:` / `dpo:`, flags --bc.NAME / --dpo.NAME) with ETO's values; the run sets the data,
    # models, output folders and pushes of each stage itself (RUN_SETS).
    bc: BCStage = field(
        default_factory=BCStage,
        metadata={
            "help": "the BC recipe's options (etokit.recipes.train_bc; ETO's SFT script: lr 2e-5, 3 epochs, global "
            "batch 4 x 16, 3% warmup, cosine)"
        },
    )
    dpo: DPOStage = field(
        default_factory=DPOStage,
        metadata={
            "help": "the DPO recipe's options (etokit.recipes.train_dpo; ETO: 3 epochs, 32 pairs a step, 10% warmup); "
            "beta and learning rate per iteration in dpo_schedule"
        },
    )
    dpo_schedule: DPOSchedule = field(
        default_factory=DPOSchedule, metadata={"help": "DPO's beta and learning rate per iteration"}
    )
    # contrastive pairs (paper App. B): "step" plays step-wise episodes from the expert's first t-1 steps
    # instead of whole episodes, "mixture" plays both and pairs both
    pairs_mode: str = field(default="trajectory", metadata={"choices": ["trajectory", "step", "mixture"]})
    # the pair rule (etokit.pairs.PairRule): the defaults are construct_preference.py's, the others
    # documented deviations recorded on the pairs and in the dataset card
    pairs_rewards: str = field(
        default="official",
        metadata={
            "choices": ["official", "stored"],
            "help": "official: ScienceWorld/ALFWorld experts score 1.0; stored: compare stored rewards",
        },
    )
    pairs_expert_observation: str = field(
        default="drop-pair",
        metadata={
            "choices": ["drop-pair", "trim"],
            "help": "an expert ending on an observation: drop the pair (official) or trim it",
        },
    )
    steps_per_task: int | None = field(
        default=None, metadata={"gt": 0, "help": "step-wise episodes per task and iteration (None: every step t)"}
    )
    max_length: int = field(default=4096, metadata={"gt": 0, "help": "training tokens per sequence"})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate config file for training"})
    private: bool = False

    # Keys of the flat config before the recipes' configs became its sections: an old YAML names the new key.
    RENAMED: ClassVar[dict[str, str]] = {
        **{
            f"bc_{name}": f"bc.{name}"
            for name in (
                "learning_rate",
                "num_epochs",
                "per_device_batch_size",
                "gradient_accumulation_steps",
                "warmup_ratio",
                "max_steps",
            )
        },
        "bc_lr_scheduler": "bc.lr_scheduler",
        "bc_args": "bc.*",
        **{f"dpo_{name}": f"dpo.{name}" for name in ("num_epochs", "batch_size", "warmup_ratio", "max_steps")},
        "dpo_beta": "dpo_schedule.beta",
        "dpo_learning_rate": "dpo_schedule.learning_rate",
        "dpo_args": "dpo.*",
    }

    def __post_init__(self):
        for name in ("run_dir", "push_to"):
            if not getattr(self, name):
                raise EtokitError(f"--{name.replace('_', '-')} is required")
        if self.push_to.count("/") != 1:
            raise EtokitError(f"--push-to must be NAMESPACE/NAME, got {self.push_to!r}")
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

            load_source(
                self.expert_data, "trajectory", env=self.env, expert_reward=self.expert_reward, option="--expert-data"
            )

    @property
    def datasets(self) -> dict[str, str]:
        prefix = self.dataset_prefix or self.push_to
        return {kind: f"{prefix}-{kind}" for kind in ("expert", "explore", "pairs")}

    def dpo_hparams(self, k: int) -> tuple[float, float]:
        """(beta, learning rate) of iteration ``k`` (1-based)."""
        return self.dpo_schedule.at(k)

    def bc_config(self, **stage: Any) -> BCConfig:
        """The BC recipe's config for the run's BC stage: the ``bc`` section, the run-level
        ``max_length`` / ``seed``, resumable, and ``stage`` (model, data, output_dir, ...)."""
        return _recipe_config(BCConfig, self.bc, max_length=self.max_length, seed=self.seed, resume=True, **stage)

    def dpo_config(self, k: int, **stage: Any) -> DPOConfig:
        """The DPO recipe's config for iteration ``k``: the ``dpo`` section with the iteration's beta and
        learning rate, the run-level ``max_length`` / ``seed``, resumable, and ``stage``."""
        beta, learning_rate = self.dpo_hparams(k)
        return _recipe_config(
            DPOConfig,
            self.dpo,
            beta=beta,
            learning_rate=learning_rate,
            iteration=k,
            max_length=self.max_length,
            seed=self.seed,
            resume=True,
            **stage,
        )


# Keys added after runs were made, with the default that does what those runs did: hashed only when set
# otherwise, so a run folder made before a key existed still resumes.
_LATER_KEYS = {"eval_batch_size": None, "generation_dtype": "float32"}


def config_hash(cfg: RunConfig) -> str:
    """What the stages' outputs depend on: every key, the options of the `bc` / `dpo` sections and the
    DPO schedule included. ``iterations`` and ``early_stopping`` are left out: a finished run can be
    extended with more iterations on --resume."""
    data = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("iterations", "early_stopping") and not (k in _LATER_KEYS and v == _LATER_KEYS[k])
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
