"""TextWorldExpress (Jansen & Côté 2022): fast offline text games with gold paths. Not in the ETO
paper; etokit's default environment for CPU demos and tests (a whole episode takes milliseconds).

The default game is a small CookingWorld (one room, two ingredients, a few distractors): the
gold path is 10-15 actions, so a tiny model has something learnable and exploration is cheap.
The simulator's train/dev/test seed folds map to train/test-seen/test-unseen.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from etokit.envs.base import SPLITS, Reset, Step
from etokit.errors import EtokitError

DEFAULT_GAME = "cookingworld"
DEFAULT_PARAMS = "numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,limitInventorySize=0"
_FOLDS = {"train": "train", "test-seen": "dev", "test-unseen": "test"}


class TextWorldExpressEnv:
    name = "textworld-express"

    def __init__(self, game: str = DEFAULT_GAME, params: str = DEFAULT_PARAMS, max_steps: int = 30, heap: str = "256m"):
        from textworld_express.constants import BASEPATH, JAR_PATH

        from etokit.envs.worker import JavaServer

        self.game, self.params, self.max_steps = game, params, max_steps
        self._java = JavaServer(JAR_PATH, BASEPATH, heap=heap)
        self._server = self._java.jvm.textworldexpress.runtime.PythonInterface()
        message = self._server.load(game, params)
        if message:
            self.close()
            raise EtokitError(f"textworld-express: game {game!r} with params {params!r}: {message}")
        self._seeds = {
            "train": [str(s) for s in self._server.getSeedsTrain()],
            "test-seen": [str(s) for s in self._server.getSeedsDev()],
            "test-unseen": [str(s) for s in self._server.getSeedsTest()],
        }
        self._fold_of = {s: split for split, seeds in self._seeds.items() for s in seeds}
        self._task_id: str | None = None
        self._steps = 0
        self._done = True
        self._reward = 0.0
        self._gold: dict[str, list[str]] = {}
        self._valid: list[str] = []

    @classmethod
    def check(cls) -> tuple[bool, str]:
        try:
            import textworld_express  # noqa: F401
        except ImportError:
            return False, "pip install textworld-express  (or: pip install 'etokit[envs]')"
        if shutil.which("java") is None:
            return False, "needs Java (11+) on PATH, e.g. apt-get install openjdk-17-jre-headless"
        return True, "textworld-express (Java found)"

    def task_ids(self, split: str) -> list[str]:
        if split not in _FOLDS:
            raise EtokitError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return list(self._seeds[split])

    def _load(self, task_id: str, gold: bool) -> dict[str, Any]:
        split = self._fold_of.get(task_id)
        if split is None:
            raise EtokitError(f"textworld-express: unknown task id {task_id!r} (a seed of the train, dev or test fold)")
        return json.loads(self._server.generateNewGameJSON(int(task_id), _FOLDS[split], gold))

    def reset(self, task_id: str, max_steps: int | None = None) -> Reset:
        state = self._load(task_id, gold=False)
        self._task_id, self._steps, self._done, self._reward = task_id, 0, False, 0.0
        self._limit = max_steps or self.max_steps
        self._valid = state.get("validActions", [])
        return Reset(
            task_id=task_id,
            instruction=self._server.getTaskDescription(),
            observation=state["observation"].strip(),
            info={"game": self.game},
        )

    def step(self, action: str) -> Step:
        if self._done:
            raise EtokitError("textworld-express: step() after the episode ended; call reset(task_id) first")
        state = json.loads(self._server.stepJSON(action))
        self._steps += 1
        self._valid = state.get("validActions", [])
        # The game's score is the fraction of the recipe done; a failed game (wrong cut, eating
        # too early) can go negative, which the reward clips to 0.
        self._reward = min(1.0, max(0.0, float(state["score"])))
        self._done = (
            bool(state["tasksuccess"] or state["taskfailure"]) or self._reward >= 1.0 or self._steps >= self._limit
        )
        return Step(
            observation=state["observation"].strip(),
            reward=self._reward,
            done=self._done,
            info={"score": state["score"], "steps": self._steps, "won": bool(state["tasksuccess"])},
        )

    def expert(self, task_id: str) -> list[str] | None:
        if task_id not in self._gold:
            self._load(task_id, gold=True)
            self._gold[task_id] = [str(a) for a in self._server.getGoldActionSequence()]
            self._done = True  # loading the gold path replaced the game in progress
        return list(self._gold[task_id])

    def valid_actions(self) -> list[str]:
        """The actions the game accepts now (the simulator sends them with every state)."""
        return list(self._valid)

    def close(self) -> None:
        if getattr(self, "_java", None) is not None:
            self._java.close()
            self._java = None
