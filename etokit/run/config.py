"""`etokit run`'s config: what the run does (env, data, iterations, exploration, pairs) and the
config hash a resumed run must match."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from etokit.errors import EtokitError


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
