"""The README's layout table matches the tree: every path it names exists, every top-level entry of
the repository and of the package is named, and the rows that list a subpackage's modules list them
all (a module added, moved or renamed without its row fails here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETAILED = ("etokit/rollout/", "etokit/run/", "etokit/train/")  # rows that name each of their modules
UNNAMED = {"README.md", ".gitignore", "__init__.py", "__main__.py", "py.typed"}


def layout_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            for path in re.findall(r"`([^`]+)`", cells[0]):
                rows[path] = cells[1]
    return rows


def tracked_top_level() -> set[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {f.split("/")[0] for f in files.splitlines() if f}


def _named(rows: dict[str, str], path: Path) -> bool:
    """Named by itself, or (a folder) by a path inside it."""
    rel = path.relative_to(ROOT).as_posix()
    return rel in rows or f"{rel}/" in rows or any(r.startswith(rel + "/") for r in rows)


def test_every_path_in_the_layout_table_exists():
    missing = [p for p in layout_rows() if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_every_top_level_entry_and_package_member_is_in_the_layout_table():
    rows = layout_rows()
    entries = [ROOT / name for name in tracked_top_level() - UNNAMED if name != "etokit"]
    entries += [p for p in (ROOT / "etokit").iterdir() if p.name not in UNNAMED and p.name != "__pycache__"]
    unnamed = sorted(p.relative_to(ROOT).as_posix() for p in entries if not _named(rows, p))
    assert not unnamed, f"not in README's layout table: {unnamed}"


@pytest.mark.parametrize("package", DETAILED)
def test_a_subpackage_row_names_each_of_its_modules(package):
    row = layout_rows()[package]
    modules = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if not re.search(rf"`{m}(\.py)?`", row)]
    assert not missing, f"README layout row {package} does not name: {missing}"
