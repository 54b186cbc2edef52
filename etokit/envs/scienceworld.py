"""ScienceWorld (Wang et al. 2022) as ETO runs it: "easy" simplification, a per-task step limit,
reward = the best score of the episode in [0, 1] (a failed task's negative score counts as 0).

Speed: the official wrapper's ``step()`` also asks the JVM for every valid action-object
combination (~2,900 strings per step) and the look/inventory text, which caps it near 9 steps/s.
This adapter talks to the same server object over py4j but only asks for the observation, score
and completion (valid actions on request), ~10x faster; see bench/env_step.py.

Splits. By default (``splits="official"``) the task index is ETO's own, shipped verbatim as
``data/scienceworld_official.json``: the (task name, variation) pairs and their order from
github.com/Yifan-Song793/ETO at commit 9cd80875322d255db0c9e20600b22f88450ca0d6,
``eval_agent/data/sciworld/train_indices.json`` (train, 1483), ``dev_indices.json`` (test-seen, 194)
and ``test_indices.json`` (test-unseen, 211). License: that commit has no LICENSE file and its
README states none; the index is a list of task names and integers of ScienceWorld (Apache-2.0).

The official index is not disjoint: 54 of the 194 test-seen ids are also train ids
(``OFFICIAL_TRAIN_TEST_SEEN_OVERLAP``). Its train split draws 357 ids from the simulator's *dev*
variations, test-seen only dev variations, test-unseen the first <= 10 *test* variations of each
task type; test-unseen shares no id with the other two.

``splits="derived"`` (``data/scienceworld_derived.json``; regenerate with
``python -m etokit.envs.scienceworld``) is for users who want disjoint splits of the same sizes:
test-unseen as the official; test-seen <= 10 variations per task type drawn (seeded) from its dev
list minus the 5 the official test-seen leaves out (``_OFFICIAL_DEV_DROPPED``); train a seeded
sample of 1483 from the simulator's train lists only, so no id is in two splits.

Task ids are ``"<task-name>_<variation>"`` with the simulator's task name, e.g. ``"boil_18"``;
official names (``"task-1-boil"``) are mapped the way the simulator's ``infer_task`` does.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from functools import lru_cache
from importlib import resources

from etokit.envs.base import SPLITS, Reset, Step
from etokit.errors import EtokitError

SPLIT_FILES = {"official": "scienceworld_official.json", "derived": "scienceworld_derived.json"}

# Per-task step limits of the official ETO code (its max_steps.json), keyed by simulator task name.
MAX_STEPS = {
    "boil": 100,
    "change-the-state-of-matter-of": 80,
    "freeze": 80,
    "melt": 80,
    "measure-melting-point-known-substance": 120,
    "use-thermometer": 30,
    "power-component": 20,
    "power-component-renewable-vs-nonrenewable-energy": 30,
    "test-conductivity": 30,
    "test-conductivity-of-unknown-substances": 30,
    "find-animal": 15,
    "find-living-thing": 15,
    "find-non-living-thing": 15,
    "find-plant": 15,
    "grow-fruit": 60,
    "grow-plant": 30,
    "chemistry-mix": 60,
    "chemistry-mix-paint-secondary-color": 15,
    "chemistry-mix-paint-tertiary-color": 30,
    "lifespan-longest-lived": 10,
    "lifespan-longest-lived-then-shortest-lived": 12,
    "lifespan-shortest-lived": 10,
    "identify-life-stages-1": 30,
    "identify-life-stages-2": 30,
}
OFFICIAL_SIZES = {"train": 1483, "test-seen": 194, "test-unseen": 211}
OFFICIAL_TRAIN_TEST_SEEN_OVERLAP = 54
_PER_TASK_EVAL = 10
_OFFICIAL_DEV_DROPPED = {
    "boil": [18],
    "power-component": [10, 14],
    "power-component-renewable-vs-nonrenewable-energy": [11, 12],
}


def task_id_of(task: str, variation: int) -> str:
    return f"{task}_{variation}"


def parse_task_id(task_id: str) -> tuple[str, int]:
    task, _, variation = task_id.rpartition("_")
    if task not in MAX_STEPS or not variation.isdigit():
        raise EtokitError(
            f"scienceworld: bad task id {task_id!r}; expected '<task-name>_<variation>' "
            f"with a task name among: {', '.join(MAX_STEPS)}"
        )
    return task, int(variation)


def simulator_task_name(official_name: str) -> str:
    """``"task-10-measure-melting-point-(known-substance)"`` -> ``"measure-melting-point-known-substance"``
    (the simulator's own ``infer_task`` rule: drop the ``task-N-`` prefix and the parentheses)."""
    return re.sub(r"task-(\d|a|b)+-|[()]", "", official_name)


@lru_cache(maxsize=2)
def load_splits(kind: str = "official") -> dict[str, list[str]]:
    if kind not in SPLIT_FILES:
        raise EtokitError(f"scienceworld: unknown splits {kind!r}; valid: {', '.join(SPLIT_FILES)}")
    data = json.loads(resources.files("etokit.envs").joinpath("data", SPLIT_FILES[kind]).read_text())
    if kind == "official":
        return {split: [task_id_of(simulator_task_name(t), v) for t, v in data[split]] for split in SPLITS}
    return {split: data[split] for split in SPLITS}


class ScienceWorldEnv:
    name = "scienceworld"
    max_steps = max(MAX_STEPS.values())  # set to the task's own limit by reset()

    def __init__(
        self, simplification: str = "easy", max_steps: int | None = None, heap: str = "512m", splits: str = "official"
    ):
        from scienceworld.constants import BASEPATH, JAR_PATH

        from etokit.envs.worker import JavaServer

        self._splits = load_splits(splits)  # first: a bad option fails before a JVM starts
        self.simplification = simplification
        self._max_steps_override = max_steps
        self._java = JavaServer(JAR_PATH, BASEPATH, heap=heap)
        self._server = self._java.jvm.scienceworld.runtime.pythonapi.PythonInterface()
        self._gold: dict[str, list[str]] = {}
        self._done = True
        self._steps = 0
        self._reward = 0.0

    @classmethod
    def check(cls) -> tuple[bool, str]:
        try:
            import scienceworld  # noqa: F401
        except ImportError:
            return False, "pip install scienceworld  (or: pip install 'etokit[envs]')"
        if shutil.which("java") is None:
            return False, "needs Java (11+) on PATH, e.g. apt-get install openjdk-17-jre-headless"
        return True, "scienceworld (Java found)"

    @property
    def jvm_pid(self) -> int:
        return self._java.pid

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise EtokitError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return list(self._splits[split])

    def _load(self, task_id: str, gold: bool) -> None:
        task, variation = parse_task_id(task_id)
        self._server.load(task, variation, self.simplification, gold)
        # As the official reset(): back to the start, then one "look around" tick.
        self._server.reset()
        self._server.step("look around")

    def reset(self, task_id: str, max_steps: int | None = None) -> Reset:
        task, _ = parse_task_id(task_id)
        self._load(task_id, gold=False)
        self.max_steps = self._max_steps_override or MAX_STEPS[task]  # the agent's limit
        self._limit = max_steps or self.max_steps
        self._done, self._steps, self._reward = False, 0, 0.0
        return Reset(
            task_id=task_id,
            instruction=str(self._server.getTaskDescription()).strip(),
            observation="",
            info={"task": task, "max_steps": self.max_steps},
        )

    def step(self, action: str) -> Step:
        if self._done:
            raise EtokitError("scienceworld: step() after the episode ended; call reset(task_id) first")
        observation = str(self._server.step(action))
        score = float(self._server.getScore())
        completed = bool(self._server.getCompleted())
        self._steps += 1
        self._reward = max(self._reward, min(1.0, max(0.0, score)))
        self._done = completed or score < 0 or self._steps >= self._limit
        return Step(
            observation=observation.strip(),
            reward=self._reward,
            done=self._done,
            info={"score": score, "steps": self._steps},
        )

    def expert(self, task_id: str) -> list[str] | None:
        """The simulator's gold action sequence. It may answer "ambiguous request" prompts with a
        bare option number ("0"), which is a valid action in the state that asked."""
        if task_id not in self._gold:
            task, variation = parse_task_id(task_id)
            self._server.load(task, variation, self.simplification, True)
            self._gold[task_id] = [str(a) for a in self._server.getGoldActionSequence()]
            self._done = True  # the load replaced any episode in progress
        return list(self._gold[task_id])

    def valid_actions(self) -> list[str]:
        """Valid action-object combinations now (thousands of strings: slow, so only on request)."""
        return [str(a) for a in self._server.getValidActionObjectCombinations()]

    def close(self) -> None:
        if getattr(self, "_java", None) is not None:
            self._java.close()
            self._java = None


def derive_splits(server, seed: int = 0) -> dict[str, list[str]]:
    """The disjoint ``"derived"`` split index (module docstring), from the simulator's variation lists."""
    train_pool, seen, unseen = [], [], []
    for task in MAX_STEPS:
        server.load(task, 0, "easy", False)
        train_pool += [task_id_of(task, v) for v in sorted(server.getVariationsTrain())]
        dropped = set(_OFFICIAL_DEV_DROPPED.get(task, []))
        dev = [v for v in sorted(server.getVariationsDev()) if v not in dropped]
        picked = random.Random(f"{seed}:{task}:test-seen").sample(dev, min(_PER_TASK_EVAL, len(dev)))
        seen += [task_id_of(task, v) for v in sorted(picked)]
        unseen += [task_id_of(task, v) for v in sorted(server.getVariationsTest())[:_PER_TASK_EVAL]]
    train = random.Random(f"{seed}:train").sample(train_pool, OFFICIAL_SIZES["train"])
    order = {t: i for i, t in enumerate(MAX_STEPS)}
    train.sort(key=lambda t: (order[parse_task_id(t)[0]], parse_task_id(t)[1]))
    return {"train": train, "test-seen": seen, "test-unseen": unseen}


def _write_splits() -> None:
    from pathlib import Path

    from scienceworld.constants import BASEPATH, JAR_PATH

    from etokit.envs.worker import JavaServer

    java = JavaServer(JAR_PATH, BASEPATH)
    try:
        splits = derive_splits(java.jvm.scienceworld.runtime.pythonapi.PythonInterface())
    finally:
        java.close()
    for split, ids in splits.items():
        print(f"{split}: {len(ids)} (official {OFFICIAL_SIZES[split]})")
    path = Path(__file__).parent / "data" / SPLIT_FILES["derived"]
    from etokit.durable_io import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps({"seed": 0, **splits}, indent=0) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    _write_splits()
