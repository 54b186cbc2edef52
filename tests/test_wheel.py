"""The path a user takes after `pip install etokit`: the built wheel, installed without the source
tree, run from a folder outside the repository.

The wheel goes into a fresh venv with ``--no-deps``; that venv sees this environment's
dependencies through a path entry (not a site dir, so the editable install's finder, which points
at the checkout, is not loaded). Every command then runs with the checkout nowhere on sys.path:
the recipes, the shipped configs and the card templates must all come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """What a clean clone has: tracked files plus new ones git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files the wheel is built from")
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, etokit console script) of a fresh venv holding only the etokit wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("etokit-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: this environment's packages become importable, its .pth files (the
    # editable install of the checkout among them) are not run.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "etokit_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python, venv / "bin" / "etokit"


@pytest.fixture
def user_env(tmp_path):
    """The environment of a user's shell: the test session's Hub variables, nothing of the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="2", ACCELERATE_MIXED_PRECISION="no")
    return env


def _run(cmd, cwd, env, timeout=600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"$ {' '.join(map(str, cmd))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_installed_wheel_runs_the_whole_path_outside_the_checkout(installed, user_env, hub, repo_name, tmp_path):
    python, etokit = installed
    work = tmp_path / "user"
    work.mkdir()

    where = _run(
        [python, "-c", "import etokit, etokit.recipes.train_bc as r; print(etokit.__file__); print(r.__file__)"],
        work,
        user_env,
    )
    assert str(ROOT) not in where and "site-packages" in where, where

    # Shipped data a user names without a path: run and accelerate configs.
    shipped = _run(
        [
            python,
            "-c",
            "from etokit.configs import resolve; print(resolve('scienceworld')); "
            "print(resolve('cpu_2proc', 'accelerate'))",
        ],
        work,
        user_env,
    )
    assert shipped.count("site-packages") == 2, shipped

    _run(
        [etokit, "expert", "--env", "textworld-express", "--split", "train", "--limit", "3", "--out", "expert.jsonl"],
        work,
        user_env,
    )
    _run([etokit, "init-model", "--corpus", "expert.jsonl", "--out", "tiny", "--size", "tiny"], work, user_env)
    # BC through accelerate's launcher (`etokit train`), pushed as revision `bc`: the model card
    # template must come from the wheel.
    _run(
        [
            etokit,
            "train",
            "bc",
            "--num-processes",
            "1",
            "--model",
            "tiny",
            "--data",
            "expert.jsonl",
            "--output-dir",
            "bc",
            "--max-steps",
            "2",
            "--report-to",
            "none",
            "--push-to",
            repo_name,
            "--revision",
            "bc",
        ],
        work,
        user_env,
    )
    _run(
        [
            etokit,
            "explore",
            "--model",
            "bc",
            "--env",
            "textworld-express",
            "--split",
            "train",
            "--limit",
            "3",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            "explore.jsonl",
        ],
        work,
        user_env,
    )
    _run(
        [
            etokit,
            "build-pairs",
            "--expert",
            "expert.jsonl",
            "--explore",
            "explore.jsonl",
            "--out",
            "pairs.jsonl",
            "--iteration",
            "1",
        ],
        work,
        user_env,
    )
    assert (work / "pairs.jsonl").read_text().strip(), "the 2-step BC policy should lose to the expert somewhere"
    # A dataset card rendered from the wheel's templates.
    _run([etokit, "push-pairs", "pairs.jsonl", "--repo-id", f"{repo_name}-pairs", "--split", "iter_1"], work, user_env)
    # DPO as `python -m etokit.recipes.train_dpo`, from the BC checkpoint on the Hub.
    _run(
        [
            python,
            "-m",
            "etokit.recipes.train_dpo",
            "--model",
            repo_name,
            "--model-revision",
            "bc",
            "--data",
            "pairs.jsonl",
            "--output-dir",
            "dpo",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--report-to",
            "none",
            "--learning-rate",
            "1e-3",
            "--warmup-ratio",
            "0",
            "--push-to",
            repo_name,
            "--revision",
            "iter-1",
        ],
        work,
        user_env,
    )

    check = f"""
import json, torch
from huggingface_hub import hf_hub_download
from transformers import AutoModelForCausalLM
hub = AutoModelForCausalLM.from_pretrained({repo_name!r}, revision="iter-1", use_safetensors=True)
local = AutoModelForCausalLM.from_pretrained("dpo", use_safetensors=True)
bc = AutoModelForCausalLM.from_pretrained({repo_name!r}, revision="bc", use_safetensors=True)
same = all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), local.state_dict().values()))
moved = any(not torch.equal(a, b) for a, b in zip(hub.state_dict().values(), bc.state_dict().values()))
model_card = open(hf_hub_download({repo_name!r}, "README.md", revision="iter-1")).read()
data_card = open(hf_hub_download({repo_name + "-pairs"!r}, "README.md", repo_type="dataset")).read()
print(json.dumps(dict(same=same, moved=moved, model_card=model_card, data_card=data_card)))
"""
    got = json.loads(_run([python, "-c", check], work, user_env).strip().splitlines()[-1])
    assert got["same"], "iter-1 on the Hub is not the DPO checkpoint that was trained"
    assert got["moved"], "DPO did not change the BC weights"
    assert "iter-1" in got["model_card"] and "etokit" in got["model_card"]
    assert "iter_1" in got["data_card"]


def test_installed_wheel_ships_every_recipe_config_and_template(installed, user_env, tmp_path):
    python, _ = installed
    listing = _run(
        [
            python,
            "-c",
            """
from importlib import resources
import etokit
root = resources.files(etokit)
for sub in ("recipes", "configs", "configs/accelerate", "templates/data_cards", "templates/model_cards"):
    print(sub, sorted(p.name for p in root.joinpath(sub).iterdir() if not p.name.startswith("__")))
""",
        ],
        tmp_path,
        user_env,
    )
    for sub, sources in {
        "recipes": ROOT / "etokit" / "recipes",
        "configs": ROOT / "etokit" / "configs",
        "configs/accelerate": ROOT / "etokit" / "configs" / "accelerate",
        "templates/data_cards": ROOT / "data_cards",
        "templates/model_cards": ROOT / "model_cards",
    }.items():
        expected = sorted(p.name for p in sources.iterdir() if not p.name.startswith("__"))
        assert f"{sub} {expected}" in listing, listing
