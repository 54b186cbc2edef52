"""Adapter over the real WebShop text environment (princeton-nlp/WebShop,
``web_agent_site.envs.WebAgentTextEnv`` with ``observation_mode="text"``).

WebShop is not on PyPI (the ``webshop`` package there is an unrelated stub); install it from
its repository and download its data (``setup.sh -d all``), then use ``backend="real"``.
Observations are normalised to the ETO format (the "Instruction: [SEP] <goal>" header the real
pages repeat is dropped after the first turn) and each step's available actions are read back
from the page text with ``pages.parse_page``.

Splits follow WebShop's goal indices (human goals, shuffled with seed 233 by WebShop itself):
goals ``[0, 200)`` are ETO's test set, ``[1500, n)`` WebShop's training goals.
"""

from __future__ import annotations

import importlib.util

from etokit.envs.webshop import pages

INSTALL_HINT = (
    "the real WebShop is not installed: clone https://github.com/princeton-nlp/WebShop, run its "
    "setup.sh (downloads the catalog and search index) and `pip install -e .` it; "
    "or use backend='offline'"
)
TEST_GOALS = 200  # ETO evaluates on the first 200 human goals
TRAIN_START = 1500  # WebShop: 0-499 test, 500-1499 dev, 1500+ train


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("web_agent_site") is None:
        return False, INSTALL_HINT
    return True, "web_agent_site (real WebShop)"


class RealShop:
    def __init__(self, num_products: int | None = None, env=None):
        if env is None:
            ok, detail = available()
            if not ok:
                from etokit.errors import EtokitError

                raise EtokitError(f"webshop backend 'real': {detail}")
            from web_agent_site.envs import WebAgentTextEnv

            env = WebAgentTextEnv(observation_mode="text", human_goals=True, num_products=num_products)
        self.env = env
        self._page = ""

    def task_ids(self, split: str) -> list[str]:
        n = len(self.env.server.goals)
        ranges = {"train": range(TRAIN_START, n), "test-seen": range(min(TEST_GOALS, n)), "test-unseen": range(0)}
        return [str(i) for i in ranges[split]]

    def reset(self, task_id: str) -> str:
        obs, _ = self.env.reset(session=int(task_id))
        self._page = obs
        return obs

    def clickables(self) -> list[str]:
        return pages.parse_page(self._page).clickables

    def step(self, action: str) -> tuple[str, float, bool, bool]:
        name, arg = pages.parse_action(action)
        page = pages.parse_page(self._page)
        valid = (name == "search" and bool(arg)) or (
            name == "click" and arg is not None and arg.lower() in page.clickables and arg.lower() != "search"
        )
        obs, reward, done, _ = self.env.step(action)
        self._page = obs
        return pages.strip_instruction(obs), float(reward or 0.0), bool(done), valid

    def expert(self, task_id: str) -> list[str] | None:
        # Real WebShop's expert data are human demonstrations (ETO ships them as trajectories),
        # not a policy that can be replayed on any goal.
        return None
