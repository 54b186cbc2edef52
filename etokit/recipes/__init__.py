"""The training recipes, shipped in the package so an installed etokit can launch them:

    accelerate launch -m etokit.recipes.train_bc --model M --data expert.jsonl --output-dir out/bc
    accelerate launch -m etokit.recipes.train_dpo --model out/bc --data pairs.jsonl --output-dir out/iter-1
    python -m etokit.recipes.train_bc ...          # one process, no launcher
    etokit train bc|dpo [--num-processes N] ...    # accelerate's launcher, run for you

Each recipe reads top to bottom (setup, model and data, optimizer and state, loop, save, push) and
calls the components in ``etokit.train``. ``scripts/train_bc.py`` and ``scripts/train_dpo.py`` in a
source checkout are thin files that call these."""

RECIPES = {"bc": "etokit.recipes.train_bc", "dpo": "etokit.recipes.train_dpo"}
