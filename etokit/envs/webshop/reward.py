"""WebShop's purchase reward (Yao et al., 2022, ``web_agent_site/engine/goal.py: get_reward``),
reimplemented on etokit's product/goal records.

    reward = r_type * (attribute matches + option matches + [price <= price_upper])
                    / (len(goal attributes) + len(goal options) + 1)

``r_type`` (is the bought product the right kind of thing?) is 1.0 when the product shares the
goal's search query, at least two category levels, or more than 20% of the goal title's nouns;
0.5 when none of those holds; 0.1 when under 10% of the nouns match; 0.0 when none does.
Attributes and options match fuzzily (token-set ratio > 85) or by appearing verbatim in the
title, features or description; "size" options must match exactly.

Two documented departures, both because their inputs are downloads that are not available:
- WebShop finds title nouns with spaCy's ``en_core_web_lg`` POS tagger; here the caller passes
  ``nouns`` (the offline shop's catalog knows which title words are nouns).
- ``thefuzz.fuzz.token_set_ratio`` is reimplemented below (same definition: an Indel-distance
  ratio over sorted token sets, inputs lower-cased and stripped of punctuation, rounded).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

EXACT_MATCH_OPTS = ("size",)
FUZZY_THRESHOLD = 85

# First color in this list found inside an option value stands for it, so "navy blue" and
# "blue" compare equal. (WebShop keeps a longer list in engine/normalize.py.)
COLOR_SET = (
    "beige",
    "black",
    "blue",
    "bronze",
    "brown",
    "burgundy",
    "charcoal",
    "coral",
    "cream",
    "gold",
    "gray",
    "green",
    "grey",
    "ivory",
    "khaki",
    "lavender",
    "maroon",
    "navy",
    "olive",
    "orange",
    "pink",
    "purple",
    "red",
    "rose",
    "silver",
    "tan",
    "teal",
    "white",
    "yellow",
)


def normalize_color(value: str) -> str:
    for color in COLOR_SET:
        if color in value:
            return color
    return value


def _full_process(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def _indel_ratio(a: str, b: str) -> float:
    """100 * (1 - indel distance / (len a + len b)): 2 * LCS / total length."""
    if not a and not b:
        return 100.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return 200.0 * prev[-1] / (len(a) + len(b))


def token_set_ratio(s1: str, s2: str) -> int:
    """``thefuzz.fuzz.token_set_ratio``: compare the shared tokens against each side's rest."""
    t1, t2 = set(_full_process(s1).split()), set(_full_process(s2).split())
    if not t1 or not t2:
        return 0
    sect = " ".join(sorted(t1 & t2))
    rest1 = (sect + " " + " ".join(sorted(t1 - t2))).strip()
    rest2 = (sect + " " + " ".join(sorted(t2 - t1))).strip()
    return int(round(max(_indel_ratio(sect, rest1), _indel_ratio(sect, rest2), _indel_ratio(rest1, rest2))))


def _in_text(needle: str, product: Mapping[str, Any]) -> bool:
    return (
        needle in product["Title"].lower()
        or needle in " ".join(product["BulletPoints"]).lower()
        or needle in product["Description"].lower()
    )


def type_reward(
    product: Mapping[str, Any], goal: Mapping[str, Any], nouns: Callable[[str], Iterable[str]]
) -> dict[str, Any]:
    query_match = product["query"] == goal["query"]
    bought_cats = {c.strip() for c in product["product_category"].split("›")}
    goal_cats = {c.strip() for c in goal["product_category"].split("›")}
    category_match = len(bought_cats & goal_cats) >= 2
    bought_nouns = {n.lower() for n in nouns(product["name"])}
    desired = [n.lower() for n in nouns(goal["name"])]
    title_score = 0.2 if not desired else len(bought_nouns & set(desired)) / len(desired)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match, "title_score": title_score}


def attribute_matches(product: Mapping[str, Any], goal: Mapping[str, Any]) -> int:
    matches = 0
    for g_attr in goal["attributes"]:
        if any(token_set_ratio(p_attr, g_attr) > FUZZY_THRESHOLD for p_attr in product["Attributes"]):
            matches += 1
        elif _in_text(g_attr, product):
            matches += 1
    return matches


def option_matches(product: Mapping[str, Any], goal_options: Iterable[str], chosen: Mapping[str, str]) -> int:
    """Counts the *chosen* options that hit a goal option (WebShop counts from the purchase side)."""
    goal_values = [normalize_color(o) for o in goal_options]
    matches = 0
    for kind, value in chosen.items():
        value = normalize_color(value)
        if kind.lower() in EXACT_MATCH_OPTS:
            matched = value in goal_values
        else:
            matched = any(token_set_ratio(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or _in_text(value, product):
            matches += 1
    return matches


def get_reward(
    product: Mapping[str, Any],
    goal: Mapping[str, Any],
    price: float,
    options: Mapping[str, str],
    nouns: Callable[[str], Iterable[str]],
) -> tuple[float, dict[str, Any]]:
    """The reward for buying ``product`` at ``price`` with ``options`` chosen, and its parts."""
    r_type = type_reward(product, goal, nouns)
    goal_options = goal["goal_options"]
    goal_values = list(goal_options.values()) if isinstance(goal_options, Mapping) else list(goal_options)
    # WebShop's goals all carry a price bound (1e6 when none is stated), so the price term is a bool.
    r_price = price <= goal["price_upper"]
    n_attr = attribute_matches(product, goal)
    # WebShop counts every chosen option, so a product with more option kinds than the goal
    # could score above 1; capping at the goal's count keeps the reward in [0, 1].
    n_opt = min(option_matches(product, goal_values, options), len(goal_values))
    denom = len(goal["attributes"]) + len(goal_values) + 1
    reward = (n_attr + n_opt + r_price) / denom * r_type["r_type"]
    return reward, {**r_type, "attribute_matches": n_attr, "option_matches": n_opt, "price_match": r_price}
