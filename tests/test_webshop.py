"""WebShop: the offline shop (pages, actions, reward, expert, splits) and the real-WebShop
adapter's page parsing on hand-written pages in the real text format."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from etokit.envs.base import Env
from etokit.envs.webshop import WebShopEnv, pages
from etokit.envs.webshop.catalog import build_catalog
from etokit.envs.webshop.reward import get_reward, normalize_color, token_set_ratio
from etokit.errors import EtokitError

FIXTURES = Path(__file__).parent / "fixtures" / "webshop"


@pytest.fixture(scope="module")
def env():
    return WebShopEnv()


def _play(env, task_id, actions):
    env.reset(task_id)
    return [env.step(a) for a in actions]


# -- offline shop ---------------------------------------------------------------------------


def test_protocol_and_split_sizes(env):
    assert isinstance(env, Env) and env.max_steps == 10
    train, test = env.task_ids("train"), env.task_ids("test-seen")
    assert (len(train), len(test), len(env.task_ids("test-unseen"))) == (400, 200, 0)
    assert not set(train) & set(test)
    small = WebShopEnv(num_products=50, num_goals=30, num_test=10)
    assert (len(small.task_ids("train")), len(small.task_ids("test-seen"))) == (20, 10)
    with pytest.raises(EtokitError, match="split"):
        env.task_ids("valid")


def test_catalog_is_deterministic_from_seed():
    a, b, c = (
        build_catalog(seed=3, num_products=40, num_goals=20),
        build_catalog(seed=3, num_products=40, num_goals=20),
        build_catalog(seed=4, num_products=40, num_goals=20),
    )
    assert a.goals == b.goals and a.products == b.products
    assert a.goals != c.goals
    assert len({p["category"] for p in a.products}) >= 5
    goal = a.goals[0]
    assert goal["instruction_text"].startswith("i need a")
    if goal["price_upper"] < 1e6:
        assert goal["instruction_text"].endswith(f"price lower than {goal['price_upper']:.2f} dollars")
        assert a.product(goal["asin"])["Price"] < goal["price_upper"]


@pytest.mark.parametrize("split", ["train", "test-seen"])
def test_expert_replay_reaches_full_reward(env, split):
    for task_id in env.task_ids(split)[:8]:
        actions = env.expert(task_id)
        assert actions and actions[0].startswith("search[") and actions[-1] == "click[Buy Now]"
        steps = _play(env, task_id, actions)
        assert all(s.info["valid"] for s in steps)
        assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
        assert steps[-1].reward == 1.0 and len(steps) <= env.max_steps
        assert pages.parse_page(steps[-1].observation).score == 1.0


def test_buying_without_options_gives_the_formula_fraction(env):
    task_id = next(t for t in env.task_ids("train") if env.shop.goal(t)["goal_options"])
    goal = env.shop.goal(task_id)
    actions = [a for a in env.expert(task_id) if not any(a == f"click[{v}]" for v in goal["goal_options"].values())]
    last = _play(env, task_id, actions)[-1]
    n_attr, n_opt = len(goal["attributes"]), len(goal["goal_options"])
    assert last.done and last.reward == pytest.approx((n_attr + 0 + 1) / (n_attr + n_opt + 1))


def test_pages_and_navigation(env):
    task_id = env.task_ids("train")[0]
    reset = env.reset(task_id)
    goal = env.shop.goal(task_id)
    assert reset.instruction == f"WebShop [SEP] Instruction: [SEP] {goal['instruction_text']} [SEP] Search"
    assert reset.observation == "" and reset.info["available_actions"] == ["search"]
    res = env.step(f"search[{goal['query']}]")
    assert res.observation.startswith("[SEP] Back to Search [SEP] Page 1 (Total results: ")
    page = pages.parse_page(res.observation)
    assert page.kind == "results" and len(page.asins) == min(10, page.total)
    assert res.info["available_actions"] == page.clickables
    if page.total > 10:
        nxt = pages.parse_page(env.step("click[Next >]").observation)
        assert nxt.page == 2 and "< prev" in nxt.clickables and not set(nxt.asins) & set(page.asins)
        assert pages.parse_page(env.step("click[< Prev]").observation).asins == page.asins
    item = env.step(f"click[{page.asins[0]}]")
    product = env.shop.catalog.product(page.asins[0])
    parsed = pages.parse_page(item.observation)
    assert parsed.kind == "item" and parsed.options == product["options"]
    assert f"[SEP] {product['Title']} [SEP] Price: ${product['Price']:.2f} [SEP] Rating: N.A." in item.observation
    feats = env.step("click[Features]")
    assert all(b in feats.observation for b in product["BulletPoints"])
    back = env.step("click[< Prev]")
    assert back.observation == item.observation
    assert env.step("click[Back to Search]").observation.endswith("[SEP] Search")


def test_invalid_actions_show_the_same_page_and_count(env):
    env.reset(env.task_ids("test-seen")[0])
    first = env.step("search[shampoo]")
    for bad in ("click[B0NOTHERE1]", "click[Buy Now]", "buy the shampoo", "search[]", "click[search]"):
        step = env.step(bad)
        assert step.observation == first.observation and step.reward == 0.0 and not step.done
        assert step.info["valid"] is False
    assert step.info["steps"] == 6


def test_expert_plays_past_the_agent_step_limit():
    from etokit.agent.protocol import expert_trajectory

    short = WebShopEnv(max_steps=2, num_products=50, num_goals=20, num_test=5)
    task_id = short.task_ids("train")[0]
    assert len(short.expert(task_id)) > short.max_steps
    traj = expert_trajectory(short, task_id, "train")
    assert traj.success and traj.num_steps > short.max_steps


def test_step_limit_ends_the_episode(env):
    env.reset(env.task_ids("train")[1])
    steps = [env.step("click[nothing]") for _ in range(env.max_steps)]
    assert [s.done for s in steps] == [False] * (env.max_steps - 1) + [True]
    assert steps[-1].info["truncated"] and steps[-1].reward == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("search[anything]")
    short = WebShopEnv(max_steps=3, num_products=50, num_goals=20, num_test=5)
    short.reset("0")
    assert [short.step("click[x]").done for _ in range(3)] == [False, False, True]


def test_unknown_backend_task_and_missing_real_webshop():
    with pytest.raises(EtokitError, match="backend"):
        WebShopEnv(backend="amazon")
    with pytest.raises(EtokitError, match="num_test"):
        WebShopEnv(num_goals=10, num_test=10)
    with pytest.raises(EtokitError, match="task id"):
        WebShopEnv(num_products=30, num_goals=10, num_test=2).reset("10")
    ok, detail = WebShopEnv.check()
    assert ok and "synthetic" in detail
    try:  # the real package is not installable here: constructing the backend must say how to get it
        import web_agent_site  # noqa: F401
    except ImportError:
        with pytest.raises(EtokitError, match="princeton-nlp/WebShop"):
            WebShopEnv(backend="real")


# -- reward formula -------------------------------------------------------------------------

_NOUNS = {"acme", "zed", "running", "shoe", "trail", "mesh", "boot"}


def _nouns(text):
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in _NOUNS]


def _product(**over):
    p = {
        "Title": "Acme Running Shoe, Non Slip",
        "name": "Acme Running Shoe, Non Slip",
        "BulletPoints": ["Rubber sole"],
        "Description": "comfortable",
        "Attributes": ["non slip", "rubber sole"],
        "query": "running shoe",
        "product_category": "Clothing › Men › Running Shoe",
    }
    return {**p, **over}


def _goal(**over):
    g = {
        "attributes": ["non slip", "machine wash", "slim fit"],
        "goal_options": {"color": "black", "size": "large"},
        "price_upper": 50.0,
        "query": "running shoe",
        "product_category": "Clothing › Men › Running Shoe",
        "name": "Zed Running Shoe, Machine Wash",
    }
    return {**g, **over}


def test_reward_partial_attribute_option_price_matches():
    # 1 of 3 attributes ("non slip"), 1 of 2 options (color; size "medium" != "large"), price ok:
    # (1 + 1 + 1) / (3 + 2 + 1); type matches (query, category, 2/3 title nouns).
    r, info = get_reward(_product(), _goal(), 40.0, {"color": "black", "size": "medium"}, nouns=_nouns)
    assert r == pytest.approx(3 / 6) and info["r_type"] == 1.0 and info["title_score"] == pytest.approx(2 / 3)
    r, _ = get_reward(_product(), _goal(), 60.0, {"color": "black", "size": "medium"}, nouns=_nouns)
    assert r == pytest.approx(2 / 6)  # over the price bound
    r, _ = get_reward(_product(), _goal(), 40.0, {"color": "black", "size": "large"}, nouns=_nouns)
    assert r == pytest.approx(4 / 6)
    # An attribute found only in the features text counts; "machine wash" appears nowhere.
    r, _ = get_reward(
        _product(Attributes=[]), _goal(attributes=["rubber sole", "machine wash"]), 10.0, {}, nouns=_nouns
    )
    assert r == pytest.approx((1 + 0 + 1) / (2 + 2 + 1))


def test_reward_type_factor():
    other = _product(query="sneaker", product_category="Shoes › Sports › Sneaker")
    # No query/category match and 1 of 5 goal-title nouns (0.2, not > 0.2): r_type = 0.5.
    goal = _goal(name="Zed Running Trail Mesh Boot")
    r, info = get_reward(other, goal, 40.0, {"color": "black", "size": "large"}, nouns=_nouns)
    assert info["r_type"] == 0.5 and r == pytest.approx(0.5 * 4 / 6)
    # No shared title noun: r_type = 0 whatever else matches.
    r, info = get_reward(
        _product(Title="Acme Sock", name="Acme Sock"),
        _goal(name="Zed Boot"),
        1.0,
        {"color": "black", "size": "large"},
        nouns=_nouns,
    )
    assert info["r_type"] == 0.0 and r == 0.0


def test_option_matching_rules():
    # Colors are normalised ("navy blue" -> "blue"); sizes match exactly ("x-large" != "large").
    assert normalize_color("navy blue") == normalize_color("blue")
    r, info = get_reward(
        _product(),
        _goal(goal_options={"color": "blue", "size": "large"}),
        1.0,
        {"color": "navy blue", "size": "x-large"},
        nouns=_nouns,
    )
    assert info["option_matches"] == 1 and r == pytest.approx((1 + 1 + 1) / 6)


def test_token_set_ratio():
    assert token_set_ratio("Slip, NON", "non slip") == 100  # order, case and punctuation ignored
    assert token_set_ratio("mint green", "green") == 100  # a token subset scores 100, as in thefuzz
    assert token_set_ratio("machine wash", "non slip") < 50
    assert token_set_ratio("", "x") == 0


# -- real-format pages and the adapter ------------------------------------------------------


def _fixture(name):
    return (FIXTURES / name).read_text().strip()


def test_parse_real_pages():
    search = pages.parse_page(_fixture("search.txt"))
    assert search.kind == "search" and search.has_search_bar and search.clickables == ["search"]
    res = pages.parse_page(_fixture("results.txt"))
    assert (res.kind, res.page, res.total) == ("results", 1, 50)
    assert res.asins == ["B09C337K8S", "B093BKTTNX", "B07ZJ5ZK9Q"]
    assert res.clickables == ["back to search", "next >", "b09c337k8s", "b093bkttnx", "b07zj5zk9q"]
    page2 = pages.parse_page(_fixture("results_page2.txt"))
    assert page2.page == 2 and page2.asins == ["B08L6PJ2ZX", "0060175400"]  # ISBN-style ids are products too
    assert page2.clickables[:3] == ["back to search", "< prev", "next >"]
    item = pages.parse_page(_fixture("item.txt"))
    assert item.kind == "item"
    assert item.options == {
        "color": ["dark brown", "natural black", "ash blonde"],
        "size": ["18 inch (pack of 1)", "22 inch (pack of 1)"],
    }
    assert item.clickables == [
        "back to search",
        "< prev",
        "dark brown",
        "natural black",
        "ash blonde",
        "18 inch (pack of 1)",
        "22 inch (pack of 1)",
        "description",
        "features",
        "reviews",
        "buy now",
    ]
    sub = pages.parse_page(_fixture("features.txt"))
    assert sub.kind == "sub" and sub.clickables == ["back to search", "< prev"]
    done = pages.parse_page(_fixture("done.txt"))
    assert done.kind == "done" and done.score == pytest.approx(2 / 3) and done.clickables == []
    old = pages.parse_page(_fixture("item_old_template.txt"))
    assert old.options == {"color": ["dark brown", "natural black"]} and "< back to results" in old.clickables


def test_strip_instruction_header():
    stripped = pages.strip_instruction(_fixture("results.txt"))
    assert stripped.startswith("[SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B09C337K8S")
    assert "Instruction" not in stripped
    assert pages.strip_instruction(_fixture("done.txt")).startswith("Thank you for shopping with us!")
    assert pages.strip_instruction(_fixture("search.txt")) == _fixture("search.txt")


class _ReplayTextEnv:
    """Stands in for WebAgentTextEnv (not installable here): replays captured pages."""

    def __init__(self):
        self.server = type("S", (), {"goals": [{}] * 1600})()
        self.sessions, self.actions = [], []
        self._pages = iter([_fixture("results.txt"), _fixture("item.txt"), _fixture("item.txt"), _fixture("done.txt")])

    def reset(self, session=None):
        self.sessions.append(session)
        return _fixture("search.txt"), None

    def step(self, action):
        self.actions.append(action)
        page = next(self._pages)
        return page, (0.6666666666666666 if "Thank you" in page else 0.0), "Thank you" in page, None


def test_real_adapter_normalises_pages_and_flags_actions():
    fake = _ReplayTextEnv()
    env = WebShopEnv(backend="real", env=fake)
    assert len(env.task_ids("test-seen")) == 200 and env.task_ids("train")[0] == "1500"
    assert env.expert("3") is None
    reset = env.reset("3")
    assert fake.sessions == [3] and reset.info["available_actions"] == ["search"]
    s1 = env.step("search[clip in hair extension]")
    assert s1.observation.startswith("[SEP] Back to Search") and s1.info["valid"]
    assert s1.info["available_actions"][-1] == "b07zj5zk9q"
    s2 = env.step("click[B09C337K8S]")
    assert s2.info["valid"] and "natural black" in s2.info["available_actions"]
    s3 = env.step("click[purple]")
    assert not s3.info["valid"]
    s4 = env.step("click[Buy Now]")
    assert s4.done and s4.reward == pytest.approx(2 / 3)
    assert fake.actions == ["search[clip in hair extension]", "click[B09C337K8S]", "click[purple]", "click[Buy Now]"]


# -- prompt files ---------------------------------------------------------------------------


def test_prompt_files_replay_in_the_shop(env):
    root = (
        resources.files("etokit.agent") / "prompts" / "webshop"
        if _has_agent_pkg()
        else Path(__file__).parents[1] / "etokit" / "agent" / "prompts" / "webshop"
    )
    instruction = (root / "instruction.txt").read_text()
    assert "search[keywords]" in instruction and "click[value]" in instruction and "Thought:" in instruction
    icl = json.loads((root / "icl.json").read_text())
    assert [m["role"] for m in icl] == ["user", "assistant"] * (len(icl) // 2)
    task = next(t for t in env.task_ids("train") if env.reset(t).instruction == icl[0]["content"])
    actions = [m["content"].split("Action: ")[1] for m in icl if m["role"] == "assistant"]
    steps = _play(env, task, actions)
    assert steps[-1].reward == 1.0
    assert [f"Observation: {s.observation}" for s in steps[:-1]] == [m["content"] for m in icl[2::2]]


def _has_agent_pkg():
    try:
        return resources.files("etokit.agent").is_dir()
    except ModuleNotFoundError:
        return False
