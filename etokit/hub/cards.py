"""Render dataset and model cards from the Jinja templates in `data_cards/` and `model_cards/`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

_PACKAGE_COPY = Path(__file__).resolve().parents[1] / "templates"
_CHECKOUT = Path(__file__).resolve().parents[2]


def template_dir(kind: str) -> Path:
    """`data_cards` or `model_cards`: the copy an installed wheel carries in the package (setup.py
    puts it there), else the folder at the top of a source checkout (editable installs)."""
    for base in (_PACKAGE_COPY, _CHECKOUT):
        if (base / kind).is_dir():
            return base / kind
    raise FileNotFoundError(f"etokit card templates '{kind}/' found neither in {_PACKAGE_COPY} nor in {_CHECKOUT}")


@lru_cache(maxsize=None)
def _environment(kind: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir(kind))),
        undefined=jinja2.StrictUndefined,  # a missing context key is a bug, not an empty line
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    env.filters["num"] = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"
    return env


def render(kind: str, template: str, **context) -> str:
    """Render `template` (e.g. "pairs.md.j2") from `kind` ("data_cards"/"model_cards")."""
    return _environment(kind).get_template(template).render(**context)
