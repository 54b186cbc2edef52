"""Crash and resume with real SIGKILLs.

One run directory of `etokit run` (tests/run_fixtures.py's tiny FLAGS) is killed at every point of CHAIN
in turn, by the fault point itself (etokit/faults.py: a real SIGKILL of the process, of its whole
process group, or of its parent, never an exception), and resumed with `--resume` and the next
point armed; then resumed to the end. After every kill: the kill came from the point, no process
of the run is left, the manifest and every visible file parse (nothing half-written is visible),
the manifest stops where the point is. At the end: trajectories (expert, exploration, evaluation),
pairs, BC/DPO/base weights, evaluation results and the Hub's datasets, commits and tags equal the
uninterrupted reference run's (the reference_run fixture, shared with test_run.py), with no
trajectory duplicated or lost. Separately, one rank of a 2-process DPO (torchrun, gloo) is killed
mid-step and --resume ends with the weights of an uninterrupted 2-process run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from tests.factories import pair, write_jsonl
from tests.run_fixtures import ENV, FLAGS, STAGES, commits, make_config, new_repo

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# (stage the point fires in, ETOKIT_FAULTPOINT). In run order: each resume gets the next point armed,
# so the hit counts below are counted from where the previous kill left the run.
CHAIN = [
    ("expert", "expert.appended:2"),  # 2 of 3 expert trajectories appended
    ("expert", "io.append.torn:1=group"),  # half a line appended, the whole run's process group killed
    ("expert", "run.stage.before-record:1"),  # all played, not recorded
    ("push-expert", "hub.uploaded:1"),  # parquet uploaded to the Hub, no commit yet
    ("push-expert", "hub.dataset.before-card:1"),  # data committed, dataset card not
    ("init-model", "init-model.built:1"),  # tokenizer + model written, not recorded
    ("bc", "bc.mid-step:2"),  # BC subprocess killed mid-step 2 (after the step-1 checkpoint)
    ("bc", "train.save-state.before-rename:1=group"),  # final state checkpoint written, not in place
    ("bc", "train.save-model.between-files:1=parent"),  # BC kills `etokit run` and must not outlive it
    ("eval-bc", "play.appended:1"),  # test-seen episode appended
    ("eval-bc", "io.atomic-write.before-rename:1"),  # the episodes file rewritten in task order: temp only
    ("push-bc", "hub.uploaded:1"),  # checkpoint uploaded, no commit yet
    ("push-bc", "hub.checkpoint.before-tag:1"),  # committed, not tagged
    ("explore-1", "explore.mid-batch:3"),  # replies generated, not sent to the env (1 episode appended)
    ("explore-1", "play.before-sort:1"),  # every episode appended, not yet sorted
    ("pairs-1", "pairs.built:1"),
    ("pairs-1", "io.write-jsonl.record:2"),  # pairs file half written (a temp file)
    ("push-explore-1", "hub.uploaded:1"),
    ("push-explore-1", "hub.dataset.before-card:1"),
    ("push-pairs-1", "run.stage.before-record:2"),  # pairs pushed, not recorded
    ("push-pairs-1", "manifest.before-rename:1"),  # manifest temp file written, not renamed
    ("dpo-1", "dpo.ref-logps:1"),  # DPO subprocess killed inside the reference log-prob pass
    ("dpo-1", "ref-cache.before-rename:1"),  # reference log-probs computed, cache file not in place
    ("dpo-1", "dpo.mid-step:2=group"),
    ("eval-iter-1", "play.appended:2"),  # test-seen done, test-unseen appended
    ("push-iter-1", "hub.checkpoint.before-tag:1"),
]


def _run_cmd(run_dir: Path, repo: str, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "etokit",
        "run",
        *FLAGS,
        "--run-dir",
        str(run_dir),
        "--push-to",
        repo,
        *(["--resume"] if resume else []),
    ]


def _launch(cmd: list[str], env: dict[str, str], timeout: float = 400) -> tuple[int, str, int]:
    """Run ``cmd`` as the leader of a new session; (exit code, output, session id)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[2:5]} did not finish in {timeout}s:\n{out[-3000:]}") from None
    return proc.returncode, out, proc.pid


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def assert_nothing_left(sid: int, what: str) -> None:
    """No process of the killed command's session remains (no orphan trainer or JVM, no zombie):
    they die with it (JVM: its stdin closes; trainers: they watch the driver's pid)."""
    deadline = time.monotonic() + 60
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for p in left:
        try:
            described.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    assert not described, f"{what}: processes of the killed run are still there: {described}"


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": []}


def assert_consistent(run_dir: Path, torn_tail_ok: bool = False) -> list[str]:
    """Every visible file parses: no half-written file is ever in place. An append log (a .jsonl
    of the stage in progress) may end in a torn line only after a kill inside an append, which the
    next open repairs. Returns the recorded stage names."""
    from safetensors import safe_open

    from etokit.data import read_jsonl
    from etokit.data.validate import DataError

    manifest = _manifest(run_dir)
    recorded = [s["name"] for s in manifest["stages"]]
    assert recorded == STAGES[: len(recorded)]
    outputs = {s["name"]: s["outputs"] for s in manifest["stages"]}
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or not _visible(path, run_dir):
            continue
        rel = path.relative_to(run_dir).as_posix()
        if path.suffix == ".jsonl" and rel.startswith(("data/", "eval/")):
            kind = "pair" if path.name.startswith("pairs") else "trajectory"
            data = path.read_bytes()
            if torn_tail_ok and data and not data.endswith(b"\n"):
                path = path.with_name(path.name + ".complete-lines.jsonl")
                path.write_bytes(data[: data.rfind(b"\n") + 1])
            try:
                records = read_jsonl(path, kind)
            except DataError as e:
                raise AssertionError(f"{rel} does not parse after the kill: {e}") from None
            finally:
                if path.name.endswith(".complete-lines.jsonl"):
                    path.unlink()
            ids = Counter(r.task_id for r in records)
            assert max(ids.values(), default=1) == 1, f"{rel}: a trajectory is duplicated: {ids}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.name == "COMPLETE":
            assert path.parent.name.startswith("step-")
    for ckpt in run_dir.glob("models/*/checkpoints/*"):
        if _visible(ckpt, run_dir):  # a checkpoint in its final place is a complete one
            assert (ckpt / "COMPLETE").exists(), f"{ckpt} is in place without its COMPLETE marker"
    # What the manifest records is there and is what it says.
    for name, out in outputs.items():
        if "file" in out:
            assert (run_dir / out["file"]).exists()
        if "weights_sha256" in out:
            assert _weights_digest(run_dir / out["model"]) == out["weights_sha256"], name
    return recorded


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> list[dict]:
    """File rows with the model repo (which differs between the two runs) taken out."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r.get("model"):
            r["model"] = r["model"].split("@")[-1]
    return rows


def _commit_counts(cfg) -> dict[str, int]:
    """Commits per dataset repo and model branch, keyed by role (the repo names differ per run)."""
    roles = {repo: kind for kind, repo in cfg.datasets.items()}
    out = {}
    for key, ids in commits(cfg).items():
        if key == "tags":
            out["tags"] = sorted(name for name, _ in ids)
        else:
            out[roles.get(key, key.replace(cfg.push_to, "model"))] = len(ids)
    return out


def test_killed_at_every_stage_then_resumed_equals_uninterrupted_run(hub, reference_run, tmp_path):
    reference, reference_rows = reference_run
    ref_dir = Path(reference.run_dir)
    run_dir, repo = tmp_path / "chain", new_repo("chain")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETOKIT_FAULTPOINT")}
    env["PYTHONPATH"] = str(ROOT)
    timings = []
    for i, (stage, point) in enumerate(CHAIN):
        once = tmp_path / f"fired-{i}"
        start = time.monotonic()
        code, out, sid = _launch(
            _run_cmd(run_dir, repo, resume=i > 0),
            {**env, "ETOKIT_FAULTPOINT": point, "ETOKIT_FAULTPOINT_ONCE": str(once)},
        )
        timings.append((stage, point, round(time.monotonic() - start, 1)))
        where = f"kill {i + 1}/{len(CHAIN)} ({point})"
        assert once.exists(), f"{where}: the fault point was never reached (exit {code}):\n{out[-3000:]}"
        assert once.read_text().split()[0] == point.split(":")[0]
        # SIGKILLed itself (-9), or a training subprocess was and the run stopped on its error.
        assert code == -signal.SIGKILL or (code == 2 and "exit -9" in out), f"{where}: exit {code}\n{out[-3000:]}"
        assert_nothing_left(sid, where)
        assert "orphan" not in once.read_text(), f"{where}: a subprocess outlived the killed run"
        recorded = assert_consistent(run_dir, torn_tail_ok=point.startswith("io.append.torn"))
        assert STAGES[len(recorded)] == stage, f"{where}: expected to die in {stage}, the manifest has {recorded}"
    assert {stage for stage, _ in CHAIN} == set(STAGES)  # a kill in every stage

    start = time.monotonic()
    code, out, sid = _launch(_run_cmd(run_dir, repo, resume=True), env)
    timings.append(("(rest)", "none", round(time.monotonic() - start, 1)))
    print("\n".join(f"{s:<15} {p:<45} {t:6.1f}s" for s, p, t in timings))
    assert code == 0, out[-3000:]
    assert_nothing_left(sid, "the final resume")
    assert assert_consistent(run_dir) == STAGES

    # Same outputs as the uninterrupted run.
    assert json.loads((run_dir / "results.json").read_text())["rows"] == reference_rows
    ours = {s["name"]: s["outputs"] for s in _manifest(run_dir)["stages"]}
    theirs = {s["name"]: s["outputs"] for s in _manifest(ref_dir)["stages"]}
    for name in STAGES:
        if not name.startswith("push-"):  # files, counts, metrics, weight digests (pushes: other repos' shas)
            assert ours[name] == theirs[name], name
    files = [
        "data/expert.jsonl",
        "data/explore_iter1.jsonl",
        "data/pairs_iter1.jsonl",
        *[f"eval/{m}/{s}.jsonl" for m in ("bc", "iter-1") for s in ("test-seen", "test-unseen")],
    ]
    for rel in files:
        assert _rows(run_dir / rel) == _rows(ref_dir / rel), rel
    for model in ("base", "bc", "iter-1"):
        assert _sha256(run_dir / "models" / model / "model.safetensors") == _sha256(
            ref_dir / "models" / model / "model.safetensors"
        ), model
    # No trajectory duplicated or lost: every planned episode once.
    from etokit.data import read_jsonl

    for rel, expected in (("data/expert.jsonl", ours["expert"]["trajectories"]), ("data/explore_iter1.jsonl", 3)):
        ids = [t.task_id for t in read_jsonl(run_dir / rel, "trajectory")]
        assert len(ids) == len(set(ids)) == expected, rel
    # Nothing a crash left behind survives a completed run.
    assert not [p for p in run_dir.rglob(".*") if p.name != ".lock"]

    # The Hub: the same datasets, the same number of commits (no push made twice), tags on the weights.
    import datasets
    from huggingface_hub import HfApi, hf_hub_download

    from etokit.data import to_dataset

    cfg_like = dataclasses.replace(reference, run_dir=str(run_dir), push_to=repo)
    for kind, rel, split in (
        ("expert", "data/expert.jsonl", "train"),
        ("explore", "data/explore_iter1.jsonl", "iter_1"),
        ("pairs", "data/pairs_iter1.jsonl", "iter_1"),
    ):
        remote = datasets.load_dataset(cfg_like.datasets[kind], ENV, split=split).to_list()
        local = to_dataset(read_jsonl(run_dir / rel, "pair" if kind == "pairs" else "trajectory")).to_list()
        assert remote == local, kind
    assert _commit_counts(cfg_like) == _commit_counts(reference)
    refs = HfApi().list_repo_refs(repo)
    heads = {b.name: b.target_commit for b in refs.branches}
    for t in refs.tags:
        assert t.target_commit == heads[t.name]
        hub_weights = Path(hf_hub_download(repo, "model.safetensors", revision=t.name))
        assert _sha256(hub_weights) == _sha256(run_dir / "models" / t.name / "model.safetensors")


# --------------------------------------------------------------------------- one DDP rank killed


def test_killed_rank_of_two_process_dpo_resumes_to_the_same_weights(tmp_path):
    from etokit.models.init_model import build_tiny_model
    from etokit.train.metric_logging import read_log

    pairs = [pair(f"t{i}", outcome="lose" if i % 3 else "win") for i in range(8)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    build_tiny_model([m["content"] for p in pairs for m in p.prompt + p.chosen + p.rejected], tmp_path / "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETOKIT_FAULTPOINT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", ACCELERATE_MIXED_PRECISION="no")
    # 4 optimizer steps (8 pairs, 4 a step, 2 epochs), a state checkpoint after each.
    args = [
        "--model",
        str(tmp_path / "tiny"),
        "--data",
        str(tmp_path / "pairs.jsonl"),
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--num-epochs",
        "2",
        "--report-to",
        "none",
        "--save-steps",
        "1",
        "--ref-cache-dir",
        str(tmp_path / "cache"),
        "--resume",
    ]

    def torchrun(out: Path, **extra_env) -> tuple[int, str, int]:
        cmd = [
            str(TORCHRUN),
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            str(ROOT / "scripts" / "train_dpo.py"),
            *args,
            "--output-dir",
            str(out),
        ]
        return _launch(cmd, {**env, **extra_env}, timeout=300)

    code, out, _ = torchrun(tmp_path / "reference")
    assert code == 0 and "DPO on 2 process(es)" in out, out[-3000:]

    once = tmp_path / "fired"
    code, out, sid = torchrun(
        tmp_path / "killed",
        ETOKIT_FAULTPOINT="dpo.mid-step:3@1",  # rank 1, step 3
        ETOKIT_FAULTPOINT_ONCE=str(once),
    )
    assert once.exists() and code != 0, out[-3000:]  # rank 1 died in step 3; the job failed
    assert_nothing_left(sid, "2-process DPO with a killed rank")  # rank 0 did not hang on, nor the launcher
    from etokit.train.checkpointing import latest_checkpoint

    assert latest_checkpoint(tmp_path / "killed").name == "step-2"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    code, out, _ = torchrun(tmp_path / "killed")
    assert code == 0 and "resumed from" in out and "step 2" in out, out[-3000:]
    assert _sha256(tmp_path / "killed" / "model.safetensors") == _sha256(tmp_path / "reference" / "model.safetensors")
    assert [r["loss"] for r in read_log(tmp_path / "killed")] == [r["loss"] for r in read_log(tmp_path / "reference")]


# ------------------------------------------------------------------------------ the pieces


def test_faultpoint_kills_the_process_at_the_nth_pass(tmp_path):
    code = "from etokit.faults import faultpoint\nfor i in range(3):\n    print(i, flush=True)\n    faultpoint('x.y')\n"
    env = {
        **os.environ,
        "ETOKIT_FAULTPOINT": "x.y:2",
        "ETOKIT_FAULTPOINT_ONCE": str(tmp_path / "once"),
        "PYTHONPATH": str(ROOT),
    }
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL and res.stdout.split() == ["0", "1"]
    assert (tmp_path / "once").read_text().split()[0] == "x.y"
    # The once-file is taken: the same point armed again does not fire a second time.
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split() == ["0", "1", "2"]


def test_faultpoint_spec_rank_and_counting(monkeypatch):
    from etokit import faults

    assert faults.parse("dpo.mid-step:3@1=group") == faults.Spec("dpo.mid-step", 3, 1, "group")
    assert faults.parse("a") == faults.Spec("a", 1, None, "kill") and faults.parse("") is None
    for bad in ("a:0", "a=explode", "a:b", "a b"):
        with pytest.raises(ValueError, match="ETOKIT_FAULTPOINT"):
            faults.parse(bad)
    monkeypatch.delenv("ETOKIT_FAULTPOINT_ONCE", raising=False)
    try:
        faults.arm("p:2")
        assert [faults.armed(n) for n in ("q", "p", "p", "p")] == [False, False, True, False]
        monkeypatch.setenv("RANK", "0")
        faults.arm("p@1")
        assert not faults.armed("p")  # rank 1 only
        monkeypatch.setenv("RANK", "1")
        faults.arm("p@1")
        assert faults.armed("p")
    finally:
        faults.arm(None)


def test_a_run_dir_in_use_is_refused(tmp_path):
    from etokit.errors import EtokitError
    from etokit.run import Run
    from etokit.run.manifest import LOCK, _RunLock

    run = Run(make_config(tmp_path / "r", "ns/x"))
    with _RunLock(tmp_path / "r" / LOCK):  # as another live `etokit run` holds it
        with pytest.raises(EtokitError, match=r"in use by another etokit run \(pid \d+\)"):
            run.run()


def test_metrics_log_drops_a_line_torn_by_a_kill(tmp_path):
    from types import SimpleNamespace

    from etokit.train.metric_logging import LOG_FILE, MetricsLog, read_log

    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    MetricsLog(SimpleNamespace(is_main_process=True), tmp_path, resumed_at=1)  # resumed from step 1
    assert (tmp_path / LOG_FILE).read_text() == '{"step": 1, "loss": 1.0}\n'
