"""The whole ETO loop (`etokit run`): behavioral cloning, then N iterations of exploration,
contrastive pairs and DPO, each policy evaluated and published to the Hub.

- :mod:`etokit.run.config`: :class:`RunConfig` (the YAML keys / flags) and the config hash a resume checks;
- :mod:`etokit.run.manifest`: ``manifest.json``, the run folder's lock, stale temp files;
- :mod:`etokit.run.loop`: :class:`Run`, the stages in order;
- :mod:`etokit.run.report`: results rows, the console table, the reward chart, card rows.
"""

from etokit.run.config import RunConfig, config_hash
from etokit.run.loop import Run, console
from etokit.run.manifest import LOCK, MANIFEST, RESULTS, Manifest
from etokit.run.report import EVAL_SPLITS, results_table, reward_chart, run_eval_panels

__all__ = [
    "EVAL_SPLITS",
    "LOCK",
    "MANIFEST",
    "RESULTS",
    "Manifest",
    "Run",
    "RunConfig",
    "config_hash",
    "console",
    "results_table",
    "reward_chart",
    "run_eval_panels",
]
