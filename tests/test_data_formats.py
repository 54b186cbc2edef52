"""Reading, converting and writing trajectory/pair files: lossless round trips (official ETO rows,
etokit JSONL, datasets.Dataset, Parquet), crash-safe appends and atomic writes, summaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from etokit.data import (
    DataError,
    JsonlAppender,
    from_dataset,
    load_records,
    pair_from_eto,
    pair_stats,
    pair_to_eto,
    read_jsonl,
    to_dataset,
    to_eto_rows,
    trajectory_from_eto,
    trajectory_stats,
    trajectory_to_eto,
    write_jsonl,
)
from etokit.data.schema import PAIR_COLUMNS, TRAJECTORY_COLUMNS, pair_features, trajectory_features
from tests import factories

FIXTURES = Path(__file__).parent / "fixtures" / "eto"
# file, env to pass (None: inferred), expected format, expected env
OFFICIAL = [
    ("webshop_sft.json", "webshop", "eto-sft", "webshop"),
    ("sciworld_sft.json", "sciworld", "eto-sft", "sciworld"),
    ("alfworld_sft.json", None, "eto-sft", "alfworld"),
    ("webshop_pairs.json", "webshop", "eto-pairs", "webshop"),
]


def _official_rows(name: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize("name,env,fmt,expected_env", OFFICIAL)
def test_official_rows_round_trip_exactly(name, env, fmt, expected_env):
    rows = _official_rows(name)
    records = load_records(FIXTURES / name, env=env)
    assert records.format == fmt and len(records) == len(rows)
    assert {r.env for r in records.records} == {expected_env}
    back = to_eto_rows(records)
    assert back == rows
    assert [list(b) for b in back] == [list(r) for r in rows]  # key order too
    assert [type(b["id"]) for b in back] == [type(r["id"]) for r in rows]


@pytest.mark.parametrize("name,env,fmt,expected_env", OFFICIAL)
def test_official_rows_survive_etokit_jsonl(tmp_path, name, env, fmt, expected_env):
    # extra goes to disk as a JSON string with sorted keys; the export must still be exact.
    imported = load_records(FIXTURES / name, env=env)
    out = tmp_path / "imported.jsonl"
    write_jsonl(out, imported)
    again = load_records(out)
    assert again.format == fmt.replace("eto-sft", "etokit-trajectory").replace("eto-pairs", "etokit-pair")
    assert again.records == imported.records
    assert to_eto_rows(again) == _official_rows(name)


def test_webshop_import_keeps_int_ids_reward_and_its_own_source():
    row = _official_rows("webshop_sft.json")[1]
    t = trajectory_from_eto(row, env="webshop")
    assert t.task_id == str(row["id"]) and t.extra["eto_id"] == row["id"]
    assert t.reward == row["reward"] and t.success is (row["reward"] >= 1.0)
    assert t.source == "expert" and t.extra["eto_fields"]["source"] == row["source"]
    assert [m["role"] for m in t.messages] == [
        {"human": "user", "gpt": "assistant"}[c["from"]] for c in row["conversations"]
    ]
    assert t.num_steps == sum(c["from"] == "gpt" for c in row["conversations"]) - 1  # minus the "OK"
    assert trajectory_to_eto(t) == row


def test_rows_without_reward_get_the_expert_reward_and_no_reward_key_back():
    for name, env in (("sciworld_sft.json", "sciworld"), ("alfworld_sft.json", "alfworld")):
        row = _official_rows(name)[0]
        assert "reward" not in row
        t = trajectory_from_eto(row, env=env, split="test")
        assert t.reward == 1.0 and t.success and t.split == "test"
        assert "reward" not in trajectory_to_eto(t)
    alf = _official_rows("alfworld_sft.json")[0]
    assert trajectory_from_eto(alf, env="alfworld").extra["game_file"] == alf["game_file"]


def test_scienceworld_ids_map_to_the_environment_and_back():
    from importlib import resources

    from etokit.data.eto_format import (
        SCIWORLD_TASK_NAMES,
        task_id_from_eto,
        task_id_to_eto,
        trajectory_from_eto,
        trajectory_to_eto,
    )
    from etokit.envs.scienceworld import load_splits, simulator_task_name

    rows = _official_rows("sciworld_sft.json")
    trajs = [trajectory_from_eto(r, env="scienceworld") for r in rows]
    assert [t.task_id for t in trajs] == ["boil_12", "find-plant_7"]
    assert [trajectory_to_eto(t) for t in trajs] == rows
    assert task_id_from_eto("0_12", "webshop") == "0_12" and task_id_from_eto("5_1", "scienceworld") == "5_1"

    number = {name: n for n, name in SCIWORLD_TASK_NAMES.items()}
    index = json.loads(resources.files("etokit.envs").joinpath("data", "scienceworld_official.json").read_text())
    # ETO's ids of every split map onto etokit's, in order, and etokit's back onto ETO's.
    for split in ("train", "test-seen", "test-unseen"):
        eto_ids = [f"{number[simulator_task_name(name)]}_{variation}" for name, variation in index[split]]
        assert [task_id_from_eto(i, "scienceworld") for i in eto_ids] == load_splits()[split]
        assert [task_id_to_eto(t, "scienceworld") for t in load_splits()[split]] == eto_ids
    assert task_id_to_eto("boil_12", "webshop") == "boil_12" and task_id_to_eto("t7", "scienceworld") == "t7"


def test_exported_reward_and_id_follow_edits_to_imported_records():
    row = _official_rows("webshop_sft.json")[0]
    t = trajectory_from_eto(row, env="webshop")
    t.reward, t.task_id = 0.25, "renamed"
    out = trajectory_to_eto(t)
    assert out["reward"] == 0.25 and out["id"] == "renamed"


def test_explored_trajectory_exports_with_reward_and_rejects_a_system_turn():
    t = factories.trajectory("t7", 0.5, source="explore")
    row = trajectory_to_eto(t)
    assert row == {
        "id": "t7",
        "reward": 0.5,
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in t.messages
        ],
    }
    t.messages.insert(0, {"role": "system", "content": "be brief"})
    with pytest.raises(DataError, match=r"messages\[0\].role.*'system' has no official ETO equivalent"):
        trajectory_to_eto(t)


def test_pair_from_eto_is_a_dpo_pair_and_round_trips():
    row = _official_rows("webshop_pairs.json")[0]
    p = pair_from_eto(row, env="webshop")
    assert p.prompt[-1]["role"] == "user" and p.chosen[0]["role"] == "assistant"
    assert p.chosen[-1]["role"] == p.rejected[-1]["role"] == "assistant"
    assert p.outcome is None and p.chosen_reward is None and p.mode == "trajectory"
    assert pair_to_eto(p) == row


def test_official_jsonl_and_parquet_with_null_columns(tmp_path):
    # A Parquet file mixing WebShop and ScienceWorld rows has reward/source columns that are null
    # on the ScienceWorld rows; the nulls come back as nulls, not as the expert reward.
    from datasets import Dataset

    rows = _official_rows("webshop_sft.json") + [
        dict(r, id=100 + i) for i, r in enumerate(_official_rows("sciworld_sft.json"))
    ]
    parquet = tmp_path / "mixed.parquet"
    Dataset.from_list(rows).to_parquet(parquet)
    with pytest.raises(DataError, match="row 3.*field 'reward'.*--expert-reward"):
        load_records(parquet, env="webshop")  # a WebShop expert's reward is never assumed
    records = load_records(parquet, env="webshop", expert_reward=1.0)
    assert records.format == "eto-sft"
    assert [t.reward for t in records.records][-2:] == [1.0, 1.0]
    assert [t.extra.get("expert_reward_stated") for t in records.records][-3:] == [None, 1.0, 1.0]
    assert to_eto_rows(records) == Dataset.from_parquet(str(parquet)).to_list()

    jsonl = tmp_path / "webshop.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _official_rows("webshop_sft.json")))
    assert to_eto_rows(load_records(jsonl, "trajectory", env="webshop")) == _official_rows("webshop_sft.json")


@pytest.mark.parametrize("kind", ["trajectory", "pair"])
def test_dataset_round_trip_with_explicit_features(tmp_path, kind):
    if kind == "trajectory":
        records = [
            factories.trajectory("a", 1.0),
            factories.trajectory("b", 0.3, 5, source="explore", seed=3, model="tiny", extra={"k": [1, 2]}),
        ]
        features, columns = trajectory_features(), TRAJECTORY_COLUMNS
    else:
        records = [factories.pair("a", 1), factories.pair("b", 2, outcome="win")]
        features, columns = pair_features(), PAIR_COLUMNS
    ds = to_dataset(records)
    assert ds.features == features and tuple(ds.column_names) == columns
    assert ds.to_list() == [r.to_row() for r in records]
    assert from_dataset(ds, kind) == records
    # The same rows as a Parquet file read back through load_records.
    ds.to_parquet(tmp_path / "x.parquet")
    loaded = load_records(tmp_path / "x.parquet", kind)
    assert loaded.format == f"etokit-{kind}" and loaded.records == records


def test_to_dataset_refuses_no_rows_and_mixed_kinds():
    with pytest.raises(DataError, match="no rows"):
        to_dataset([])
    with pytest.raises(DataError, match="mix"):
        to_dataset([factories.trajectory("a", 1.0), factories.pair("a")])


def test_appender_repairs_a_torn_line_and_resumes(tmp_path):
    path = tmp_path / "explore.jsonl"
    trajs = [factories.trajectory(str(i), i / 4, source="explore") for i in range(5)]
    with JsonlAppender(path, "trajectory") as out:
        assert out.existing_ids == frozenset() and out.count == 0
        for t in trajs[:3]:
            out.append(t)
        assert out.ids == {"0", "1", "2"}
    good = path.read_bytes()
    # A crash in the middle of the 4th append leaves part of a line without its newline.
    line = (json.dumps(trajs[3].to_row()) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line[: len(line) // 2])
    with pytest.raises(DataError, match=r"line 4 is truncated"):
        read_jsonl(path, "trajectory")

    with JsonlAppender(path, "trajectory") as out:
        assert out.repaired_bytes == len(line) // 2
        assert path.read_bytes() == good
        assert out.existing_ids == {"0", "1", "2"} and out.existing == trajs[:3]
        todo = [t for t in trajs if t.task_id not in out.existing_ids]
        for t in todo:
            out.append(t)
        assert out.existing_ids == {"0", "1", "2"} and out.ids == {str(i) for i in range(5)}
    assert read_jsonl(path, "trajectory") == trajs


def test_appender_refuses_the_other_kind_and_invalid_records(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [factories.pair("a")])
    with pytest.raises(DataError, match=r"row 0.*format etokit-pair, expected etokit-trajectory"):
        JsonlAppender(path, "trajectory")
    with JsonlAppender(path, "pair") as out:
        bad = factories.pair("b")
        bad.rejected = list(bad.chosen)
        with pytest.raises(DataError, match="identical"):
            out.append(bad)
        with pytest.raises(TypeError):
            out.append(factories.trajectory("c", 1.0))
    assert [p.task_id for p in read_jsonl(path, "pair")] == ["a"]


def test_read_jsonl_of_an_empty_file_is_empty(tmp_path):
    path = tmp_path / "new.jsonl"
    JsonlAppender(path, "pair").close()
    assert path.exists() and read_jsonl(path, "pair") == []


@pytest.mark.parametrize("failure", ["unserialisable", "invalid"])
def test_atomic_write_keeps_the_old_file_when_writing_fails_midway(tmp_path, failure):
    path = tmp_path / "data.jsonl"
    old = [factories.trajectory("old", 1.0)]
    write_jsonl(path, old)
    before = path.read_bytes()
    bad = factories.trajectory("bad", 0.5)
    if failure == "unserialisable":
        bad.extra = {"seen": {1, 2}}  # a set is not JSON
    else:
        bad.reward = 7.0
    new = [factories.trajectory(str(i), 0.5) for i in range(50)] + [bad]
    with pytest.raises(DataError, match=r"record 50.*(extra|reward)"):
        write_jsonl(path, new)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["data.jsonl"]  # the temp file is gone
    write_jsonl(path, new[:-1])
    assert read_jsonl(path, "trajectory") == new[:-1]


def test_trajectory_stats():
    rewards = [0.0, 0.05, 0.3, 0.3, 0.55, 0.999, 1.0, 1.0]
    trajs = [
        factories.trajectory(
            f"t{i}", r, n_steps=1 + i % 3, env="webshop" if i < 5 else "sciworld", split="train" if i % 2 else "test"
        )
        for i, r in enumerate(rewards)
    ]
    s = trajectory_stats(trajs)
    assert s["rows"] == len(rewards)
    assert s["avg_reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert s["success_rate"] == pytest.approx(sum(r >= 1.0 for r in rewards) / len(rewards))
    turns = [sum(m["role"] == "assistant" for m in t.messages) for t in trajs]
    assert s["avg_turns"] == pytest.approx(sum(turns) / len(turns))
    assert s["avg_steps"] == pytest.approx(sum(t - 1 for t in turns) / len(turns))
    hist = s["reward_histogram"]
    assert hist["edges"] == pytest.approx([i / 10 for i in range(11)])
    # 0.0 and 0.05 in the first bin, both 0.3 in [0.3, 0.4), 0.999 and 1.0 in the closed last bin.
    assert hist["counts"] == [2, 0, 0, 2, 0, 1, 0, 0, 0, 3]
    assert s["envs"] == {"sciworld": 3, "webshop": 5} and s["splits"] == {"test": 4, "train": 4}
    assert trajectory_stats([])["avg_reward"] is None


def test_pair_stats():
    pairs = [factories.pair("a", 1), factories.pair("b", 1), factories.pair("c", 2, outcome="win")]
    pairs.append(pair_from_eto(_official_rows("webshop_pairs.json")[0], env="webshop"))
    s = pair_stats(pairs, ties=4)
    assert (s["rows"], s["win"], s["lose"], s["tie"], s["unknown_outcome"]) == (4, 1, 2, 4, 1)
    known = [p for p in pairs if p.chosen_reward is not None]
    assert s["avg_chosen_reward"] == pytest.approx(sum(p.chosen_reward for p in known) / len(known))
    assert s["avg_rejected_reward"] == pytest.approx(sum(p.rejected_reward for p in known) / len(known))
    assert s["iterations"] == {"1": 2, "2": 1, "none": 1}
    json.dumps(s, sort_keys=True)  # published next to the dataset
    assert pair_stats(pairs)["tie"] is None
