"""`etokit explore` and `etokit eval` on 2 real processes (torchrun, gloo on CPU) equal 1 process.

Each rank plays its shard of the tasks (accelerate's split_between_processes); explore writes one
part file per rank and the main rank merges them in task order, eval gathers the episodes. Greedy
decoding, so the merged output must be the single-process output row for row. (On a CPU-only host
`accelerate launch --cpu --num_processes 2` runs ONE process: see tests/test_dpo_ddp.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from etokit.data import read_jsonl
from tests.factories import build_policy

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
FAST = ["--env", "webshop", "--no-icl", "--max-steps", "2", "--max-new-tokens", "8", "--batch-size", "2"]


def _launch(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [str(TORCHRUN), "--standalone", "--nnodes", "1", "--nproc_per_node", str(n), "-m", "etokit", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_explore_and_eval_on_two_processes_equal_one(tmp_path):
    model = tmp_path / "tiny"
    build_policy(model)
    # 5 tasks: the 2-way split is uneven (3 + 2), so accelerate's padding would duplicate one.
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"explore{n}.jsonl"
        _launch(n, "explore", "--model", str(model), *FAST, "--task-ids", "200,201,202,203,204", "--out", str(out))
        outs[n] = read_jsonl(out, "trajectory")
        assert not list(tmp_path.glob(f".explore{n}.jsonl.rank*"))  # part files merged and removed
    assert [t.task_id for t in outs[2]] == ["200", "201", "202", "203", "204"]
    assert [t.to_row() for t in outs[2]] == [t.to_row() for t in outs[1]]
    assert len({m["content"] for t in outs[1] for m in t.messages[3::2]}) > 3  # replies vary: the check has teeth

    reports = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}.json"
        _launch(
            n,
            "eval",
            "--model",
            str(model),
            *FAST,
            "--split",
            "test-seen",
            "--task-ids",
            "3,4,5,6,7",
            "--out",
            str(out),
        )
        reports[n] = json.loads(out.read_text())
    assert list(reports[2]["rewards"]) == ["3", "4", "5", "6", "7"]
    assert reports[2] == reports[1]


def test_sampled_exploration_is_the_same_on_two_processes_and_after_a_resume(tmp_path):
    """Each reply samples from a generator seeded by its own episode (run seed, task, sample, step):
    which process plays an episode, and whether the run stopped and resumed in between, changes
    nothing. The resumed run first plays 2 of the 5 tasks (what a run killed after them leaves in
    its --out), then all 5: the 3 missing ones are played, in other batches than uninterrupted."""
    model = tmp_path / "tiny"
    build_policy(model)
    sampled = [*FAST, "--temperature", "1.0", "--seed", "7"]
    tasks = "200,201,202,203,204"
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"sampled{n}.jsonl"
        _launch(n, "explore", "--model", str(model), *sampled, "--task-ids", tasks, "--out", str(out))
        rows[n] = {t.task_id: t.to_row() for t in read_jsonl(out, "trajectory")}
    resumed = tmp_path / "resumed.jsonl"
    _launch(1, "explore", "--model", str(model), *sampled, "--task-ids", "203,201", "--out", str(resumed))
    _launch(1, "explore", "--model", str(model), *sampled, "--task-ids", tasks, "--out", str(resumed))
    rows["resumed"] = {t.task_id: t.to_row() for t in read_jsonl(resumed, "trajectory")}
    assert sorted(rows[1]) == tasks.split(",")
    assert rows[2] == rows[1] and rows["resumed"] == rows[1]
    greedy = tmp_path / "greedy.jsonl"
    _launch(1, "explore", "--model", str(model), *FAST, "--task-ids", tasks, "--out", str(greedy))
    assert [t.to_row()["messages"] for t in read_jsonl(greedy, "trajectory")] != [
        rows[1][t]["messages"] for t in tasks.split(",")
    ]  # sampling took effect: the check has teeth
