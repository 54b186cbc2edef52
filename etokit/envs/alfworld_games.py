"""Write ALFWorld games: ALFRED-format task folders (``traj_data.json`` + ``initial_state.pddl``)
and the playable ``game.tw-pddl`` that ``alfworld-generate`` builds from them.

``make_game`` does for one folder what ``alfworld-generate`` does for a data set: the shipped
PDDL domain, the shipped grammar with the task's templated goal text filled in, the folder's
PDDL problem, then a solvability check by the package's expert whose actions are stored as the
game's walkthrough. ``write_task`` writes a small ALFRED-format task from a scene description,
so games can be made without the ALFRED download (tests, custom households).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROPERTIES = ("cleanable", "heatable", "coolable", "toggleable", "isReceptacleObject")


@dataclass
class Thing:
    type: str  # ALFRED class name: "Mug", "CounterTop", "SinkBasin", ...
    properties: Sequence[str] = ()


@dataclass
class Scene:
    receptacles: list[tuple[str, bool]]  # (type, openable)
    objects: list[tuple[Thing, str]]  # (object, type of the receptacle it starts in)
    extra_init: list[str] = field(default_factory=list)


def _alfred_id(kind: str, n: int) -> str:
    # ALFRED ids look like "Mug|+00.50|+00.90|-01.25", mangled for PDDL; basins are the
    # "...|SinkBasin" part of their sink, which the demangler names "sinkbasin".
    coords = f"_bar__plus_0{n}_dot_50_bar__plus_00_dot_90_bar__minus_01_dot_{25 + n}"
    if kind.endswith("Basin"):
        return f"{kind[:-5]}{coords}_bar_{kind}"
    return f"{kind}{coords}"


def initial_state_pddl(scene: Scene, goal: str) -> str:
    """An ALFRED ``initial_state.pddl``: objects, types, locations, containment, and ``goal``."""
    recep_ids = {}
    for kind, _ in scene.receptacles:
        recep_ids.setdefault(kind, _alfred_id(kind, 1 + sum(k == kind for k in recep_ids)))
    obj_ids = [(_alfred_id(obj.type, i + 1), obj, where) for i, (obj, where) in enumerate(scene.objects)]
    otypes = sorted({o.type for _, o, _ in obj_ids})
    rtypes = sorted(recep_ids)
    locs = {kind: f"loc_{kind.lower()}" for kind in rtypes}
    lines = ["(define (problem plan_etokit)", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    lines += [f"{i} - object" for i, _, _ in obj_ids] + [f"{recep_ids[k]} - receptacle" for k in rtypes]
    lines += [
        "loc_start - location",
        *[f"{loc} - location" for loc in locs.values()],
        ")",
        "(:init",
        "(atLocation agent1 loc_start)",
    ]
    for kind, openable in scene.receptacles:
        rid = recep_ids[kind]
        lines += [f"(receptacleType {rid} {kind}Type)", f"(receptacleAtLocation {rid} {locs[kind]})"]
        if openable:
            lines.append(f"(openable {rid})")
    for oid, obj, where in obj_ids:
        lines += [
            f"(objectType {oid} {obj.type}Type)",
            f"(inReceptacle {oid} {recep_ids[where]})",
            f"(objectAtLocation {oid} {locs[where]})",
        ]
        if "toggleable" not in obj.properties:
            lines.append(f"(pickupable {oid})")
        lines += [f"({p} {oid})" for p in obj.properties]
    lines += [f"(canContain {r}Type {o}Type)" for r in rtypes for o in otypes]
    lines += scene.extra_init
    lines += [")", goal]
    return "\n".join(lines)


def write_task(
    task_dir: str | os.PathLike,
    task_type: str,
    scene: Scene,
    obj: str,
    recep: str = "",
    toggle: str = "",
    mrecep: str = "",
) -> Path:
    """Write an ALFRED-format task folder; the goal is ALFRED's own PDDL goal for ``task_type``."""
    from alfworld.gen.goal_library import gdict

    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    goal = gdict[task_type]["pddl"].replace("#", "-").format(obj=obj, recep=recep, toggle=toggle, mrecep=mrecep)
    goal = goal.strip()
    if goal.endswith(")") and goal.count(")") > goal.count("("):
        goal = goal[:-1].rstrip()  # ALFRED's templates also close the problem; we close it ourselves
    (task_dir / "initial_state.pddl").write_text(initial_state_pddl(scene, goal) + "\n)\n")
    traj = {
        "task_type": task_type,
        "pddl_params": {
            "object_target": obj,
            "parent_target": recep,
            "toggle_target": toggle,
            "mrecep_target": mrecep,
            "object_sliced": False,
        },
    }
    (task_dir / "traj_data.json").write_text(json.dumps(traj, indent=2))
    return task_dir


def make_game(task_dir: str | os.PathLike, seed: int = 0, expert_type: str = "handcoded") -> dict:
    """Build ``game.tw-pddl`` in an ALFRED task folder and solve it with the expert.
    Returns the game data (``solvable``, ``walkthrough`` among its keys)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
    from alfworld.agents.utils.misc import add_task_to_grammar
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH
    from textworld.envs import PddlEnv

    task_dir = Path(task_dir)
    traj = json.loads((task_dir / "traj_data.json").read_text())
    # The goal template is drawn with the global `random`; seed it so games are reproducible.
    state = random.getstate()
    random.seed(seed)
    try:
        grammar = add_task_to_grammar(Path(ALFRED_TWL2_PATH).read_text(), traj, rng=random.Random(seed))
    finally:
        random.setstate(state)
    game = {
        "pddl_domain": Path(ALFRED_PDDL_PATH).read_text(),
        "grammar": grammar,
        "pddl_problem": (task_dir / "initial_state.pddl").read_text(),
        "solvable": None,
        "walkthrough": None,
    }
    path = task_dir / "game.tw-pddl"
    _write_json(path, game)

    env = PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True, extras=["gamefile"]))
    env = AlfredExpert(AlfredInfos(AlfredDemangler(env, shuffle=False)), expert_type=expert_type)
    walkthrough = None
    try:
        env.load(str(path))
        state_ = env.reset()
        if expert_type == "planner":
            walkthrough = list(state_["extra.expert_plan"])
        else:
            actions, done = [], False
            while not done and len(actions) < 200:
                action = state_["extra.expert_plan"][0]
                state_, _, done = env.step(action)
                actions.append(action)
            walkthrough = actions if state_["won"] else None
    except Exception:  # the expert raises on games it cannot solve; alfworld-generate marks them unsolvable
        walkthrough = None
    finally:
        env.close()
    game["walkthrough"], game["solvable"] = walkthrough, walkthrough is not None
    _write_json(path, game)
    return game


def _write_json(path: Path, data: dict) -> None:
    from etokit.durable_io import write_bytes_atomic

    write_bytes_atomic(path, json.dumps(data).encode())
