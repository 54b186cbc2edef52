"""`etokit report`: the run report from a fake run folder (no training), its Hub twin, the figures
and model-index in checkpoints, and the page itself driven in headless Chromium (skipped, with the
reason, where no chromium is installed: `make install` installs it where apt is available)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.browser import Chromium, find_chromium
from tests.run_fixtures import ENV, fake_run

from etokit.report import REPORT_FILE, SUMMARY_FILE, build_report, publish_report
from etokit.report.html import pair_payload
from etokit.report.source import load_hub, load_local

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (apt-get install chromium; `make install` does it where apt is available)",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(run_dir):
    return build_report(run_dir, run_dir.parent / "report.html")


def test_summary_from_the_run_folder(run_dir):
    data = load_local(run_dir)
    assert [s["model"] for s in data.summary["stages"]] == ["bc", "iter-1", "iter-2"]
    seen = data.summary["stages"][1]["test-seen"]
    assert len(seen["per_task"]) == 12
    # per-task rewards are the evaluation episodes', and their mean is the recorded average
    assert 100 * sum(r for r, _ in seen["per_task"].values()) / 12 == pytest.approx(seen["avg_reward"])
    assert len(data.pairs) == 18 and {p.iteration for p in data.pairs} == {1, 2}
    assert set(data.logs) == {"bc", "iter-1", "iter-2"} and "rewards/margins" in data.logs["iter-1"][0]
    assert [s["model"] for s in load_local(run_dir, upto="iter-1").summary["stages"]] == ["bc", "iter-1"]


def test_report_is_self_contained(report):
    html = report.read_text()
    # no fetch at view time: no external script, style, image or font
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    assert html.count("<svg") >= 4  # results, pairs, training curves, per-task change
    for title in ("Reward and success per stage", "Pairs per iteration", "Training curves", "Per-task change"):
        assert title in html


def test_pair_payload_stores_each_message_once(run_dir):
    data = load_local(run_dir)
    index, messages = pair_payload(data)
    assert len(index["rows"]) == 18
    # every prompt opens with the same instruction and "OK" (the task differs): stored once each
    assert len({tuple(r[6][:2]) for r in index["rows"]}) == 1
    assert len(messages) == len({tuple(m) for m in messages})
    first = index["rows"][0]
    pair = next(p for p in data.pairs if p.task_id == first[3])
    assert [messages[i][1] for i in first[7]] == [m["content"] for m in pair.chosen]


@needs_chromium
def test_report_in_chromium(report, tmp_path):
    with Chromium(CHROMIUM) as browser:
        browser.open(report.as_uri())
        count = lambda: int(browser.eval("document.getElementById('pair-count').dataset.shown"))  # noqa: E731
        rows = lambda: browser.eval(
            "[...document.querySelectorAll('#pair-list tr')].map(tr => tr.cells[1].textContent)"
        )  # noqa: E731

        def choose(select_id: str, value: str) -> None:
            browser.eval(
                f"(() => {{ const s = document.getElementById('{select_id}'); s.value = '{value}'; "
                "s.dispatchEvent(new Event('change')); })()"
            )

        assert count() == 18 and len(rows()) == 18
        choose("f-outcome", "win")  # j % 3 == 0 of 9 pairs, in 2 iterations
        assert count() == 6 and all(int(t.rsplit("-", 1)[1]) % 3 == 0 for t in rows())
        choose("f-outcome", "")
        choose("f-iter", "2")
        choose("f-mode", "step")  # j % 4 == 3: task-2-3, task-2-7
        assert rows() == ["task-2-3", "task-2-7"]
        choose("f-iter", "")
        choose("f-mode", "")
        browser.eval(
            "(() => { const i = document.getElementById('f-task'); i.value = 'task-1-4'; "
            "i.dispatchEvent(new Event('input')); })()"
        )
        browser.eval("new Promise(r => setTimeout(r, 400))")  # the search box is debounced
        assert rows() == ["task-1-4"]
        browser.eval("document.querySelector('#pair-list tr').click()")
        pair = next(p for p in load_local(report.parent / "run").pairs if p.task_id == "task-1-4")
        first = next(i for i, (c, r) in enumerate(zip(pair.chosen, pair.rejected)) if c != r) + 1
        assert first > 1  # the factory's two sides share their first turns
        detail = browser.eval("document.getElementById('pair-detail').innerText")
        assert "task task-1-4" in detail and f"they part at turn {first}" in detail
        # the first differing turn is the one highlighted, and only it
        assert browser.eval("document.querySelectorAll('.turns .idx.diverge').length") == 1
        assert browser.eval("document.querySelector('.turns .idx.diverge').textContent") == str(first)
        # markup inside a message is text (the fixture puts '</script><b>x</b>' in task-1-1's last turn)
        browser.eval(
            "(() => { const i = document.getElementById('f-task'); i.value = 'task-1-1'; "
            "i.dispatchEvent(new Event('input')); })()"
        )
        browser.eval("new Promise(r => setTimeout(r, 400))")
        browser.eval(
            "[...document.querySelectorAll('#pair-list tr')].find(tr => tr.cells[1].textContent === 'task-1-1').click()"
        )
        assert "</script><b>x</b>" in browser.eval("document.getElementById('pair-detail').innerText")
        assert browser.eval("document.querySelectorAll('#pair-detail b').length") == 0
        assert browser.errors() == []
        assert browser.requests() == [report.as_uri()]  # nothing fetched besides the page itself
        browser.eval("document.getElementById('pairs').scrollIntoView()")
        shot = browser.screenshot()
    assert shot.startswith(b"\x89PNG")
    (tmp_path / "report.png").write_bytes(shot)


def test_ten_thousand_pairs(tmp_path):
    run_dir = fake_run(tmp_path / "run", iterations=2, tasks=20, pairs_per_iteration=5000)
    out = build_report(run_dir, tmp_path / "big.html")
    size = out.stat().st_size
    # the shared instruction and "OK" stored once: under 1.5 KB a pair (about 1.3 KB of them is its own
    # messages' text)
    assert size < 10_000 * 1500, f"{size / 1e6:.1f} MB"
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: the page itself is not opened")
    with Chromium(CHROMIUM) as browser:
        browser.open(out.as_uri())
        assert browser.eval("document.getElementById('pair-count').dataset.shown") == "10000"
        # one page of the list in the DOM, not 10,000 rows
        assert browser.eval("document.querySelectorAll('#pair-list tr').length") == 50
        browser.eval("document.getElementById('next').click()")
        assert browser.eval("document.querySelector('#pair-list tr').cells[1].textContent") == "task-1-50"
        assert browser.eval("document.getElementById('page').textContent") == "page 2 of 200"
        assert browser.errors() == []


def test_publish_report_into_a_checkpoint(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    from etokit.hub.checkpoint import render_model_card

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    card = publish_report(run_dir, ckpt, upto="iter-1")
    assert (run_dir / REPORT_FILE).is_file()
    pngs = sorted(p.name for p in (ckpt / "report").iterdir())
    assert pngs == ["pairs.png", "per_task.png", "results.png", "training.png"]
    summary = json.loads((ckpt / SUMMARY_FILE).read_text())
    assert [s["model"] for s in summary["stages"]] == ["bc", "iter-1"]
    # re-publishing writes the same bytes: a re-pushed checkpoint makes no new commit
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    publish_report(run_dir, ckpt, upto="iter-1")
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before

    text = render_model_card("me/fake-eto", "iter-1", {"stage": "ETO", "iteration": 1, **card})
    for plot in card["plots"]:
        assert f"]({plot['path']})" in text and (ckpt / plot["path"]).is_file()
    results = ModelCard(text).data.eval_results  # what the Hub reads from model-index
    stage = summary["stages"][1]
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert got == {
        (split, metric): round(stage[split][key], 4)
        for split in ("test-seen", "test-unseen")
        for metric, key in (("reward", "avg_reward"), ("accuracy", "success_rate"))
    }
    assert yaml.safe_load(text.split("---")[1])["model-index"][0]["name"] == "me/fake-eto@iter-1"


def test_report_of_a_hub_repo(run_dir, hub, repo_name, tmp_path):
    """What `etokit run` pushes (checkpoint branches with eto_results.json and train_log.jsonl, the
    pairs dataset) is enough to rebuild the report of the run folder."""
    import shutil

    from etokit.data import load_records
    from etokit.hub.checkpoint import push_checkpoint
    from etokit.hub.publish import push_dataset

    local = load_local(run_dir)
    config = yaml.safe_load((run_dir / "etokit_config.yaml").read_text())
    config["push_to"] = repo_name
    (run_dir / "etokit_config.yaml").write_text(yaml.safe_dump(config))
    try:
        for stage in ("bc", "iter-1", "iter-2"):
            folder = tmp_path / stage
            shutil.copytree(run_dir / "models" / stage, folder)
            card = publish_report(run_dir, folder, upto=stage)
            push_checkpoint(folder, repo_name, stage, card={"stage": stage, **card})
        for k in (1, 2):
            push_dataset(
                load_records(run_dir / "data" / f"pairs_iter{k}.jsonl", "pair"),
                f"{repo_name}-pairs",
                card="pairs",
                config_name=ENV,
                split=f"iter_{k}",
            )
        remote = load_hub(repo_name)
    finally:
        config["push_to"] = local.summary["repo"]
        (run_dir / "etokit_config.yaml").write_text(yaml.safe_dump(config))
    expected = {
        **local.summary,
        "repo": repo_name,
        "datasets": {k: f"{repo_name}-{k}" for k in ("expert", "explore", "pairs")},
    }
    assert remote.summary == json.loads(json.dumps(expected))  # JSON turns per-task [r, s] tuples into lists
    assert sorted((p.iteration, p.task_id, p.outcome, p.mode) for p in remote.pairs) == sorted(
        (p.iteration, p.task_id, p.outcome, p.mode) for p in local.pairs
    )
    assert remote.logs == local.logs
    out = build_report(repo_name, tmp_path / "hub.html")
    assert "18 of 18" not in out.read_text()  # counts are filled in by the page's script
    assert out.read_text().count('class="pair-item') == 0 and '"task-2-8"' in out.read_text()


def test_cli(run_dir, tmp_path):
    from etokit.cli import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    again = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")])
    assert missing.exit_code == 2 and "not a Hub repo id" in missing.output
    no_run = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "y.html")])
    assert no_run.exit_code == 2 and "no manifest.json" in no_run.output


def test_etokit_run_writes_the_report_and_pushes_figures(reference_run):
    """The real loop (the reference_run fixture, shared with tests/test_run.py): report.html in the run folder,
    and each checkpoint carries the figures, the results and a model-index the Hub reads."""
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    cfg, rows = reference_run
    run_dir = Path(cfg.run_dir)
    assert "iter-1" in (run_dir / REPORT_FILE).read_text()
    files = set(HfApi().list_repo_files(cfg.push_to, revision="iter-1"))
    assert {"report/results.png", "report/pairs.png", "report/training.png", SUMMARY_FILE} <= files
    card = ModelCard(Path(hf_hub_download(cfg.push_to, "README.md", revision="iter-1")).read_text())
    assert "![Reward and success per stage](report/results.png)" in card.text
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got[("test-unseen", "reward")] == round(rows[-1]["test-unseen"]["avg_reward"], 4)
    remote = load_hub(cfg.push_to)
    assert [s["model"] for s in remote.summary["stages"]] == ["bc", "iter-1"]
    assert len(remote.pairs) == rows[-1]["pairs"]["pairs"] and set(remote.logs) == {"bc", "iter-1"}
