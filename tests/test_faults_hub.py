"""Pushes through a fault-injecting proxy (etokit.hub.fault_proxy) in front of the embedded Hub:
5xx, 429 + Retry-After, connection resets before and after the server applied the request, stalls
past the client timeout. Every push completes or fails with one clear line and can be re-run;
the Hub never holds a duplicate commit, a partial commit or a tag on an incomplete checkpoint.

Pushes go through the proxy; every check reads the server directly (no faults), or its storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tests.factories import pair, trajectory, write_jsonl
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import from_dataset, load_records
from etokit.errors import EtokitError, ServiceUnavailable
from etokit.hub import retry
from etokit.hub.checkpoint import push_checkpoint
from etokit.hub.fault_proxy import FaultProxy
from etokit.hub.publish import push_dataset

pytestmark = pytest.mark.faults

ENV = "textworld-express"
# Short client timeout and backoff so that a test with dozens of faults runs in seconds. Stalled
# requests hang far longer than any test: a request that had no timeout would show up as a hang.
FAST = retry.RetryPolicy(total_s=90, request_s=30, timeout_s=1.0, base_s=0.05, cap_s=0.5)
STALL_S = 600
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def fast_retries():
    retry.configure(FAST)
    yield
    retry.configure(None)


@contextlib.contextmanager
def through(endpoint: str):
    """Point huggingface_hub and datasets at ``endpoint`` in this process (both read HF_ENDPOINT
    at import; datasets' own tests patch the same constants)."""
    import datasets
    from huggingface_hub import constants

    saved = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        datasets.config.HF_ENDPOINT,
        datasets.config.HUB_DATASETS_URL,
    )
    constants.ENDPOINT = datasets.config.HF_ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    datasets.config.HUB_DATASETS_URL = endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    try:
        yield
    finally:
        (
            constants.ENDPOINT,
            constants.HUGGINGFACE_CO_URL_TEMPLATE,
            datasets.config.HF_ENDPOINT,
            datasets.config.HUB_DATASETS_URL,
        ) = saved


@contextlib.contextmanager
def faulty(hub, **kwargs):
    kwargs = {"rate": 0.3, "stall_s": STALL_S} | kwargs
    with FaultProxy(hub.endpoint, **kwargs) as proxy, through(proxy.endpoint):
        yield proxy


@contextlib.contextmanager
def policy(**changes):
    retry.configure(dataclasses.replace(FAST, **changes))
    try:
        yield
    finally:
        retry.configure(FAST)


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def titles(repo, repo_type="dataset", revision=None) -> list[str]:
    from huggingface_hub import HfApi

    return [c.title for c in HfApi().list_repo_commits(repo, repo_type=repo_type, revision=revision)]


def data_push_titles(command: str, split: str, rows: int) -> list[str]:
    """The commits one logical push adds: the data (datasets' commit), then the card."""
    return [f"Update dataset card ({ENV}/{split})", f"etokit {command}: {ENV}/{split} ({rows} rows)"]


def load(repo, split, kind):
    from datasets import load_dataset

    return from_dataset(load_dataset(repo, ENV, split=split, download_mode="force_redownload"), kind)


def tree(hub, repo, rev, repo_type="model") -> dict[str, str]:
    """path -> sha256 of the content, read from the server's storage (no HTTP, no faults)."""
    st = hub.storage
    return {p: e["sha256"] for p, e in st.commit(repo_type, repo, st.resolve(repo_type, repo, rev))["tree"].items()}


def tag_target(hub, repo) -> str | None:
    tag = hub.storage.refs("model", repo)["tags"].get("iter-1")
    return tag["target"] if tag else None


def folder_tree(folder, readme: str) -> dict[str, str]:
    files = {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts
    }
    return files | {"README.md": hashlib.sha256(readme.encode()).hexdigest()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two versions of one tiny checkpoint (v2: different weights and one file fewer)."""
    from safetensors.torch import load_file, save_file

    from etokit.models.init_model import build_tiny_model

    v1 = tmp_path_factory.mktemp("ckpt") / "v1"
    texts = [m["content"] for i in range(20) for m in trajectory(f"t{i}", 1.0, seed=i).messages]
    build_tiny_model(texts, v1, vocab_size=350)
    v2 = v1.parent / "v2"
    shutil.copytree(v1, v2)
    weights = load_file(v2 / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, v2 / "model.safetensors", metadata={"format": "pt"})
    (v2 / "generation_config.json").unlink()
    return v1, v2


CARD = {"stage": "dpo", "iteration": 1, "base_model": "etokit-tests/bc"}


# -- 30% faults: every push completes, one commit per logical push ----------------------------


CASES = {
    "push-expert": (
        lambda: [trajectory(f"e{i}", r, 2 + i % 3) for i, r in enumerate([1.0, 0.5, 0.0, 1.0])],
        "trajectory",
        "train",
        [],
    ),
    "push-explore": (
        lambda: [trajectory(f"x{i}", r, source="explore") for i, r in enumerate([0.0, 1.0, 0.25])],
        "trajectory",
        "iter_1",
        ["--split", "iter_1"],
    ),
    "push-pairs": (
        lambda: [pair(f"p{i}", iteration=1, outcome="win" if i == 2 else "lose") for i in range(4)],
        "pair",
        "iter_1",
        [],
    ),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_cli_push_completes_under_30_percent_faults(hub, repo_name, tmp_path, command):
    make, kind, split, extra = CASES[command]
    records = make()
    write_jsonl(tmp_path / "rows.jsonl", records)

    with faulty(hub, seed=sorted(CASES).index(command)) as proxy:
        result = cli(command, tmp_path / "rows.jsonl", "--repo-id", repo_name, *extra)
    assert result.exit_code == 0, result.output
    assert proxy.injected >= 3, proxy.counts

    assert titles(repo_name) == data_push_titles(command, split, len(records)) + ["initial commit"]
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_name, repo_type="dataset")
    assert files == [".gitattributes", "README.md", "etokit_stats.json", f"{ENV}/{split}-00000-of-00001.parquet"]
    assert load(repo_name, split, kind) == records


def test_lost_commit_responses_are_found_not_committed_twice(hub, repo_name, tmp_path, checkpoints):
    """The nasty case: the server applies a commit (or a tag) and the response never arrives."""
    writes = lambda method, path: method in ("POST", "DELETE") and ("/commit/" in path or "/tag/" in path)  # noqa: E731
    records = [pair(f"p{i}", iteration=2) for i in range(3)]
    write_jsonl(tmp_path / "p.jsonl", records)
    with faulty(hub, rate=1.0, faults=("reset_after", "stall_after"), match=writes, max_faults=2, seed=1) as proxy:
        result = cli("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name)
    assert result.exit_code == 0, result.output
    assert proxy.injected == 2  # the data commit and the card commit both landed unanswered
    assert titles(repo_name) == data_push_titles("push-pairs", "iter_2", 3) + ["initial commit"]
    assert load(repo_name, "iter_2", "pair") == records

    model = f"{repo_name}-model"
    v1, _ = checkpoints
    with faulty(hub, rate=1.0, faults=("reset_after", "stall_after"), match=writes, max_faults=2, seed=2) as proxy:
        sha = push_checkpoint(v1, model, "iter-1", card=CARD)
    assert proxy.injected == 2  # the commit, then the tag
    assert titles(model, "model", "iter-1") == ["Upload iter-1", "initial commit"]
    assert tag_target(hub, model) == sha == hub.storage.refs("model", model)["branches"]["iter-1"]


def test_checkpoint_push_under_30_percent_faults_loads_back(hub, repo_name, checkpoints):
    from transformers import AutoModelForCausalLM

    v1, _ = checkpoints
    with faulty(hub, seed=11) as proxy:
        sha = push_checkpoint(v1, repo_name, "iter-1", card=CARD)
    assert proxy.injected >= 2, proxy.counts
    assert titles(repo_name, "model", "iter-1") == ["Upload iter-1", "initial commit"]
    assert tag_target(hub, repo_name) == sha
    from etokit.hub.checkpoint import render_model_card

    expected = folder_tree(v1, render_model_card(repo_name, "iter-1", CARD))
    gitattributes = tree(hub, repo_name, "main")[".gitattributes"]
    assert tree(hub, repo_name, "iter-1") == expected | {".gitattributes": gitattributes}
    local = AutoModelForCausalLM.from_pretrained(v1)
    remote = AutoModelForCausalLM.from_pretrained(repo_name, revision="iter-1")
    for name, p in local.state_dict().items():
        assert torch.equal(p, remote.state_dict()[name]), name


# -- a total outage: a clear error in bounded time, then a clean re-run -------------------------


@pytest.mark.timeout(300)  # bounded: a push that hangs fails here instead of stalling CI
def test_total_outage_fails_with_one_line_and_rerun_lands_once(hub, repo_name, tmp_path, checkpoints):
    records = [pair(f"p{i}", iteration=1) for i in range(3)]
    write_jsonl(tmp_path / "p.jsonl", records)
    v1, _ = checkpoints
    model = f"{repo_name}-model"
    with faulty(hub, rate=1.0, seed=3) as proxy:
        with policy(total_s=3):
            result = cli("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name)
            with pytest.raises(ServiceUnavailable) as exc:
                push_checkpoint(v1, model, "iter-1", card=CARD)
        assert proxy.counts["forwarded"] == 0  # (reset_after / stall_after reached the server, unanswered)
        proxy.rate = 0.0  # the Hub is back
        rerun = cli("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name)
        assert rerun.exit_code == 0, rerun.output
        sha = push_checkpoint(v1, model, "iter-1", card=CARD)

    assert result.exit_code == 3  # an outage, not bad input: a scheduler may retry it
    message = " ".join(result.output.split()).split("Error: ", 1)[1]
    assert message.startswith(f"push of {ENV}/iter_1 to dataset '{repo_name}' (main): the Hub still failed"), message
    assert "re-run the same command" in message, message
    assert str(exc.value).startswith(f"push of {v1} to '{model}' revision 'iter-1': the Hub still failed after")
    assert "re-run the same command" in str(exc.value)
    assert titles(repo_name) == data_push_titles("push-pairs", "iter_1", 3) + ["initial commit"]
    assert load(repo_name, "iter_1", "pair") == records
    assert titles(model, "model", "iter-1") == ["Upload iter-1", "initial commit"]
    assert tag_target(hub, model) == sha


def test_429_retry_after_is_honoured(hub, repo_name, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [pair("p", iteration=1)])
    seen: set[tuple[str, str]] = set()
    # One request of each layer that retries: repo creation and the commit (etokit's operation
    # layer), the repo info read and preupload (its request layer), the LFS upload (huggingface_hub's
    # own backoff).
    routes = ("/api/repos/create", f"/api/datasets/{repo_name}", "/preupload/", "/lfs-upload/", "/commit/")

    def first_time(method, path):
        hit = (path.endswith(routes[1]) and method == "GET") or any(r in path for r in routes[2:] + routes[:1])
        new = hit and (method, path) not in seen
        seen.add((method, path))
        return new

    with faulty(hub, rate=1.0, faults=("429",), retry_after_s=1, match=first_time, seed=4) as proxy:
        result = cli("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name)
    assert result.exit_code == 0, result.output
    limited = [(t, m, p) for t, m, p, outcome in proxy.log if outcome == "429"]
    assert len(limited) == len(routes), limited
    for t, method, path in limited:
        # The retry of the same request came no sooner than the server asked (a lower bound: sleeps
        # only ever last longer).
        retried = [t2 for t2, m2, p2, _ in proxy.log if (m2, p2) == (method, path) and t2 > t]
        assert retried and retried[0] - t >= 1.0, (method, path)
    assert titles(repo_name) == data_push_titles("push-pairs", "iter_1", 1) + ["initial commit"]


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_iteration_pushes_to_one_dataset_and_one_model_all_land(hub, repo_name, tmp_path, checkpoints):
    from huggingface_hub import HfApi, hf_hub_download

    iterations = (1, 2, 3)
    files = {}
    for k in iterations:
        files[k] = tmp_path / f"pairs{k}.jsonl"
        write_jsonl(files[k], [pair(f"t{k}-{i}", iteration=k) for i in range(k + 1)])
    model = f"{repo_name}-model"
    v1, _ = checkpoints
    cards = {k: {**CARD, "iteration": k} for k in iterations}

    with faulty(hub, rate=0.1, seed=6), ThreadPoolExecutor(6) as pool:
        data = [pool.submit(push_dataset, load_records(files[k], "pair"), repo_name, card="pairs") for k in iterations]
        models = [pool.submit(push_checkpoint, v1, model, f"iter-{k}", card=cards[k]) for k in iterations]
        results = [f.result() for f in data]
        shas = {k: f.result() for k, f in zip(iterations, models)}

    assert sorted(r.split for r in results) == ["iter_1", "iter_2", "iter_3"]
    got = titles(repo_name)
    for k in iterations:
        for title in data_push_titles("push-pairs", f"iter_{k}", k + 1):
            assert got.count(title) == 1, (title, got)
        assert load(repo_name, f"iter_{k}", "pair") == load_records(files[k], "pair").records
    assert len(got) == 2 * len(iterations) + 1
    card = open(hf_hub_download(repo_name, "README.md", repo_type="dataset")).read()
    for k in iterations:
        assert f"| {ENV} | iter_{k} | {k + 1} |" in card

    refs = HfApi().list_repo_refs(model)
    assert {t.name: t.target_commit for t in refs.tags} == {f"iter-{k}": shas[k] for k in iterations}
    branches = {b.name: b.target_commit for b in refs.branches if b.name != "main"}
    assert branches == {f"iter-{k}": shas[k] for k in iterations}


# -- checkpoints: commit first, tag last --------------------------------------------------------


def test_tag_only_ever_points_at_a_complete_checkpoint(hub, repo_name, checkpoints):
    """Commit first, tag last. The tag iter-1 moves from v1 to v2 and back through faults; after
    every attempt, failed or not, it is absent (mid-move) or on a commit holding all of v1 or all of
    v2, never anything in between."""
    from etokit.hub.checkpoint import render_model_card

    v1, v2 = checkpoints
    readme = render_model_card(repo_name, "iter-1", CARD)
    first = push_checkpoint(v1, repo_name, "iter-1", card=CARD)
    gitattributes = tree(hub, repo_name, "main")[".gitattributes"]
    complete = [folder_tree(v, readme) | {".gitattributes": gitattributes} for v in (v1, v2)]
    assert tree(hub, repo_name, first) == complete[0]

    def tag_is_sound(when):
        target = tag_target(hub, repo_name)
        assert target is None or tree(hub, repo_name, target) in complete, when

    # Creating a tag always fails (deleting one works): the push fails with v2 committed to the
    # branch and the tag removed from v1, not yet on v2; the re-run commits nothing and adds the tag.
    create_tag = lambda method, path: method == "POST" and "/tag/" in path  # noqa: E731
    with faulty(hub, rate=1.0, faults=("503", "reset"), match=create_tag, seed=9), policy(total_s=2):
        with pytest.raises(EtokitError, match="re-run"):
            push_checkpoint(v2, repo_name, "iter-1", card=CARD)
    assert tree(hub, repo_name, "iter-1") == complete[1]  # the branch: the new checkpoint, whole
    assert tag_target(hub, repo_name) is None
    head = hub.storage.refs("model", repo_name)["branches"]["iter-1"]
    assert push_checkpoint(v2, repo_name, "iter-1", card=CARD) == head == tag_target(hub, repo_name)

    # Random faults on every step of the push back to v1 (uploads, commit, tag) and a budget so small
    # that most attempts fail part-way; the Hub recovers, so the loop ends. (The LFS PUT is left out:
    # huggingface_hub's own backoff for it, 1 to 8 s per retry, would dominate this test's time; the
    # 30% tests above fault it.)
    not_put = lambda method, path: "/lfs-upload/" not in path  # noqa: E731
    failures, outcome = 0, None
    with faulty(hub, seed=8, match=not_put) as proxy, policy(total_s=1.0):
        for attempt in range(12):
            proxy.rate = max(0.0, 0.55 - 0.05 * attempt)
            try:
                outcome = push_checkpoint(v1, repo_name, "iter-1", card=CARD)
            except EtokitError:
                failures += 1
            tag_is_sound(f"attempt {attempt}")
            if outcome:
                break
    assert failures >= 1 and outcome is not None
    assert tag_target(hub, repo_name) == outcome == hub.storage.refs("model", repo_name)["branches"]["iter-1"]
    assert tree(hub, repo_name, outcome) == complete[0]
    assert titles(repo_name, "model", "iter-1") == ["Upload iter-1"] * 3 + ["initial commit"]
