"""`make demo` / `python -m etokit.demo`: SmolLM2 with LoRA by default, the tiny model as
MODEL=tiny / --config demo, a missing SmolLM2 folder refused at once, and the paired table last."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etokit.configs import shipped
from etokit.demo import parse_args

ROOT = Path(__file__).resolve().parents[1]


def _make_n(cwd: Path, *variables: str) -> subprocess.CompletedProcess:
    # The Makefile run from an empty folder, so whether models/smollm2 exists is up to the test.
    return subprocess.run(
        ["make", "-s", "-n", "-f", str(ROOT / "Makefile"), "demo", *variables],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_is_the_smollm2_demo_and_model_tiny_the_tiny_one(tmp_path):
    default = _make_n(tmp_path)
    assert default.returncode == 0, default.stderr
    assert "-m etokit.demo --config demo-smollm2 --dir .demo-smollm2" in default.stdout
    # models/smollm2 is missing: prepared first, as `make smollm2` does.
    assert default.stdout.index("prepare_smollm2.sh") < default.stdout.index("-m etokit.demo")
    assert _make_n(tmp_path, "MODEL=smollm2").stdout == default.stdout

    tiny = _make_n(tmp_path, "MODEL=tiny")
    assert tiny.returncode == 0, tiny.stderr
    assert "-m etokit.demo --config demo --dir .demo\n" in tiny.stdout
    assert "prepare_smollm2" not in tiny.stdout

    # Present: not prepared (nor downloaded) again.
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    (tmp_path / "models" / "smollm2" / "model.safetensors").write_bytes(b"weights")
    present = _make_n(tmp_path)
    assert "prepare_smollm2" not in present.stdout
    assert "-m etokit.demo --config demo-smollm2 --dir .demo-smollm2" in present.stdout

    wrong = _make_n(tmp_path, "MODEL=smol")
    assert wrong.returncode != 0 and "MODEL=smol: expected smollm2 (the default) or tiny" in wrong.stderr


def test_python_m_etokit_demo_defaults_to_the_smollm2_config():
    args, overrides = parse_args([])
    assert args.config == shipped()["demo-smollm2"] and args.dir == Path(".demo-smollm2") and overrides == []
    args, overrides = parse_args(["--config", "demo", "--seed", "1"])
    assert args.config == shipped()["demo"] and args.dir == Path(".demo") and overrides == ["--seed", "1"]


def test_a_missing_smollm2_folder_is_one_line_naming_it_before_anything_is_wiped(tmp_path):
    # From a folder without models/smollm2, as from an installed wheel: the config's relative
    # base_model is read from the current folder, and the error says where it looked.
    kept = tmp_path / ".demo-smollm2" / "kept"
    kept.parent.mkdir()
    kept.write_text("an earlier demo's file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "etokit.demo"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("python -m etokit.demo: error: base model folder")
    assert f"models/smollm2 ({tmp_path / 'models' / 'smollm2'})" in out.stderr
    assert "`make smollm2` prepares it" in out.stderr and "etokit models import-gguf" in out.stderr
    assert "embedded Hub" not in out.stdout  # nothing started...
    assert kept.read_text() == "an earlier demo's file"  # ...nor wiped


@pytest.mark.slow  # ~2 min on 2 cores: the tiny loop with 2 iterations (BC, 2 x DPO launched)
def test_the_tiny_demo_ends_with_the_paired_table_of_bc_and_both_iterations(tmp_path):
    from tests.run_fixtures import TINY_RUN

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    cmd = [sys.executable, "-m", "etokit.demo", "--config", "demo", "--dir", str(tmp_path / "demo")]
    out = subprocess.run(
        [*cmd, *TINY_RUN, "--iterations", "2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "identical to the local checkpoint" in out.stdout
    lines = out.stdout.rstrip().splitlines()
    title = max(i for i, line in enumerate(lines) if line.startswith("ETO results"))
    assert "vs BC: paired difference" in lines[title]
    table = lines[title + 1 :]
    assert "test-seen vs BC" in table[1] and "test-unseen vs BC" in table[1]
    assert [row.split("│")[1].strip() for row in table if row.startswith("│")] == ["BC", "iter-1", "iter-2"]
    assert table[-1].startswith("└")  # the table is the last thing printed
