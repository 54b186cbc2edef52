"""WebShop (Yao et al., 2022) for ETO: buy the product an instruction describes.

``WebShopEnv(backend="offline")`` (default) is a self-contained shop with the real text
environment's pages, actions and reward formula over a SYNTHETIC catalog (a few hundred
generated products and goals; see ``catalog.py``) — not the real 1.18M-product catalog and
human goals, whose scores are not comparable with the paper's. ``backend="real"`` drives the
real WebShop (``web_agent_site``) when it is installed.

Reward is WebShop's: r_type x (attribute + option + price matches) / (#attributes + #options
+ 1), given when "Buy Now" is clicked; 10 steps at most, as in ETO.
"""

from __future__ import annotations

from etokit.envs.base import SPLITS, Reset, Step
from etokit.envs.webshop import adapter
from etokit.envs.webshop.shop import OfflineShop
from etokit.errors import EtokitError

BACKENDS = ("offline", "real")


class WebShopEnv:
    name = "webshop"
    max_steps = 10

    def __init__(self, backend: str = "offline", max_steps: int | None = None, **options):
        if backend not in BACKENDS:
            raise EtokitError(f"webshop: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        if max_steps is not None:
            self.max_steps = int(max_steps)
        try:
            self.shop = OfflineShop(**options) if backend == "offline" else adapter.RealShop(**options)
        except (TypeError, ValueError) as e:
            raise EtokitError(f"webshop ({backend}): bad option: {e}") from None
        self._steps = 0
        self._done = True

    @classmethod
    def check(cls) -> tuple[bool, str]:
        ok, detail = adapter.available()
        try:
            import bm25s  # noqa: F401
        except ImportError:
            return False, "offline shop needs bm25s: pip install bm25s"
        real = detail if ok else "real backend: not installed (see etokit.envs.webshop.adapter)"
        return True, f"offline shop (synthetic catalog); {real}"

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise EtokitError(f"webshop: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self.shop.task_ids(split)

    def reset(self, task_id: str, max_steps: int | None = None) -> Reset:
        self._check_task(task_id)
        page = self.shop.reset(task_id)
        self._steps, self._done = 0, False
        self._limit = max_steps or self.max_steps
        return Reset(
            task_id=task_id, instruction=page, observation="", info={"available_actions": self.shop.clickables()}
        )

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("webshop: step() after the episode ended; call reset()")
        obs, reward, done, valid = self.shop.step(action)
        self._steps += 1
        truncated = not done and self._steps >= self._limit
        self._done = done or truncated
        info = {
            "valid": valid,
            "steps": self._steps,
            "truncated": truncated,
            "available_actions": [] if self._done else self.shop.clickables(),
        }
        return Step(observation=obs, reward=reward, done=self._done, info=info)

    def expert(self, task_id: str) -> list[str] | None:
        self._check_task(task_id)
        return self.shop.expert(task_id)

    def close(self) -> None:
        self._done = True

    def _check_task(self, task_id: str) -> None:
        if not any(task_id in self.shop.task_ids(s) for s in SPLITS):
            raise EtokitError(f"webshop: unknown task id {task_id!r}")


__all__ = ["WebShopEnv"]
