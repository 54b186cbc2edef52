"""ALFWorld (Shridhar et al., 2021): text households built from ALFRED tasks, played through the
real ``alfworld`` TextWorld games (the same wrappers ``AlfredTWEnv`` uses).

Data: the standard download (``alfworld-download``) puts ALFRED task folders, each with a
``game.tw-pddl``, under ``$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}`` (3,321 /
140 / 134 solvable games, as ETO uses them); they map to etokit's train / test-seen /
test-unseen. ``data_dir`` points elsewhere, e.g. at games written with
``etokit.envs.alfworld_games``. Task ids are the game folders relative to ``data_dir``.

Reward = won (0/1). Invalid actions get the game's "Nothing happens." and count as a step;
40 steps at most (ETO). The expert is the game's stored walkthrough (the hand-coded expert's
actions written by ``alfworld-generate``), else the hand-coded expert played live.

ALFWorld 0.4's grammar says "move X to Y" where ETO's data (alfworld 0.3) says
"put X in/on Y": both are accepted, and expert actions are given in ETO's form.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from etokit.envs.base import SPLITS, Reset, Step
from etokit.errors import EtokitError

SPLIT_DIRS = {"train": "train", "test-seen": "valid_seen", "test-unseen": "valid_unseen"}
INSTALL_HINT = "pip install alfworld (compiles native parts, ~3 min), then alfworld-download for the games"
_PUT = re.compile(r"^put (.+?) (?:in/on|in|on) (.+)$")
_MOVE = re.compile(r"^move (.+?) to (.+)$")


def default_data_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld"))) / "json_2.1.1"


def _strip_arrival(obs: str) -> str:
    # ETO drops the "You arrive at loc N. " prefix older grammars put before the receptacle text.
    return obs[obs.find(". ") + 2 :] if obs.startswith("You arrive at loc ") else obs


def to_eto_action(action: str) -> str:
    m = _MOVE.match(action)
    return f"put {m.group(1)} in/on {m.group(2)}" if m else action


# A loop guard for the hand-coded expert played live (it can cycle when stuck), not the agent's
# step limit: an expert path longer than the agent's 40 steps is still a demonstration.
EXPERT_MAX_STEPS = 200


class AlfWorldEnv:
    name = "alfworld"
    max_steps = 40

    def __init__(self, data_dir: str | os.PathLike | None = None, max_steps: int | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        if max_steps is not None:
            self.max_steps = int(max_steps)
        self._games: dict[str, list[str]] | None = None
        self._env = None
        self._task_id: str | None = None
        self._steps = 0
        self._done = True
        self._admissible: list[str] = []

    @classmethod
    def check(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("alfworld") is None:
            return False, INSTALL_HINT
        data = default_data_dir()
        found = data.is_dir() and any((data / d).is_dir() for d in SPLIT_DIRS.values())
        return True, f"alfworld installed; games {'found' if found else 'not found'} at {data}"

    # -- tasks ------------------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise EtokitError(f"alfworld: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if self._games is None:
            self._games = {s: self._collect(d) for s, d in SPLIT_DIRS.items()}
        return self._games[split]

    def _collect(self, split_dir: str) -> list[str]:
        """Solvable games of one split, with ``AlfredTWEnv.collect_game_files``'s filters."""
        root = self.data_dir / split_dir
        games = []
        for game in sorted(root.rglob("game.tw-pddl")) if root.is_dir() else []:
            folder = game.parent
            if "movable" in str(folder) or "Sliced" in str(folder) or not (folder / "traj_data.json").exists():
                continue
            if json.loads(game.read_text()).get("solvable"):
                games.append(folder.relative_to(self.data_dir).as_posix())
        return games

    def game_file(self, task_id: str) -> Path:
        path = self.data_dir / task_id / "game.tw-pddl"
        if not path.is_file():
            raise EtokitError(f"alfworld: unknown task id {task_id!r} (no {path})")
        return path

    # -- episode ----------------------------------------------------------------------------
    def _make_env(self, expert: bool = False):
        if importlib.util.find_spec("alfworld") is None:
            raise EtokitError(f"alfworld is not installed: {INSTALL_HINT}")
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
        from textworld.envs import PddlEnv

        env = PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"]))
        env = AlfredInfos(AlfredDemangler(env, shuffle=False))
        return AlfredExpert(env, expert_type="handcoded") if expert else env

    def reset(self, task_id: str, max_steps: int | None = None) -> Reset:
        path = self.game_file(task_id)
        if self._env is None:
            self._env = self._make_env()
        self._env.load(str(path))
        state = self._env.reset()
        self._task_id, self._steps, self._done = task_id, 0, False
        self._limit = max_steps or self.max_steps
        self._admissible = list(state["admissible_commands"] or [])
        # ETO's task turn: the room description and the goal, without the banner paragraph.
        text = "\n".join(state["feedback"].strip().split("\n\n")[1:])
        return Reset(
            task_id=task_id,
            instruction=text,
            observation="",
            info={"game_file": str(path), "available_actions": self._admissible},
        )

    def _to_game_action(self, action: str) -> str:
        action = " ".join(action.strip().split())
        m = _PUT.match(action)
        if m and not any(a.startswith("put ") for a in self._admissible):
            return f"move {m.group(1)} to {m.group(2)}"
        return action

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("alfworld: step() after the episode ended; call reset()")
        command = self._to_game_action(action)
        valid = command in self._admissible
        state, _, game_over = self._env.step(command)
        self._steps += 1
        won = bool(state["won"])
        self._admissible = list(state["admissible_commands"] or [])
        truncated = not (won or game_over) and self._steps >= self._limit
        self._done = won or game_over or truncated
        info = {
            "valid": valid,
            "steps": self._steps,
            "truncated": truncated,
            "won": won,
            "available_actions": [to_eto_action(a) for a in self._admissible],
        }
        return Step(
            observation=_strip_arrival(state["feedback"].strip()), reward=float(won), done=self._done, info=info
        )

    def expert(self, task_id: str) -> list[str] | None:
        game = json.loads(self.game_file(task_id).read_text())
        actions = game.get("walkthrough")
        if not actions:
            actions = self._play_expert(task_id)
        return [to_eto_action(a) for a in actions] if actions else None

    def _play_expert(self, task_id: str) -> list[str] | None:
        env = self._make_env(expert=True)
        try:
            env.load(str(self.game_file(task_id)))
            state, actions, done = env.reset(), [], False
            while not done and len(actions) < EXPERT_MAX_STEPS:
                action = state["extra.expert_plan"][0]
                state, _, done = env.step(action)
                actions.append(action)
            return actions if state["won"] else None
        except Exception:  # the hand-coded expert raises when it gets stuck
            return None
        finally:
            env.close()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        self._done = True
