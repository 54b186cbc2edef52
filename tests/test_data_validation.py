"""Every malformed input is a DataError whose message names the file, row, id and field and says
what was expected; good inputs pass. One table row per rule."""

from __future__ import annotations

import copy
import json
import math

import pytest

from tests import factories
from etokit.data import DataError, load_records, validate_pair, validate_trajectory
from etokit.errors import EtokitError

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
    "reward": 0.5,
    "source": "human",
}
ETO_PAIR = {
    "id": "9",
    "prompt": ETO_SFT["conversations"][:3],
    "chosen": [{"from": "gpt", "value": "Action: search[jacket]"}],
    "rejected": [{"from": "gpt", "value": "Action: search[shoe]"}],
}
BASES = {"traj": TRAJ, "pair": PAIR, "sft": ETO_SFT, "eto_pair": ETO_PAIR}


def _set(path, value):
    def mutate(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _drop(*keys):
    def mutate(row):
        for k in keys:
            del row[k]

    return mutate


# (case id, base row, mutation, words the message must contain)
ROW_CASES = [
    (
        "unknown-role",
        "traj",
        _set(["messages", 3, "role"], "robot"),
        ["row 1", "(id 't1')", "field 'messages[3].role'", "unknown role 'robot'", "system, user, assistant"],
    ),
    ("empty-content", "traj", _set(["messages", 2, "content"], ""), ["messages[2].content", "empty content"]),
    (
        "non-string-content",
        "traj",
        _set(["messages", 2, "content"], 42),
        ["messages[2].content", "expected a string, got int"],
    ),
    ("message-not-object", "traj", _set(["messages", 1], "OK"), ["messages[1]", "expected a message object"]),
    ("message-extra-key", "traj", _set(["messages", 1, "name"], "bob"), ["messages[1]", "unexpected key(s) 'name'"]),
    (
        "from-value-in-etokit-row",
        "traj",
        _set(["messages", 0], {"from": "human", "value": "hi"}),
        ["messages[0]", "from/value", "etokit import-eto"],
    ),
    (
        "starts-with-assistant",
        "traj",
        lambda r: r["messages"].pop(0),
        ["messages[0].role", "expected role 'user', got 'assistant'", "alternate"],
    ),
    (
        "two-user-turns",
        "traj",
        _set(["messages", 1, "role"], "user"),
        ["messages[1].role", "expected role 'assistant', got 'user'"],
    ),
    (
        "late-system-turn",
        "traj",
        _set(["messages", 2, "role"], "system"),
        ["messages[2].role", "system turn is only allowed first"],
    ),
    (
        "leading-system-is-fine-but-then-user",
        "traj",
        lambda r: r["messages"].insert(0, {"role": "system", "content": "s"}) or r["messages"].pop(1),
        ["messages[1].role", "expected role 'user', got 'assistant'"],
    ),
    (
        "no-assistant-turn",
        "traj",
        _set(["messages"], [{"role": "user", "content": "task"}]),
        ["field 'messages'", "at least one turn of role 'assistant'"],
    ),
    ("no-messages", "traj", _set(["messages"], []), ["field 'messages'", "empty list"]),
    ("reward-string", "traj", _set(["reward"], "0.5"), ["field 'reward'", "expected a number in [0, 1]", "'0.5'"]),
    ("reward-bool", "traj", _set(["reward"], True), ["field 'reward'", "True"]),
    ("reward-nan", "traj", _set(["reward"], math.nan), ["field 'reward'", "nan"]),
    ("reward-above-one", "traj", _set(["reward"], 1.5), ["field 'reward'", "1.5"]),
    ("reward-negative", "traj", _set(["reward"], -0.1), ["field 'reward'", "-0.1"]),
    ("missing-fields", "traj", _drop("env", "reward"), ["row 1", "missing required field(s) 'env', 'reward'"]),
    ("unknown-column", "traj", _set(["rewards"], 1.0), ["unknown column(s) 'rewards'"]),
    ("task-id-not-string", "traj", _set(["task_id"], 7), ["field 'task_id'", "non-empty string", "7"]),
    ("bad-source", "traj", _set(["source"], "robot"), ["field 'source'", "expert, explore, human", "'robot'"]),
    ("success-not-bool", "traj", _set(["success"], "yes"), ["field 'success'", "'yes'"]),
    ("negative-steps", "traj", _set(["num_steps"], -1), ["field 'num_steps'", "-1"]),
    ("extra-bad-json", "traj", _set(["extra"], "{oops"), ["field 'extra'", "not a valid JSON string"]),
    ("extra-not-object", "traj", _set(["extra"], "[1, 2]"), ["field 'extra'", "expected an object"]),
    (
        "prompt-ends-on-assistant",
        "pair",
        lambda r: r["prompt"].append({"role": "assistant", "content": "x"}),
        ["(id 'p1')", "field 'prompt'", "must end on a turn of role 'user'"],
    ),
    (
        "chosen-starts-with-user",
        "pair",
        lambda r: r["chosen"].insert(0, {"role": "user", "content": "x"}),
        ["field 'chosen[0].role'", "expected role 'assistant', got 'user'"],
    ),
    (
        "chosen-ends-on-user",
        "pair",
        lambda r: r["chosen"].append({"role": "user", "content": "obs"}),
        ["field 'chosen'", "chosen must end on a turn of role 'assistant'", "trailing observation"],
    ),
    (
        "rejected-ends-on-user",
        "pair",
        lambda r: r["rejected"].append({"role": "user", "content": "obs"}),
        ["field 'rejected'", "rejected must end on a turn of role 'assistant'"],
    ),
    ("rejected-empty", "pair", _set(["rejected"], []), ["field 'rejected'", "empty list"]),
    (
        "chosen-identical-to-rejected",
        "pair",
        lambda r: r.update(rejected=copy.deepcopy(r["chosen"])),
        ["field 'chosen'", "identical to rejected"],
    ),
    ("outcome-tie", "pair", _set(["outcome"], "tie"), ["field 'outcome'", "win, lose or null", "'tie'"]),
    ("bad-mode", "pair", _set(["mode"], "token"), ["field 'mode'", "trajectory, step, mixture, self-play", "'token'"]),
    ("negative-iteration", "pair", _set(["iteration"], -1), ["field 'iteration'", "-1"]),
    ("chosen-reward-out-of-range", "pair", _set(["chosen_reward"], 2), ["field 'chosen_reward'", "2"]),
    ("pair-missing-fields", "pair", _drop("rejected"), ["missing required field(s) 'rejected'"]),
    (
        "eto-unknown-from",
        "sft",
        _set(["conversations", 1, "from"], "bot"),
        ["row 1", "(id 3)", "field 'conversations[1].from'", "unknown 'from' 'bot'", "human or gpt"],
    ),
    (
        "eto-role-order",
        "sft",
        _set(["conversations", 1, "from"], "human"),
        ["field 'conversations[1].from'", "expected role 'gpt', got 'human'"],
    ),
    ("eto-empty-value", "sft", _set(["conversations", 3, "value"], ""), ["conversations[3].value", "empty content"]),
    (
        "eto-non-string-value",
        "sft",
        _set(["conversations", 3, "value"], ["a"]),
        ["conversations[3].value", "expected a string, got list"],
    ),
    (
        "eto-role-content-turn",
        "sft",
        _set(["conversations", 0], {"role": "user", "content": "x"}),
        ["conversations[0]", "from/value"],
    ),
    (
        "eto-turn-missing-value",
        "sft",
        _set(["conversations", 2], {"from": "human"}),
        ["conversations[2]", "missing required key(s) 'value'"],
    ),
    ("eto-reward", "sft", _set(["reward"], 3), ["field 'reward'", "3"]),
    ("eto-id-float", "sft", _set(["id"], 1.5), ["field 'id'", "integer or a non-empty string", "1.5"]),
    ("eto-pair-missing-rejected", "eto_pair", _drop("rejected"), ["missing required field(s) 'rejected'"]),
    (
        "eto-pair-chosen-ends-on-human",
        "eto_pair",
        lambda r: r["chosen"].append({"from": "human", "value": "Observation: ok"}),
        ["(id '9')", "field 'chosen'", "chosen must end on a turn of role 'gpt'"],
    ),
    (
        "eto-pair-prompt-ends-on-gpt",
        "eto_pair",
        lambda r: r.update(prompt=r["prompt"][:2]),
        ["field 'prompt'", "must end on a turn of role 'human'"],
    ),
]


@pytest.mark.parametrize("base,mutate,words", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_malformed_row_is_a_data_error_naming_row_and_field(tmp_path, base, mutate, words):
    good = copy.deepcopy(BASES[base])
    bad = copy.deepcopy(BASES[base])
    mutate(bad)
    path = tmp_path / "data.jsonl"
    # The bad row is the second one, so "row 1" proves the index is 0-based and counted.
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_records(path, env="webshop" if base in ("sft", "eto_pair") else None)
    message = str(err.value)
    assert str(path) in message and "row 1" in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert isinstance(err.value, EtokitError) and err.value.row == 1


def test_good_rows_pass(tmp_path):
    # The table's base rows are valid, so each failure above comes from its mutation alone.
    for base, env in (("traj", None), ("pair", None), ("sft", "webshop"), ("eto_pair", "webshop")):
        assert len(load_records(_write(tmp_path / f"{base}.jsonl", [BASES[base]]), env=env)) == 1


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# (case id, file name, bytes, load_records kwargs, words)
FILE_CASES = [
    ("jsonl-not-json", "a.jsonl", (json.dumps(TRAJ) + "\n{not json}\n").encode(), {}, ["line 2 is not valid JSON"]),
    (
        "jsonl-truncated-last-line",
        "a.jsonl",
        (json.dumps(TRAJ) + "\n" + json.dumps(TRAJ)[:40]).encode(),
        {},
        ["line 2 is truncated", "does not end with a newline"],
    ),
    ("jsonl-line-not-object", "a.jsonl", b"[1, 2]\n", {}, ["line 1 is a list, expected a JSON object"]),
    (
        "json-truncated-in-string",
        "a.json",
        json.dumps([TRAJ, TRAJ], indent=2)[:-30].encode(),
        {},
        ["truncated JSON", "line ", "column ", "char "],
    ),
    (
        "json-truncated-between-values",
        "a.json",
        json.dumps([TRAJ, TRAJ])[:-1].encode(),
        {},
        ["truncated JSON", "line 1, column"],
    ),
    ("json-invalid", "a.json", b'[{"task_id": "x",, }]', {}, ["not valid JSON at line 1, column 18 (char 17)"]),
    ("json-not-a-list", "a.json", json.dumps({"data": [TRAJ]}).encode(), {}, ["expected a JSON list of rows"]),
    ("not-utf8", "a.jsonl", b'{"task_id": "caf\xe9"}\n', {}, ["not UTF-8", "0xe9", "byte offset 16"]),
    ("empty-file", "a.jsonl", b"", {}, ["no rows"]),
    ("empty-json-list", "a.json", b"[]", {}, ["no rows"]),
    ("blank-lines-only", "a.jsonl", b"\n\n", {}, ["no rows"]),
    ("unknown-extension", "a.csv", b"task_id,env\n", {}, ["unknown file extension '.csv'", ".jsonl, .json, .parquet"]),
    ("corrupt-parquet", "a.parquet", b"PAR1 not really", {}, ["not a readable Parquet file"]),
    (
        "no-known-format",
        "a.jsonl",
        b'{"question": "q", "answer": "a"}\n',
        {},
        ["row 0", "matches no known format", "'question'", "etokit-trajectory", "etokit-pair", "eto-sft", "eto-pairs"],
    ),
    (
        "kind-mismatch",
        "a.jsonl",
        (json.dumps(PAIR) + "\n").encode(),
        {"kind": "trajectory"},
        ["holds pairs (format etokit-pair), expected trajectories"],
    ),
    (
        "mixed-formats",
        "a.jsonl",
        (json.dumps(TRAJ) + "\n" + json.dumps(ETO_SFT) + "\n").encode(),
        {},
        ["row 1", "format eto-sft", "a file holds one format"],
    ),
    ("official-needs-env", "a.jsonl", (json.dumps(ETO_SFT) + "\n").encode(), {}, ["--env is needed"]),
    (
        "env-mismatch",
        "a.jsonl",
        (json.dumps(TRAJ) + "\n").encode(),
        {"env": "webshop"},
        ["row 0", "field 'env'", "'textworld-express'", "expected 'webshop'"],
    ),
    ("unknown-kind", "a.jsonl", (json.dumps(TRAJ) + "\n").encode(), {"kind": "trajectories"}, ["unknown kind"]),
]


@pytest.mark.parametrize("name,data,kwargs,words", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_malformed_file_is_a_data_error(tmp_path, name, data, kwargs, words):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        load_records(path, **kwargs)
    message = str(err.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


def test_alfworld_env_is_inferred_only_when_every_row_has_a_game_file(tmp_path):
    alf = dict(ETO_SFT, id="a0", game_file="json_2.1.1/train/x/trial_1/game.tw-pddl")
    assert load_records(_write(tmp_path / "a.jsonl", [alf, dict(alf, id="a1")])).records[1].env == "alfworld"
    with pytest.raises(DataError, match="--env is needed"):
        load_records(_write(tmp_path / "b.jsonl", [alf, ETO_SFT]))


def test_validators_can_be_called_directly_with_a_location():
    t = factories.trajectory("x", 1.0)
    validate_trajectory(t, where="explore output")
    t.messages[4]["role"] = "tool"
    with pytest.raises(DataError, match=r"^explore output, field 'messages\[4\].role': unknown role 'tool'") as err:
        validate_trajectory(t, where="explore output")
    assert err.value.field == "messages[4].role"
    p = factories.pair("y")
    validate_pair(p, where="built pair")
    p.iteration = -2
    with pytest.raises(DataError, match=r"^built pair, field 'iteration'"):
        validate_pair(p, where="built pair")
