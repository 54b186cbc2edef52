"""A synthetic WebShop catalog and goals, generated deterministically from a seed.

This is NOT the real WebShop catalog (1.18M scraped Amazon products, 12,087 human goals): that
is a download. The synthetic one keeps the real records' shape, so the original reward formula
and page format apply unchanged: products with ``Title``, ``query``, ``product_category``
("A › B › C"), ``Attributes``, ``BulletPoints``, ``Description``, ``options`` (kind -> values)
and a price; goals with ``instruction_text`` ("i need a ... with ..., and price lower than X
dollars"), ``attributes``, ``goal_options`` and ``price_upper`` drawn the way WebShop's
``get_human_goals`` draws them (an upper bound 2-4 price steps of $10 above the price).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

# category -> (category path, product types, attribute pool, option kinds -> value pool, price range)
_CATEGORIES: dict[str, dict] = {
    "beauty": {
        "path": "Beauty & Personal Care › Skin & Hair Care",
        "types": ["shampoo", "face moisturizer", "hair extension", "lip balm", "body lotion"],
        "attributes": [
            "paraben free",
            "cruelty free",
            "long lasting",
            "natural ingredients",
            "dry skin",
            "sensitive skin",
            "travel size",
            "easy to use",
        ],
        "options": {
            "size": ["1.7 fl oz", "3.4 fl oz", "8 fl oz", "16 fl oz"],
            "scent": ["lavender", "coconut", "unscented", "citrus", "vanilla bean"],
        },
        "price": (6, 45),
    },
    "fashion": {
        "path": "Clothing, Shoes & Jewelry › Men & Women",
        "types": ["running shoe", "t-shirt", "hoodie", "jogger pant", "rain jacket"],
        "attributes": [
            "machine wash",
            "slim fit",
            "cotton spandex",
            "non slip",
            "rubber sole",
            "long sleeve",
            "quick drying",
            "button closure",
        ],
        "options": {
            "color": ["black", "white", "navy blue", "heather grey", "olive green", "burgundy"],
            "size": ["small", "medium", "large", "x-large", "xx-large"],
        },
        "price": (12, 90),
    },
    "grocery": {
        "path": "Grocery & Gourmet Food › Snacks & Beverages",
        "types": ["protein bar", "coffee bean", "green tea", "trail mix", "beef jerky"],
        "attributes": [
            "gluten free",
            "sugar free",
            "non gmo",
            "low carb",
            "keto friendly",
            "high protein",
            "individually wrapped",
            "usda organic",
        ],
        "options": {
            "flavor name": ["chocolate", "peanut butter", "sea salt", "original", "mixed berry"],
            "size": ["pack of 6", "pack of 12", "pack of 24"],
        },
        "price": (5, 40),
    },
    "electronics": {
        "path": "Electronics › Accessories & Audio",
        "types": ["wireless earbud", "phone case", "usb cable", "bluetooth speaker", "power bank"],
        "attributes": [
            "fast charging",
            "noise cancelling",
            "water resistant",
            "high definition",
            "easy install",
            "long battery life",
            "heavy duty",
            "wireless bluetooth",
        ],
        "options": {
            "color": ["black", "white", "blue", "silver", "rose gold"],
            "style": ["standard", "pro", "mini", "2 pack"],
        },
        "price": (9, 120),
    },
    "home": {
        "path": "Home & Kitchen › Decor & Bedding",
        "types": ["throw pillow cover", "bath towel", "table lamp", "storage basket", "shower curtain"],
        "attributes": [
            "easy clean",
            "living room",
            "machine washable",
            "space saving",
            "eco friendly",
            "super soft",
            "dining room",
            "easy assemble",
        ],
        "options": {
            "color": ["beige", "grey", "teal", "mustard yellow", "white"],
            "size": ["18 x 18 inch", "20 x 20 inch", "set of 2", "set of 4"],
        },
        "price": (8, 70),
    },
}

_BRANDS = [
    "Lumora",
    "Vantix",
    "Korvel",
    "Nestiva",
    "Bramblo",
    "Quenly",
    "Ostrix",
    "Pelloa",
    "Zandor",
    "Mirevo",
    "Tallin",
    "Crestmo",
    "Fenwyn",
    "Ardena",
    "Solvik",
    "Yarrowby",
]
# Words that spaCy would tag NOUN/PROPN in our titles: the type words, brands, and pack words.
_EXTRA_NOUNS = {"pack", "set", "shirt", "fl", "oz"}

PRICE_STEPS = [10.0 * i for i in range(1, 100)]  # WebShop's PRICE_RANGE


def _title_case(text: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


@dataclass
class Catalog:
    products: list[dict]
    goals: list[dict]
    nouns_vocab: frozenset[str]

    def product(self, asin: str) -> dict:
        return self._by_asin[asin.upper()]

    def __post_init__(self) -> None:
        self._by_asin = {p["asin"]: p for p in self.products}

    def nouns(self, text: str) -> list[str]:
        """The title's nouns (stands in for WebShop's spaCy POS filter)."""
        return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w in self.nouns_vocab]


def _asin(rng: random.Random, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
        if asin not in taken and any(c.isdigit() for c in asin[2:]):
            taken.add(asin)
            return asin


def _product(rng: random.Random, category: str, spec: dict, asin: str) -> dict:
    kind = rng.choice(spec["types"])
    brand = rng.choice(_BRANDS)
    attributes = rng.sample(spec["attributes"], 3)
    options = {}
    for name in sorted(rng.sample(sorted(spec["options"]), rng.randint(1, 2))):
        pool = spec["options"][name]
        chosen = set(rng.sample(pool, rng.randint(2, min(4, len(pool)))))
        options[name] = [v for v in pool if v in chosen]
    lo, hi = spec["price"]
    price = round(rng.uniform(lo, hi)) - 0.01
    title = f"{brand} {_title_case(kind)}, " + ", ".join(_title_case(a) for a in attributes)
    bullets = [f"{_title_case(a)}: made to be {a} for everyday use." for a in attributes]
    bullets.append(f"Backed by the {brand} satisfaction promise.")
    return {
        "asin": asin,
        "name": title,
        "Title": title,
        "query": kind,
        "category": category,
        "product_category": f"{spec['path']} › {_title_case(kind)}",
        "Attributes": attributes,
        "BulletPoints": bullets,
        "Description": f"The {brand} {kind} is {', '.join(attributes[:-1])} and {attributes[-1]}.",
        "options": options,
        "Price": price,
        "Rating": "N.A.",
        "Reviews": [],
    }


def _goal(rng: random.Random, product: dict) -> dict:
    attributes = rng.sample(product["Attributes"], rng.randint(2, 3))
    goal_options = {name: rng.choice(values) for name, values in product["options"].items()}
    steps = [p for p in PRICE_STEPS if p > product["Price"]][:4]
    if len(steps) >= 2:
        price_upper = sorted(rng.sample(steps, 2))[1]
        price_text = f", and price lower than {price_upper:.2f} dollars"
    else:
        price_upper, price_text = 1000000.0, ""
    article = "an" if product["query"][0] in "aeiou" else "a"
    option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
    text = f"i need {article} {product['query']} that is {' and '.join(attributes)}"
    if option_text:
        text += f", with {option_text}"
    return {
        "asin": product["asin"],
        "category": product["category"],
        "query": product["query"],
        "name": product["name"],
        "product_category": product["product_category"],
        "instruction_text": text + price_text,
        "attributes": attributes,
        "price_upper": price_upper,
        "goal_options": goal_options,
        "weight": 1,
    }


def build_catalog(seed: int = 0, num_products: int = 300, num_goals: int = 600) -> Catalog:
    """``num_products`` products spread evenly over the categories, and ``num_goals`` goals,
    each naming one product, its attributes, one value per option kind and a price bound."""
    rng = random.Random(seed)
    taken: set[str] = set()
    names = sorted(_CATEGORIES)
    products = [
        _product(rng, names[i % len(names)], _CATEGORIES[names[i % len(names)]], _asin(rng, taken))
        for i in range(num_products)
    ]
    goals = [_goal(rng, rng.choice(products)) for _ in range(num_goals)]
    vocab = {w for spec in _CATEGORIES.values() for t in spec["types"] for w in re.findall(r"[a-z0-9]+", t)}
    vocab |= {b.lower() for b in _BRANDS} | _EXTRA_NOUNS
    return Catalog(products=products, goals=goals, nouns_vocab=frozenset(vocab))
