"""Bad input across every command family: each case ends with exit code 2, ONE ``Error:`` line that
names the culprit (file, row, field or option), no traceback, and nothing written or overwritten:
the case's folder, the shared assets and the Hub's store are byte-for-byte what they were before.

One table, one row per case: (id, runner, argv, setup, words). ``runner`` is ``cli`` (the real
``etokit`` app in-process) or ``bc`` / ``dpo`` (the training scripts' ``main(argv)`` under their
real entry point). ``argv`` is formatted with {w} (the case's own folder), {a} (shared assets: a
tiny model and its broken variants), {repo} (a dataset repo already on the Hub) and {fresh} (a repo
that must never be created). ``setup(w)`` writes the bad input. File-format rules themselves are
covered row by row in test_data_validation.py; this table is about the commands around them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import shutil
from pathlib import Path

import pytest

from tests import factories

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
ENV = "textworld-express"

TRAJ = factories.trajectory("t1", 0.5).to_row()
PAIR = factories.pair("p1").to_row()
ETO_SFT = {
    "id": 3,
    "conversations": [
        {"from": "human", "value": "You are web shopping."},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "Buy a jacket."},
        {"from": "gpt", "value": "Thought: search.\nAction: search[jacket]"},
    ],
}
ETO_PAIR = {
    "id": "9",
    "prompt": ETO_SFT["conversations"][:3],
    "chosen": [{"from": "gpt", "value": "Action: search[jacket]"}],
    "rejected": [{"from": "gpt", "value": "Action: search[shoe]"}],
}


# ------------------------------------------------------------------------------ setup helpers


def rows_file(name, rows, torn=False):
    """Write ``rows`` (dicts) as JSONL (or a JSON list for .json); ``torn`` cuts the last line short."""

    def setup(w):
        if name.endswith(".json"):
            text = json.dumps(rows)
        else:
            text = "".join(json.dumps(r) + "\n" for r in rows)
            if torn:
                text = text[:-20]
        (w / name).write_text(text)

    return setup


def raw_file(name, data: bytes):
    def setup(w):
        (w / name).write_bytes(data)

    return setup


def run_yaml(text):
    """An `etokit run` config whose run_dir is inside the case's folder."""

    def setup(w):
        (w / "eto.yaml").write_text(f"push_to: etokit-tests/agent\nrun_dir: {w / 'run'}\n{text}")

    return setup


def both(*setups):
    def setup(w):
        for s in setups:
            s(w)

    return setup


def traj(task_id, reward, **kw):
    return factories.trajectory(task_id, reward, **kw).to_row()


def with_(row, **changes):
    out = copy.deepcopy(row)
    out.update(changes)
    return out


def identical_pair(task_id):
    row = factories.pair(task_id).to_row()
    row["rejected"] = copy.deepcopy(row["chosen"])
    return row


def run_dir_with_manifest(w):
    (w / "run").mkdir()
    (w / "run" / "manifest.json").write_text(json.dumps({"config_hash": "0" * 16, "stages": []}))


def model_dir_not_empty(w):
    (w / "m").mkdir()
    (w / "m" / "keep.txt").write_text("an earlier model\n")


EXPERTS = rows_file("expert.jsonl", [traj(f"t{i}", 1.0, seed=i) for i in range(3)])
PREVIOUS = raw_file("out.jsonl", b"previous\n")
PAIRS_OK = rows_file("pairs.jsonl", [factories.pair(f"p{i}").to_row() for i in range(3)])
FAKE_GGUF = raw_file("model.gguf", b"GGUF" + bytes(60))
RUN = ["run", "--run-dir", "{w}/run", "--push-to", "etokit-tests/agent"]
EXPLORE = ["explore", "--model", "{a}/tiny", "--env", ENV, "--limit", "1", "--out", "{w}/x.jsonl"]
BC = ["--model", "{a}/tiny", "--data", "{w}/expert.jsonl", "--output-dir", "{w}/bc", "--report-to", "none"]
DPO = [
    "--model",
    "{a}/tiny",
    "--data",
    "{w}/pairs.jsonl",
    "--output-dir",
    "{w}/dpo",
    "--report-to",
    "none",
    "--ref-cache-dir",
    "{w}/ref-cache",
]

# (id, runner, argv, setup, words the one error line must contain)
CASES = [
    # --- validate / import-eto / export-eto ---------------------------------------------------
    (
        "validate-schema-version-newer",
        "cli",
        ["validate", "{w}/t.jsonl"],
        rows_file("t.jsonl", [TRAJ, with_(TRAJ, schema_version=2)]),
        ["t.jsonl", "row 1", "field 'schema_version'", "version 2", "reads version 1"],
    ),
    (
        "validate-schema-version-not-int",
        "cli",
        ["validate", "{w}/t.jsonl"],
        rows_file("t.jsonl", [with_(TRAJ, schema_version="1")]),
        ["row 0", "field 'schema_version'", "'1'"],
    ),
    (
        "validate-official-env-unknown",
        "cli",
        ["validate", "{w}/sft.json", "--env", "sciworld"],
        rows_file("sft.json", [ETO_SFT]),
        ["--env", "unknown environment 'sciworld'", "scienceworld"],
    ),
    (
        "validate-kind-not-a-choice",
        "cli",
        ["validate", "{w}/t.jsonl", "--kind", "trajectories"],
        rows_file("t.jsonl", [TRAJ]),
        ["--kind", "trajectories"],
    ),
    (
        "import-eto-identical-pair",
        "cli",
        ["import-eto", "{w}/pm.json", "--env", "webshop", "--out", "{w}/new.jsonl"],
        rows_file("pm.json", [with_(ETO_PAIR, rejected=ETO_PAIR["chosen"])]),
        ["pm.json", "row 0", "(id '9')", "field 'chosen'", "identical"],
    ),
    (
        "import-eto-out-exists",
        "cli",
        ["import-eto", "{w}/sft.json", "--env", "webshop", "--out", "{w}/out.jsonl"],
        both(rows_file("sft.json", [ETO_SFT]), PREVIOUS),
        ["--out", "out.jsonl", "already exists", "--overwrite"],
    ),
    (
        "import-eto-out-is-input",
        "cli",
        ["import-eto", "{w}/sft.jsonl", "--env", "webshop", "--out", "{w}/sft.jsonl", "--overwrite"],
        rows_file("sft.jsonl", [ETO_SFT]),
        ["--out", "sft.jsonl", "is the input file"],
    ),
    (
        "import-eto-etokit-input",
        "cli",
        ["import-eto", "{w}/t.jsonl", "--out", "{w}/new.jsonl"],
        rows_file("t.jsonl", [TRAJ]),
        ["t.jsonl", "format etokit-trajectory", "expected eto-sft or eto-pairs"],
    ),
    (
        "export-eto-system-turn",
        "cli",
        ["export-eto", "{w}/t.jsonl", "--out", "{w}/new.json"],
        rows_file(
            "t.jsonl",
            [TRAJ, with_(TRAJ, task_id="t2", messages=[{"role": "system", "content": "s"}] + TRAJ["messages"])],
        ),
        ["t.jsonl", "row 1", "(id 't2')", "field 'messages[0].role'", "'system'"],
    ),
    (
        "export-eto-out-suffix",
        "cli",
        ["export-eto", "{w}/t.jsonl", "--out", "{w}/new.txt"],
        rows_file("t.jsonl", [TRAJ]),
        ["--out", "new.txt", ".json or .jsonl"],
    ),
    (
        "export-eto-official-input",
        "cli",
        ["export-eto", "{w}/sft.json", "--out", "{w}/new.json"],
        rows_file("sft.json", [ETO_SFT]),
        ["sft.json", "format eto-sft", "expected etokit-trajectory or etokit-pair"],
    ),
    # --- push-expert / push-explore / push-pairs (the Hub store must not change) ----------------
    (
        "push-expert-repo-traversal",
        "cli",
        ["push-expert", "{w}/t.jsonl", "--repo-id", "../etc"],
        rows_file("t.jsonl", [TRAJ]),
        ["--repo-id", "'../etc'"],
    ),
    (
        "push-expert-repo-absolute",
        "cli",
        ["push-expert", "{w}/t.jsonl", "--repo-id", "/etc/passwd"],
        rows_file("t.jsonl", [TRAJ]),
        ["--repo-id", "/etc/passwd"],
    ),
    (
        "push-explore-revision-traversal",
        "cli",
        ["push-explore", "{w}/t.jsonl", "--repo-id", "{repo}", "--split", "iter_1", "--revision", "../../main"],
        rows_file("t.jsonl", [TRAJ]),
        ["--revision", "'../../main'", "not a valid revision"],
    ),
    (
        "push-explore-revision-absolute",
        "cli",
        ["push-explore", "{w}/t.jsonl", "--repo-id", "{repo}", "--revision", "/refs/heads/main"],
        rows_file("t.jsonl", [TRAJ]),
        ["--revision", "'/refs/heads/main'"],
    ),
    (
        "push-explore-split-traversal",
        "cli",
        ["push-explore", "{w}/t.jsonl", "--repo-id", "{repo}", "--split", "../iter_1"],
        rows_file("t.jsonl", [TRAJ]),
        ["--split", "'../iter_1'", "not a valid split name"],
    ),
    (
        "push-pairs-config-traversal",
        "cli",
        ["push-pairs", "{w}/pairs.jsonl", "--repo-id", "{repo}", "--config-name", "../x"],
        PAIRS_OK,
        ["--config-name", "'../x'"],
    ),
    (
        "push-pairs-identical",
        "cli",
        ["push-pairs", "{w}/p.jsonl", "--repo-id", "{repo}"],
        rows_file("p.jsonl", [PAIR, identical_pair("p2")]),
        ["p.jsonl", "row 1", "(id 'p2')", "field 'chosen'", "identical"],
    ),
    (
        "push-pairs-empty",
        "cli",
        ["push-pairs", "{w}/empty.jsonl", "--repo-id", "{fresh}"],
        raw_file("empty.jsonl", b""),
        ["empty.jsonl", "no rows"],
    ),
    (
        "push-pairs-ties-negative",
        "cli",
        ["push-pairs", "{w}/pairs.jsonl", "--repo-id", "{repo}", "--ties", "-1"],
        PAIRS_OK,
        ["--ties", "greater than or equal to 0"],
    ),
    (
        "push-explore-env-mismatch",
        "cli",
        ["push-explore", "{w}/t.jsonl", "--repo-id", "{repo}", "--env", "webshop"],
        rows_file("t.jsonl", [TRAJ]),
        ["t.jsonl", "row 0", "field 'env'", "expected 'webshop'"],
    ),
    (
        "push-pairs-schema-version",
        "cli",
        ["push-pairs", "{w}/p.jsonl", "--repo-id", "{repo}"],
        rows_file("p.jsonl", [PAIR, with_(PAIR, task_id="p2", schema_version=3)]),
        ["p.jsonl", "row 1", "field 'schema_version'", "version 3"],
    ),
    # --- expert ---------------------------------------------------------------------------------
    (
        "expert-out-not-jsonl",
        "cli",
        ["expert", "--env", ENV, "--limit", "1", "--out", "{w}/e.txt"],
        None,
        ["e.txt", "unknown file extension '.txt'", ".jsonl"],
    ),
    (
        "expert-out-holds-torn-pairs",
        "cli",
        ["expert", "--env", ENV, "--limit", "1", "--out", "{w}/pairs.jsonl"],
        rows_file("pairs.jsonl", [PAIR, PAIR], torn=True),
        ["pairs.jsonl", "row 0", "format etokit-pair"],
    ),
    (
        "expert-step-timeout-nan",
        "cli",
        ["expert", "--env", ENV, "--out", "{w}/e.jsonl", "--step-timeout", "nan"],
        None,
        ["--step-timeout"],
    ),
    (
        "expert-env-plugin-missing",
        "cli",
        ["expert", "--env", "no_such_pkg.envs:Env", "--out", "{w}/e.jsonl"],
        None,
        ["no_such_pkg.envs:Env", "cannot import"],
    ),
    # --- explore --------------------------------------------------------------------------------
    (
        "explore-env-unknown",
        "cli",
        ["explore", "--model", "{a}/tiny", "--env", "sciworld", "--out", "{w}/x.jsonl"],
        None,
        ["--env", "unknown environment 'sciworld'"],
    ),
    (
        "explore-model-no-chat-template",
        "cli",
        ["explore", "--model", "{a}/no_template", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model", "no_template", "no chat template"],
    ),
    (
        "explore-model-no-weights",
        "cli",
        ["explore", "--model", "{a}/no_weights", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model", "no_weights", "no model weights"],
    ),
    (
        "explore-model-pickle-only",
        "cli",
        ["explore", "--model", "{a}/pickle_only", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model", "pickle_only", "pytorch_model.bin", "safetensors only"],
    ),
    (
        "explore-model-remote-code",
        "cli",
        ["explore", "--model", "{a}/remote_code", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model", "remote_code", "auto_map", "--trust-remote-code"],
    ),
    (
        "explore-model-revision-traversal",
        "cli",
        ["explore", "--model", "etokit-tests/agent@../../etc", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model revision", "'../../etc'"],
    ),
    (
        "explore-model-absolute-repo",
        "cli",
        ["explore", "--model", "/no/such/model@iter-1", "--env", ENV, "--out", "{w}/x.jsonl"],
        None,
        ["--model", "'/no/such/model'"],
    ),
    ("explore-temperature-nan", "cli", [*EXPLORE, "--temperature", "nan"], None, ["--temperature"]),
    ("explore-top-p-above-one", "cli", [*EXPLORE, "--top-p", "1.5"], None, ["--top-p", "less than or equal to 1"]),
    (
        "explore-out-holds-pairs",
        "cli",
        ["explore", "--model", "{a}/tiny", "--env", ENV, "--out", "{w}/pairs.jsonl"],
        PAIRS_OK,
        ["pairs.jsonl", "row 0", "format etokit-pair", "expected etokit-trajectory"],
    ),
    (
        "explore-out-suffix",
        "cli",
        ["explore", "--model", "{a}/tiny", "--env", ENV, "--out", "{w}/x.json"],
        None,
        ["--out", "x.json", ".jsonl"],
    ),
    # --- eval -----------------------------------------------------------------------------------
    (
        "eval-model-pickle-only",
        "cli",
        ["eval", "--model", "{a}/pickle_only", "--env", ENV, "--limit", "1"],
        None,
        ["--model", "pickle_only", "safetensors only"],
    ),
    (
        "eval-limit-zero",
        "cli",
        ["eval", "--model", "{a}/tiny", "--env", ENV, "--limit", "0"],
        None,
        ["--limit", "greater than or equal to 1"],
    ),
    (
        "eval-trajectories-suffix",
        "cli",
        ["eval", "--model", "{a}/tiny", "--env", ENV, "--trajectories", "{w}/t.json"],
        None,
        ["t.json", ".jsonl"],
    ),
    (
        "eval-dtype-unknown",
        "cli",
        ["eval", "--model", "{a}/tiny", "--env", ENV, "--dtype", "int4"],
        None,
        ["--dtype", "'int4'"],
    ),
    # --- build-pairs ----------------------------------------------------------------------------
    (
        "build-pairs-empty-explore",
        "cli",
        ["build-pairs", "--expert", "{w}/expert.jsonl", "--explore", "{w}/x.jsonl", "--out", "{w}/out.jsonl"],
        both(EXPERTS, raw_file("x.jsonl", b"\n"), PREVIOUS),
        ["x.jsonl", "no rows"],
    ),
    (
        "build-pairs-out-is-input",
        "cli",
        ["build-pairs", "--expert", "{w}/expert.jsonl", "--explore", "{w}/x.jsonl", "--out", "{w}/x.jsonl"],
        both(EXPERTS, rows_file("x.jsonl", [traj("t0", 0.0, source="explore")])),
        ["--out", "x.jsonl", "is the input file"],
    ),
    (
        "build-pairs-env-unknown",
        "cli",
        [
            "build-pairs",
            "--expert",
            "{w}/expert.jsonl",
            "--explore",
            "{w}/expert.jsonl",
            "--out",
            "{w}/p.jsonl",
            "--env",
            "nethack",
        ],
        EXPERTS,
        ["--env", "unknown environment 'nethack'"],
    ),
    (
        "build-pairs-all-ties",
        "cli",
        ["build-pairs", "--expert", "{w}/expert.jsonl", "--explore", "{w}/expert.jsonl", "--out", "{w}/out.jsonl"],
        both(EXPERTS, PREVIOUS),
        ["no pairs", "'tie': 3"],
    ),
    (
        "build-pairs-iteration-negative",
        "cli",
        [
            "build-pairs",
            "--expert",
            "{w}/expert.jsonl",
            "--explore",
            "{w}/expert.jsonl",
            "--out",
            "{w}/p.jsonl",
            "--iteration",
            "-1",
        ],
        EXPERTS,
        ["--iteration", "greater than or equal to 0"],
    ),
    (
        "build-pairs-explore-holds-pairs",
        "cli",
        ["build-pairs", "--expert", "{w}/expert.jsonl", "--explore", "{w}/pairs.jsonl", "--out", "{w}/p.jsonl"],
        both(EXPERTS, PAIRS_OK),
        ["pairs.jsonl", "holds pairs", "expected trajectories"],
    ),
    # --- init-model / models import-gguf --------------------------------------------------------
    (
        "init-model-size-unknown",
        "cli",
        ["init-model", "--corpus", "{w}/expert.jsonl", "--out", "{w}/m", "--size", "huge"],
        EXPERTS,
        ["--size", "'huge'", "tiny, small"],
    ),
    (
        "init-model-out-not-empty",
        "cli",
        ["init-model", "--corpus", "{w}/expert.jsonl", "--out", "{w}/m"],
        both(EXPERTS, model_dir_not_empty),
        ["--out", "not empty", "--overwrite"],
    ),
    (
        "init-model-corpus-holds-pairs",
        "cli",
        ["init-model", "--corpus", "{w}/pairs.jsonl", "--out", "{w}/m"],
        PAIRS_OK,
        ["pairs.jsonl", "holds pairs"],
    ),
    (
        "init-model-corpus-not-utf8",
        "cli",
        ["init-model", "--corpus", "{w}/c.txt", "--out", "{w}/m"],
        raw_file("c.txt", "café\n".encode("latin-1")),
        ["--corpus", "c.txt", "not UTF-8"],
    ),
    (
        "import-gguf-not-gguf",
        "cli",
        ["models", "import-gguf", "{w}/model.gguf", "--out", "{w}/m"],
        raw_file("model.gguf", b"PK\x03\x04 a zip"),
        ["model.gguf", "not a GGUF file"],
    ),
    (
        "import-gguf-dtype-unknown",
        "cli",
        ["models", "import-gguf", "{w}/model.gguf", "--out", "{w}/m", "--dtype", "int8"],
        FAKE_GGUF,
        ["--dtype", "'int8'"],
    ),
    (
        "import-gguf-out-not-empty",
        "cli",
        ["models", "import-gguf", "{w}/model.gguf", "--out", "{w}/m"],
        both(FAKE_GGUF, model_dir_not_empty),
        ["--out", "not empty", "--overwrite"],
    ),
    # --- hub serve ------------------------------------------------------------------------------
    (
        "hub-serve-port-out-of-range",
        "cli",
        ["hub", "serve", "--data-dir", "{w}/hub", "--port", "70000"],
        None,
        ["--port", "70000"],
    ),
    (
        "hub-serve-data-dir-is-a-file",
        "cli",
        ["hub", "serve", "--data-dir", "{w}/out.jsonl"],
        PREVIOUS,
        ["--data-dir", "out.jsonl", "not a directory"],
    ),
    # --- run ------------------------------------------------------------------------------------
    (
        "run-yaml-wrong-type",
        "cli",
        ["run", "--config", "{w}/eto.yaml"],
        run_yaml("iterations: three\n"),
        ["'iterations'", "eto.yaml", "must be an integer", "'three'"],
    ),
    (
        "run-dpo-beta-nan",
        "cli",
        [*RUN, "--dpo-schedule.beta", "0.1", "nan"],
        None,
        ["--dpo-schedule.beta", "finite", "nan"],
    ),
    (
        "run-bc-learning-rate-negative",
        "cli",
        [*RUN, "--bc.learning-rate", "-1e-5"],
        None,
        ["--bc.learning-rate", "> 0", "-1e-05"],
    ),
    (
        "run-push-to-traversal",
        "cli",
        ["run", "--run-dir", "{w}/run", "--push-to", "../agent"],
        None,
        ["--push-to", "'../agent'"],
    ),
    (
        "run-revision-traversal",
        "cli",
        [*RUN, "--base-model", "etokit-tests/base", "--base-model-revision", "a/../../b"],
        None,
        ["--base-model-revision", "'a/../../b'"],
    ),
    (
        "run-dataset-prefix-absolute",
        "cli",
        [*RUN, "--dataset-prefix", "/tmp/data"],
        None,
        ["--dataset-prefix", "'/tmp/data'"],
    ),
    (
        "run-base-model-no-weights",
        "cli",
        [*RUN, "--base-model", "{a}/no_weights"],
        None,
        ["--base-model", "no_weights", "no model weights"],
    ),
    (
        "run-base-model-no-chat-template",
        "cli",
        [*RUN, "--base-model", "{a}/no_template"],
        None,
        ["--base-model", "no_template", "no chat template"],
    ),
    (
        "run-expert-data-holds-pairs",
        "cli",
        [*RUN, "--expert-data", "{w}/pairs.jsonl"],
        PAIRS_OK,
        ["pairs.jsonl", "holds pairs", "expected trajectories"],
    ),
    ("run-dir-holds-a-run", "cli", RUN, run_dir_with_manifest, ["run", "already holds a run", "--resume"]),
    (
        "run-env-options-not-a-mapping",
        "cli",
        ["run", "--config", "{w}/eto.yaml"],
        run_yaml("env_options: [1]\n"),
        ["'env_options'", "eto.yaml", "must be a mapping"],
    ),
    # --- etokit.recipes.train_bc -----------------------------------------------------------------
    ("bc-learning-rate-nan", "bc", [*BC, "--learning-rate", "nan"], EXPERTS, ["--learning-rate", "finite", "nan"]),
    (
        "bc-yaml-unknown-key",
        "bc",
        [*BC, "--config", "{w}/bc.yaml"],
        both(EXPERTS, raw_file("bc.yaml", b"lora_rank: 8\n")),
        ["unknown config key 'lora_rank'", "bc.yaml", "did you mean 'lora_r'"],
    ),
    ("bc-empty-data", "bc", BC, raw_file("expert.jsonl", b""), ["expert.jsonl", "no rows"]),
    (
        "bc-data-holds-pairs",
        "bc",
        [*BC[:2], "--data", "{w}/pairs.jsonl", *BC[4:]],
        PAIRS_OK,
        ["pairs.jsonl", "holds pairs", "expected trajectories"],
    ),
    (
        "bc-model-no-chat-template",
        "bc",
        ["--model", "{a}/no_template", *BC[2:]],
        EXPERTS,
        ["--model", "no_template", "no chat template"],
    ),
    (
        "bc-model-pickle-only",
        "bc",
        ["--model", "{a}/pickle_only", *BC[2:]],
        EXPERTS,
        ["--model", "pickle_only", "safetensors only"],
    ),
    (
        "bc-sequences-longer-than-max-length",
        "bc",
        [*BC, "--max-length", "4"],
        EXPERTS,
        ["expert.jsonl", "no trajectory has an assistant turn within --max-length 4"],
    ),
    ("bc-push-to-traversal", "bc", [*BC, "--push-to", "../../x"], EXPERTS, ["--push-to", "'../../x'"]),
    ("bc-lora-dropout-above-one", "bc", [*BC, "--lora-dropout", "1.5"], EXPERTS, ["--lora-dropout", "< 1", "1.5"]),
    (
        "bc-output-dir-is-a-file",
        "bc",
        [*BC[:4], "--output-dir", "{w}/out.jsonl"],
        both(EXPERTS, PREVIOUS),
        ["--output-dir", "out.jsonl", "not a folder"],
    ),
    (
        "bc-data-revision-traversal",
        "bc",
        [*BC[:2], "--data", "etokit-tests/data", "--data-revision", "../main", *BC[4:]],
        None,
        ["--data-revision", "'../main'"],
    ),
    # --- etokit.recipes.train_dpo ----------------------------------------------------------------
    (
        "dpo-identical-pair",
        "dpo",
        DPO,
        rows_file("pairs.jsonl", [PAIR, identical_pair("p2")]),
        ["pairs.jsonl", "row 1", "(id 'p2')", "field 'chosen'", "identical"],
    ),
    ("dpo-beta-negative", "dpo", [*DPO, "--beta", "-0.1"], PAIRS_OK, ["--beta", "> 0", "-0.1"]),
    (
        "dpo-ref-model-no-weights",
        "dpo",
        [*DPO, "--ref-model", "{a}/no_weights"],
        PAIRS_OK,
        ["--ref-model", "no_weights", "no model weights"],
    ),
    (
        "dpo-sequences-longer-than-max-length",
        "dpo",
        [*DPO, "--max-length", "8"],
        PAIRS_OK,
        ["pair 0", "'p0'", "max_length=8", "--max-length"],
    ),
    (
        "dpo-revision-traversal",
        "dpo",
        [*DPO, "--push-to", "etokit-tests/agent", "--revision", "iter-1/../../main"],
        PAIRS_OK,
        ["--revision", "'iter-1/../../main'"],
    ),
    (
        "dpo-model-remote-code",
        "dpo",
        ["--model", "{a}/remote_code", *DPO[2:]],
        PAIRS_OK,
        ["--model", "remote_code", "--trust-remote-code"],
    ),
    ("dpo-backend-unknown", "dpo", [*DPO, "--backend", "triton"], PAIRS_OK, ["--backend", "'triton'"]),
]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model and its broken variants, shared (read-only) by every case."""
    import torch
    from safetensors.torch import load_file

    from etokit.models.init_model import build_tiny_model

    root = tmp_path_factory.mktemp("assets")
    texts = [m["content"] for i in range(6) for m in factories.trajectory(f"t{i}", 1.0, seed=i).messages]
    texts += [m["content"] for m in factories.pair("p0").to_row()["rejected"]]
    build_tiny_model(texts, root / "tiny", vocab_size=400)

    def variant(name, change):
        shutil.copytree(root / "tiny", root / name)
        change(root / name)

    def no_template(d):
        (d / "chat_template.jinja").unlink()
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(config))

    def pickle_only(d):
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def remote_code(d):
        config = json.loads((d / "config.json").read_text())
        config.update(
            model_type="evil_llama", auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
        )
        (d / "config.json").write_text(json.dumps(config))
        # Would leave a marker in the assets (which every case checks are unchanged) if it ever ran.
        (d / "evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n")

    variant("no_template", no_template)
    variant("no_weights", lambda d: (d / "model.safetensors").unlink())
    variant("pickle_only", pickle_only)
    variant("remote_code", remote_code)
    return root


@pytest.fixture(scope="module")
def existing_repo(hub_server):
    """A dataset repo with one push already in it: failed pushes must leave its history alone."""
    import uuid

    from etokit.data import Records, Trajectory
    from etokit.hub.publish import push_dataset

    repo = f"etokit-tests/faults-{uuid.uuid4().hex[:8]}"
    records = Records("trajectory", [Trajectory.from_row(TRAJ)], "etokit-trajectory", Path("seed.jsonl"))
    push_dataset(records, repo, card="expert", split="train")
    return repo


def invoke(runner: str, argv: list[str]) -> tuple[int, str, BaseException | None]:
    """(exit code, everything printed, an unexpected exception) of one command."""
    if runner == "cli":
        from typer.testing import CliRunner

        from etokit.cli import app

        result = CliRunner().invoke(app, argv)
        unexpected = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
        return result.exit_code, result.output, unexpected
    from etokit.recipes.launch import run_recipe

    script = importlib.import_module({"bc": "etokit.recipes.train_bc", "dpo": "etokit.recipes.train_dpo"}[runner])
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run_recipe(lambda: script.main(argv))  # the scripts' own entry point: `Error: ...`, exit code
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), None


def snapshot(roots: list[Path], hub_store: Path) -> dict[str, object]:
    """Every file under ``roots`` with its bytes, and every file of the Hub's store with its size
    and modification time (it holds the whole session's repos)."""
    state: dict[str, object] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            state[str(p)] = p.read_bytes() if p.is_file() else "dir"
    for p in sorted(hub_store.rglob("*")):
        state[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
    return state


@pytest.mark.parametrize("runner,argv,setup,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    assets, existing_repo, hub, tmp_path, runner, argv, setup, words
):
    work = tmp_path / "w"
    work.mkdir()
    if setup is not None:
        setup(work)
    fresh = f"etokit-tests/never-{tmp_path.name}"[:90]
    argv = [a.format(w=work, a=assets, repo=existing_repo, fresh=fresh) for a in argv]
    before = snapshot([work, assets], hub.storage.root)

    code, output, unexpected = invoke(runner, argv)

    assert unexpected is None, f"{type(unexpected).__name__}: {unexpected}\n{output}"
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    missing = [w for w in words if w not in errors[0]]
    assert not missing, f"{missing} not in: {errors[0]}"
    assert snapshot([work, assets], hub.storage.root) == before, "a failed command wrote or changed files"


def test_the_table_covers_every_command_family():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    families = {c[2][0] for c in CASES if c[1] == "cli"} | {c[1] for c in CASES if c[1] != "cli"}
    assert families >= {
        "validate",
        "import-eto",
        "export-eto",
        "push-expert",
        "push-explore",
        "push-pairs",
        "expert",
        "explore",
        "eval",
        "build-pairs",
        "init-model",
        "models",
        "hub",
        "run",
        "bc",
        "dpo",
    }
