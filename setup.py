"""Build hook; everything else is declared in setup.cfg.

The card templates live at the top of the repository (`data_cards/`, `model_cards/`: the
project's layout, edited there). An installed etokit renders cards too, so every wheel carries
them inside the package as `etokit/templates/<kind>/` (found by `etokit.hub.cards.template_dir`).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CARD_KINDS = ("data_cards", "model_cards")


class BuildPyWithCards(build_py):
    def run(self):
        super().run()
        for kind in CARD_KINDS:
            for src in sorted(Path(kind).glob("*.j2")):
                dest = Path(self.build_lib, "etokit", "templates", kind, src.name)
                self.mkpath(str(dest.parent))
                self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildPyWithCards})
