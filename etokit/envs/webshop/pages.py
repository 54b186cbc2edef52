"""WebShop pages in the text format the ETO data uses (the real ``WebAgentTextEnv`` with
``observation_mode="text"``): visible page texts joined by `` [SEP] ``.

    search page   WebShop [SEP] Instruction: [SEP] <goal> [SEP] Search
    results page  [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP]
                  <ASIN> [SEP] <title> [SEP] $<price> [SEP] ...
    item page     [SEP] Back to Search [SEP] < Prev [SEP] <option kind> [SEP] <value> [SEP] ...
                  [SEP] <title> [SEP] Price: $<price> [SEP] Rating: N.A. [SEP] Description [SEP]
                  Features [SEP] Reviews [SEP] Buy Now
    sub page      [SEP] Back to Search [SEP] < Prev [SEP] <description | features | reviews>
    done page     Thank you for shopping with us! [SEP] ... [SEP] Your score (min 0.0, max 1.0) [SEP] <r>

After the first page the "Instruction: [SEP] <goal>" header is dropped (the goal is already in
the task turn), which leaves the leading " [SEP]". Clickables are matched lower-cased, as in
``WebAgentTextEnv.get_available_actions``.

``render_*`` write pages for the offline shop; ``parse_page`` reads any page in this format,
including ones captured from the real environment, back into its available actions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SEP = " [SEP] "
BACK_TO_SEARCH = "Back to Search"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BUY_NOW = "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
DONE_TITLE = "Thank you for shopping with us!"
RESULTS_PER_PAGE = 10

# "Page 1 (Total results: 50)" (ETO's pages); older WebShop templates: "Page 1 (1-10) of 50 total results".
_TOTAL_RE = re.compile(r"^Page (\d+) \((?:Total results: (\d+)\)|\d+-\d+\) of (\d+) total results)$")
# Older WebShop item pages label the back button "< Back to Results".
_PREV_BUTTONS = (PREV_PAGE, "< Back to Results")
_ASIN_RE = re.compile(r"^(?=[A-Z0-9]*\d)[A-Z0-9]{10}$")
_PRICE_RE = re.compile(r"^\$\d")
# Option headings WebShop's catalog uses; on an item page they tell option kinds from values.
OPTION_KINDS = frozenset(
    {
        "size",
        "color",
        "style",
        "scent",
        "flavor name",
        "flavor",
        "pattern name",
        "material",
        "material type",
        "item package quantity",
        "size name",
        "color name",
        "style name",
        "configuration",
        "capacity",
        "length",
        "fit type",
        "team name",
        "item display weight",
        "number of items",
        "package quantity",
        "width",
    }
)


@dataclass
class Page:
    kind: str  # "search" | "results" | "item" | "sub" | "done" | "unknown"
    has_search_bar: bool = False
    clickables: list[str] = field(default_factory=list)  # lower-cased, in page order
    asins: list[str] = field(default_factory=list)
    options: dict[str, list[str]] = field(default_factory=dict)
    page: int | None = None
    total: int | None = None
    score: float | None = None


def _price(price: float | str) -> str:
    return price if isinstance(price, str) else f"${price:.2f}"


def render_search(instruction: str) -> str:
    return SEP.join(["WebShop", "Instruction:", instruction, "Search"])


def render_results(products: Sequence[Mapping], page: int, total: int) -> str:
    parts = ["", BACK_TO_SEARCH, f"Page {page} (Total results: {total})"]
    if page > 1:
        parts.append(PREV_PAGE)
    if page * RESULTS_PER_PAGE < total:
        parts.append(NEXT_PAGE)
    for p in products:
        parts += [p["asin"], p["Title"], _price(p["Price"])]
    return SEP.join(parts).lstrip()


def render_item(product: Mapping) -> str:
    parts = ["", BACK_TO_SEARCH, PREV_PAGE]
    for kind, values in product["options"].items():
        parts += [kind, *values]
    parts += [
        product["Title"],
        f"Price: {_price(product['Price'])}",
        f"Rating: {product['Rating']}",
        *SUB_PAGES,
        BUY_NOW,
    ]
    return SEP.join(parts).lstrip()


def render_sub(product: Mapping, sub_page: str) -> str:
    if sub_page == "Description":
        body = [product["Description"]]
    elif sub_page == "Features":
        body = list(product["BulletPoints"])
    else:
        body = [r["text"] for r in product["Reviews"]] or ["No reviews yet."]
    return SEP.join(["", BACK_TO_SEARCH, PREV_PAGE, *body]).lstrip()


def render_done(asin: str, options: Mapping[str, str], reward: float) -> str:
    return SEP.join(
        [DONE_TITLE, "Purchased", "asin", asin, "options", json.dumps(dict(options)), SCORE_LABEL, f"{reward}"]
    )


def strip_instruction(text: str) -> str:
    """Drop the "WebShop [SEP] Instruction: [SEP] <goal>" header the real env repeats on every page."""
    segs = [s.strip() for s in text.split("[SEP]")]
    if BACK_TO_SEARCH in segs:
        return SEP.join(["", *segs[segs.index(BACK_TO_SEARCH) :]]).lstrip()
    if DONE_TITLE in segs:
        return SEP.join(segs[segs.index(DONE_TITLE) :])
    return text


def parse_page(text: str) -> Page:
    """The page kind and available actions of a page in the ETO/WebShop text format."""
    segs = [s.strip() for s in text.split("[SEP]")]
    segs = [s for s in segs if s]
    if SCORE_LABEL in segs:
        i = segs.index(SCORE_LABEL)
        score = float(segs[i + 1]) if i + 1 < len(segs) else None
        return Page(kind="done", score=score)
    if segs and segs[-1] == "Search" and BACK_TO_SEARCH not in segs:
        return Page(kind="search", has_search_bar=True, clickables=["search"])
    if BACK_TO_SEARCH not in segs:
        return Page(kind="unknown")
    body = segs[segs.index(BACK_TO_SEARCH) :]
    clickables = [BACK_TO_SEARCH.lower()]
    totals = [m for s in body if (m := _TOTAL_RE.match(s))]
    if totals:
        m = totals[0]
        page = Page(kind="results", page=int(m.group(1)), total=int(m.group(2) or m.group(3)))
        for s in (PREV_PAGE, NEXT_PAGE):
            if s in body:
                clickables.append(s.lower())
        for i, s in enumerate(body):
            if _ASIN_RE.match(s) and i + 2 < len(body) and _PRICE_RE.match(body[i + 2]):
                page.asins.append(s)
                clickables.append(s.lower())
        page.clickables = clickables
        return page
    if BUY_NOW in body:
        page = Page(kind="item")
        prices = [i for i, s in enumerate(body) if s.startswith("Price:")]
        prev = [s for s in _PREV_BUTTONS if s in body]
        start = body.index(prev[0]) + 1 if prev else 1
        region = body[start : prices[0] - 1] if prices else []
        kind = None
        for i, s in enumerate(region):
            if s.lower() in OPTION_KINDS or kind is None:
                kind = s
                page.options[kind] = []
            else:
                page.options[kind].append(s)
        clickables += [s.lower() for s in prev]
        clickables += [v for values in page.options.values() for v in values]
        clickables += [s.lower() for s in body if s in (*SUB_PAGES, "Attributes")]
        clickables.append(BUY_NOW.lower())
        page.clickables = clickables
        return page
    clickables += [s.lower() for s in _PREV_BUTTONS if s in body]
    return Page(kind="sub", clickables=clickables)


def parse_action(action: str) -> tuple[str | None, str | None]:
    """``search[x]`` / ``click[x]`` -> (name, argument); WebShop's own grammar."""
    m = re.match(r"^\s*(\w+)\[(.+)\]\s*$", action, flags=re.DOTALL)
    if not m:
        return None, None
    return m.group(1).lower(), m.group(2).strip()
