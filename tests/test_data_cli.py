"""`etokit validate`, `import-eto`, `export-eto`: user errors are one line with exit code 2 (naming
the row and field), never a traceback, and an --out file is never created or clobbered by a failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import factories
from etokit.cli import app
from etokit.data import load_records, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "eto"
runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _bad_trajectory_file(tmp_path: Path) -> Path:
    rows = [factories.trajectory(f"t{i}", 1.0).to_row() for i in range(3)]
    rows[2]["messages"][3]["role"] = "robot"
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validate_prints_format_rows_and_stats(tmp_path):
    result = run("validate", FIXTURES / "webshop_sft.json", "--env", "webshop")
    assert result.exit_code == 0, result.output
    assert "eto-sft" in result.output and "3 trajectories" in result.output
    assert "avg_reward" in result.output and "0.8333" in result.output  # (1.0 + 0.5 + 1.0) / 3

    result = run("validate", FIXTURES / "webshop_pairs.json", "--env", "webshop", "--kind", "pair", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["format"], summary["kind"], summary["stats"]["rows"]) == ("eto-pairs", "pair", 2)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--env", "webshop"], ["bad.jsonl", "row 2 (id 't2')", "messages[3].role", "unknown role 'robot'"]),
        (["--kind", "pair"], ["holds trajectories", "expected pairs"]),
    ],
)
def test_validate_bad_file_exits_2_with_one_line(tmp_path, args, words):
    path = _bad_trajectory_file(tmp_path)
    if "--env" in args:
        # Only the row check can fail: the env matches.
        path.write_text(path.read_text().replace("textworld-express", "webshop"))
    result = run("validate", path, *args)
    assert result.exit_code == 2
    assert result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
    for word in words:
        assert word in result.output


def test_validate_official_file_without_env_asks_for_it(tmp_path):
    unnamed = tmp_path / "expert.json"  # a name that says nothing of the environment
    shutil.copy(FIXTURES / "sciworld_sft.json", unnamed)
    result = run("validate", unnamed)
    assert result.exit_code == 2 and "--env is needed" in result.output


def test_official_file_names_tell_the_environment(tmp_path):
    result = run("validate", FIXTURES / "sciworld_sft.json", "--json")  # sciworld_sft: the official file name
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stats"]["envs"] == {"scienceworld": 2}
    both = tmp_path / "webshop_and_alfworld.json"  # two environments named: no guess
    shutil.copy(FIXTURES / "sciworld_sft.json", both)
    assert run("validate", both).exit_code == 2


def test_import_then_export_gives_back_the_official_file(tmp_path):
    for name, env in (("webshop_sft.json", "webshop"), ("alfworld_sft.json", None), ("webshop_pairs.json", "webshop")):
        out = tmp_path / f"{name}.jsonl"
        result = run("import-eto", FIXTURES / name, "--out", out, *(["--env", env] if env else []), "--split", "dev")
        assert result.exit_code == 0, result.output
        imported = load_records(out)
        assert imported.format.startswith("etokit-")
        if imported.kind == "trajectory":
            assert {t.split for t in imported.records} == {"dev"}
        back = tmp_path / f"back_{name}"
        result = run("export-eto", out, "--out", back)
        assert result.exit_code == 0, result.output
        assert json.loads(back.read_text()) == json.loads((FIXTURES / name).read_text())


def test_scienceworld_ids_round_trip_between_etokit_and_official(tmp_path):
    # etokit-made trajectories and pairs export under the official "<taskname2id>_<variation>" ids ...
    src = tmp_path / "sciworld_expert.jsonl"
    trajs = [
        factories.trajectory(t, 1.0, env="scienceworld")
        for t in ("test-conductivity_412", "boil_12", "identify-life-stages-2_3")
    ]
    write_jsonl(src, trajs)
    official = tmp_path / "sciworld_sft.json"
    assert run("export-eto", src, "--out", official).exit_code == 0
    rows = json.loads(official.read_text())
    assert [r["id"] for r in rows] == ["9_412", "0_12", "24_3"]
    # ... and import back as the same records under etokit's ids.
    again = tmp_path / "again.jsonl"
    assert run("import-eto", official, "--env", "scienceworld", "--out", again).exit_code == 0
    back = load_records(again).records
    assert [t.task_id for t in back] == [t.task_id for t in trajs]
    assert [(t.messages, t.reward) for t in back] == [(t.messages, t.reward) for t in trajs]
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [factories.pair("grow-fruit_53", env="scienceworld")])
    assert run("export-eto", pairs, "--out", tmp_path / "pm.json").exit_code == 0
    assert json.loads((tmp_path / "pm.json").read_text())[0]["id"] == "15_53"

    # Official rows: imported under etokit's ids, exported back byte-for-byte the same rows.
    imported = tmp_path / "imported.jsonl"
    assert run("import-eto", FIXTURES / "sciworld_sft.json", "--env", "scienceworld", "--out", imported).exit_code == 0
    assert [t.task_id for t in load_records(imported).records] == ["boil_12", "find-plant_7"]
    assert run("export-eto", imported, "--out", tmp_path / "back.json").exit_code == 0
    assert json.loads((tmp_path / "back.json").read_text()) == json.loads((FIXTURES / "sciworld_sft.json").read_text())


def test_export_to_jsonl(tmp_path):
    src = tmp_path / "pairs.jsonl"
    pairs = [factories.pair("a"), factories.pair("b", outcome="win")]
    write_jsonl(src, pairs)
    out = tmp_path / "official.jsonl"
    assert run("export-eto", src, "--out", out).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["chosen"][0] == {"from": "gpt", "value": pairs[1].chosen[0]["content"]}


def test_import_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "expert.jsonl"
    out.write_text("keep me\n")
    result = run("import-eto", FIXTURES / "webshop_sft.json", "--env", "webshop", "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert out.read_text() == "keep me\n"
    result = run("import-eto", FIXTURES / "webshop_sft.json", "--env", "webshop", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(load_records(out)) == 3


def test_failed_import_leaves_out_untouched(tmp_path):
    bad = tmp_path / "bad_sft.json"
    rows = json.loads((FIXTURES / "webshop_sft.json").read_text())
    rows[1]["conversations"][4]["from"] = "observation"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "expert.jsonl"
    result = run("import-eto", bad, "--env", "webshop", "--out", out)
    assert result.exit_code == 2
    assert "row 1 (id 17)" in result.output and "conversations[4].from" in result.output
    assert not out.exists()

    out.write_text("previous\n")
    result = run("import-eto", bad, "--env", "webshop", "--out", out, "--overwrite")
    assert result.exit_code == 2 and out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_sft.json", "expert.jsonl"]  # no temp file left


@pytest.mark.parametrize(
    "command,src,out,words",
    [
        (
            "import-eto",
            "expert.jsonl",
            "again.jsonl",
            ["expert.jsonl", "is in format etokit-trajectory", "expected eto-sft or eto-pairs"],
        ),
        ("import-eto", "webshop_sft.json", "out.json", ["--out", "expected a .jsonl file"]),
        ("export-eto", "expert.jsonl", "expert.jsonl", ["is the input file"]),
        (
            "export-eto",
            "webshop_sft.json",
            "out.json",
            ["is in format eto-sft", "expected etokit-trajectory or etokit-pair"],
        ),
        ("export-eto", "system.jsonl", "out.json", ["messages[0].role", "'system' has no official ETO equivalent"]),
        ("export-eto", "missing.jsonl", "out.json", ["missing.jsonl", "does not exist"]),
    ],
)
def test_conversion_errors(tmp_path, command, src, out, words):
    shutil.copy(FIXTURES / "webshop_sft.json", tmp_path / "webshop_sft.json")
    write_jsonl(tmp_path / "expert.jsonl", [factories.trajectory("a", 1.0)])
    t = factories.trajectory("s", 1.0)
    t.messages.insert(0, {"role": "system", "content": "You are an agent."})
    write_jsonl(tmp_path / "system.jsonl", [t])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = (
        run(command, tmp_path / src, "--out", tmp_path / out, "--env", "webshop")
        if command == "import-eto"
        else run(command, tmp_path / src, "--out", tmp_path / out)
    )
    assert result.exit_code == 2
    for word in words:
        assert word in result.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_help_has_examples():
    for command in ("validate", "import-eto", "export-eto"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.output and f"$ etokit {command}" in result.output
