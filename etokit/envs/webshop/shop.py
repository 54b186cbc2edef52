"""The offline WebShop: the real text environment's pages, actions and reward over the
synthetic catalog (``catalog.py``; NOT the real WebShop catalog), with BM25 search (``bm25s``).

Behaviour follows ``WebAgentTextEnv``: ``search[...]`` works from any page; ``click[...]``
must name a clickable of the current page (lower-cased buttons and ASINs, option values as
shown); anything else "performs nothing" and the page is shown again. "Buy Now" ends the
episode with WebShop's reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from etokit.envs.webshop import pages
from etokit.envs.webshop.catalog import Catalog, build_catalog
from etokit.envs.webshop.reward import get_reward

MAX_RESULTS = 50  # WebShop shows the top 50 hits, 10 per page


@dataclass
class _Session:
    goal: dict
    page: str = "search"  # search | results | item | sub | done
    keywords: str = ""
    hits: list[str] = field(default_factory=list)
    results_page: int = 1
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    sub_page: str = ""
    reward: float = 0.0


class OfflineShop:
    """One shopping session at a time over a synthetic catalog. Goals ``[0, num_test)`` are the
    test-seen split, the rest train (WebShop splits its goals by index the same way)."""

    def __init__(self, seed: int = 0, num_products: int = 300, num_goals: int = 600, num_test: int = 200):
        if not 0 < num_test < num_goals:
            raise ValueError(f"num_test must be between 1 and num_goals - 1, got {num_test} of {num_goals}")
        self.catalog: Catalog = build_catalog(seed=seed, num_products=num_products, num_goals=num_goals)
        self.num_test = num_test
        self._index = _SearchIndex(self.catalog)
        self._session: _Session | None = None

    # -- splits -----------------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        n = len(self.catalog.goals)
        ranges = {"train": range(self.num_test, n), "test-seen": range(self.num_test), "test-unseen": range(0)}
        return [str(i) for i in ranges[split]]

    def goal(self, task_id: str) -> dict:
        return self.catalog.goals[int(task_id)]

    # -- episode ----------------------------------------------------------------------------
    def reset(self, task_id: str) -> str:
        self._session = _Session(goal=self.goal(task_id))
        return self.render()

    def render(self) -> str:
        s = self._session
        if s.page == "search":
            return pages.render_search(s.goal["instruction_text"])
        if s.page == "results":
            start = (s.results_page - 1) * pages.RESULTS_PER_PAGE
            shown = [self.catalog.product(a) for a in s.hits[start : start + pages.RESULTS_PER_PAGE]]
            return pages.render_results(shown, s.results_page, len(s.hits))
        if s.page == "item":
            return pages.render_item(self.catalog.product(s.asin))
        if s.page == "sub":
            return pages.render_sub(self.catalog.product(s.asin), s.sub_page)
        return pages.render_done(s.asin, s.options, s.reward)

    def clickables(self) -> list[str]:
        return pages.parse_page(self.render()).clickables

    def step(self, action: str) -> tuple[str, float, bool, bool]:
        """-> (page, reward, done, valid)."""
        s = self._session
        if s.page == "done":
            return self.render(), s.reward, True, False
        name, arg = pages.parse_action(action)
        arg = arg.lower() if arg is not None else None
        if name == "search" and arg:
            s.page, s.keywords, s.hits, s.results_page = "results", arg, self._index.search(arg), 1
            s.asin, s.options = None, {}
        elif name == "click" and arg in self.clickables() and arg != "search":
            self._click(arg)
        else:
            return self.render(), 0.0, False, False
        return self.render(), s.reward, s.page == "done", True

    def _click(self, target: str) -> None:
        s = self._session
        if target == pages.BACK_TO_SEARCH.lower():
            s.page, s.keywords, s.hits, s.asin, s.options = "search", "", [], None, {}
        elif target == pages.NEXT_PAGE.lower():
            s.results_page += 1
        elif target == pages.PREV_PAGE.lower():
            s.page, s.results_page = {
                "results": ("results", s.results_page - 1),
                "item": ("results", s.results_page),
                "sub": ("item", s.results_page),
            }[s.page]
        elif target == pages.BUY_NOW.lower():
            product = self.catalog.product(s.asin)
            s.reward, _ = get_reward(product, s.goal, product["Price"], s.options, nouns=self.catalog.nouns)
            s.page = "done"
        elif s.page == "results":
            s.page, s.asin = "item", target.upper()
        elif target in {p.lower() for p in pages.SUB_PAGES}:
            s.page, s.sub_page = "sub", target.capitalize()
        else:  # an option value of the current item
            product = self.catalog.product(s.asin)
            kind = next(k for k, values in product["options"].items() if target in values)
            s.options[kind] = target

    # -- expert -----------------------------------------------------------------------------
    def expert(self, task_id: str) -> list[str] | None:
        """Search the goal's keywords (product type and attributes), page to the target ASIN,
        choose the goal's options, buy. None when the search does not find the target. The path
        may be longer than the agent's step limit (a target on a late results page): the expert
        plays it whole."""
        goal = self.goal(task_id)
        query = " ".join([goal["query"], *goal["attributes"]])
        hits = self._index.search(query)
        if goal["asin"] not in hits:
            return None
        pages_to_turn = hits.index(goal["asin"]) // pages.RESULTS_PER_PAGE
        actions = [f"search[{query}]", *["click[Next >]"] * pages_to_turn, f"click[{goal['asin']}]"]
        actions += [f"click[{v}]" for v in goal["goal_options"].values()]
        actions.append("click[Buy Now]")
        return actions


class _SearchIndex:
    """BM25 over each product's title, category path, attributes and features."""

    def __init__(self, catalog: Catalog):
        import bm25s

        self._bm25s = bm25s
        self._asins = [p["asin"] for p in catalog.products]
        docs = [
            " ".join([p["Title"], p["product_category"], *p["Attributes"], *p["BulletPoints"]])
            for p in catalog.products
        ]
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)

    def search(self, query: str) -> list[str]:
        tokens = self._bm25s.tokenize([query], return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        docs, scores = self._retriever.retrieve(tokens, k=len(self._asins), show_progress=False)
        ranked = sorted((-float(sc), int(d)) for d, sc in zip(docs[0], scores[0]) if sc > 0)
        return [self._asins[d] for _, d in ranked[:MAX_RESULTS]]
