"""`accelerate launch scripts/train_dpo.py ...`: the DPO recipe, which lives in the package as
`etokit.recipes.train_dpo` (`accelerate launch -m etokit.recipes.train_dpo ...` from an installed etokit).
Same flags and `--config FILE.yaml`; see that module's docstring."""

from etokit.recipes.train_dpo import main
from etokit.recipes.launch import run_recipe

if __name__ == "__main__":
    run_recipe(main)
