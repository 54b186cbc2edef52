"""`accelerate launch scripts/train_bc.py ...`: the BC recipe, which lives in the package as
`etokit.recipes.train_bc` (`accelerate launch -m etokit.recipes.train_bc ...` from an installed etokit).
Same flags and `--config FILE.yaml`; see that module's docstring."""

from etokit.recipes.train_bc import main
from etokit.recipes.launch import run_recipe

if __name__ == "__main__":
    run_recipe(main)
