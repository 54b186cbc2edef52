"""How pushes fare through the fault proxy: ``python bench/hub_faults.py [--quick]``.

Starts an embedded Hub with a FaultProxy in front (default: 30% of requests faulted, every kind),
then makes N dataset pushes (``push_dataset``, what ``etokit push-pairs`` runs: one split per
iteration, all to one repo) and M checkpoint pushes (``push_checkpoint``, one revision each, all to
one model repo), one after the other, and checks each against the server's storage: the push
completed, it added exactly its commits (data + card for a dataset, one for a checkpoint), its
files are all there, and the checkpoint's tag is on that commit. Then the same pushes with no
faults, for the time baseline, and a 100% outage to time the failure. Prints a markdown table and
a summary line; the last line is the headline: the median push time under faults as a ratio of the
same pushes without faults, in the same run.

Stalls hang past the client timeout, which is set low here (``--timeout``, default 2 s) so that a
run takes minutes rather than hours; in real use it is ``ETOKIT_HUB_TIMEOUT`` (60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _pairs_file(path: Path, iteration: int, rows: int) -> Path:
    from etokit.data.schema import Pair

    def turns(task: str, n: int) -> list[dict]:
        out = []
        for i in range(n):
            out += [
                {"role": "assistant", "content": f"Thought: step {i} of {task}.\nAction: look"},
                {"role": "user", "content": f"Observation: you see {i} things."},
            ]
        return out[:-1]

    prompt = [{"role": "user", "content": "Solve the task."}, {"role": "assistant", "content": "OK"}]
    with open(path, "w", encoding="utf-8") as f:
        for r in range(rows):
            task = f"task-{iteration}-{r}"
            p = Pair(
                task_id=task,
                env="textworld-express",
                prompt=prompt + [{"role": "user", "content": task}],
                chosen=turns(task, 3),
                rejected=turns(task, 5),
                chosen_reward=1.0,
                rejected_reward=0.0,
                outcome="lose",
                iteration=iteration,
            )
            f.write(json.dumps(p.to_row()) + "\n")
    return path


def _checkpoint(folder: Path, k: int) -> Path:
    """A stand-in checkpoint: what is pushed is files, so a config and 2 MB of "weights" will do."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "iteration": k}))
    (folder / "model.safetensors").write_bytes(os.urandom(2 << 20))
    (folder / "tokenizer.json").write_text(json.dumps({"version": k}))
    return folder


def _history(storage, repo_type: str, repo: str, rev: str) -> list[tuple[str, dict]]:
    if not storage.exists(repo_type, repo):
        return []
    return list(storage.history(repo_type, repo, storage.resolve(repo_type, repo, rev)))


def _run(hub, endpoint: str, args, tag: str, work: Path) -> dict:
    """All pushes against ``endpoint``; returns what was checked and timed."""
    from etokit.data import load_records
    from etokit.hub.checkpoint import push_checkpoint
    from etokit.hub.publish import push_dataset

    _point_at(endpoint)
    st, dataset, model = hub.storage, f"bench/{tag}-pairs", f"bench/{tag}-model"
    times, completed, duplicates, problems = [], 0, 0, []
    for k in range(1, args.pushes + 1):
        records = load_records(_pairs_file(work / f"{tag}-p{k}.jsonl", k, args.rows), "pair")
        before = len(_history(st, "dataset", dataset, "main"))
        t = time.monotonic()
        try:
            push_dataset(records, dataset, card="pairs")
        except Exception as e:  # noqa: BLE001 - a failure is a result here
            problems.append(f"dataset push {k}: {e}")
            continue
        times.append(time.monotonic() - t)
        new = [c["message"] for _, c in _history(st, "dataset", dataset, "main")][: -before or None]
        expected = [
            f"Update dataset card (textworld-express/iter_{k})",
            f"etokit push-pairs: textworld-express/iter_{k} ({args.rows} rows)",
        ]
        expected += [] if before else ["initial commit"]
        tree = st.commit("dataset", dataset, st.resolve("dataset", dataset, "main"))["tree"]
        if new == expected and f"textworld-express/iter_{k}-00000-of-00001.parquet" in tree:
            completed += 1
        else:
            duplicates += max(0, len(new) - len(expected))
            problems.append(f"dataset push {k}: commits {new}")
    for k in range(1, args.checkpoints + 1):
        folder = _checkpoint(work / f"{tag}-ckpt{k}", k)
        t = time.monotonic()
        try:
            sha = push_checkpoint(folder, model, f"iter-{k}", card={"stage": "bench", "iteration": k})
        except Exception as e:  # noqa: BLE001
            problems.append(f"checkpoint push {k}: {e}")
            continue
        times.append(time.monotonic() - t)
        commits = [c["message"] for _, c in _history(st, "model", model, f"iter-{k}")]
        tree = st.commit("model", model, sha)["tree"]
        tag_ok = st.refs("model", model)["tags"].get(f"iter-{k}", {}).get("target") == sha
        files_ok = set(tree) == {".gitattributes", "README.md", "config.json", "model.safetensors", "tokenizer.json"}
        if commits == [f"Upload iter-{k}", "initial commit"] and tag_ok and files_ok:
            completed += 1
        else:
            duplicates += max(0, len(commits) - 2)
            problems.append(f"checkpoint push {k}: commits {commits}, tag ok {tag_ok}, files ok {files_ok}")
    return {"times": times, "completed": completed, "duplicates": duplicates, "problems": problems}


def _point_at(endpoint: str) -> None:
    import datasets
    from huggingface_hub import constants

    constants.ENDPOINT = datasets.config.HF_ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    datasets.config.HUB_DATASETS_URL = endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 dataset + 2 checkpoint pushes")
    parser.add_argument("--pushes", type=int, default=12, help="dataset pushes (one split each)")
    parser.add_argument("--checkpoints", type=int, default=6, help="checkpoint pushes (one revision each)")
    parser.add_argument("--rows", type=int, default=50, help="pairs per dataset push")
    parser.add_argument("--rate", type=float, default=0.3, help="share of requests faulted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout, seconds (stalls cost this)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pushes, args.checkpoints = 4, 2

    home = Path(tempfile.mkdtemp(prefix="etokit-faultbench-"))
    os.environ.update(
        {
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "hf_bench_token",
            "HF_HOME": str(home / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        }
    )
    os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # replaced per run below
    import logging

    logging.basicConfig(level=logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    from etokit.hub import retry
    from etokit.hub.fault_proxy import FAULTS, FaultProxy
    from etokit.hub.server import HubServer

    retry.configure(retry.RetryPolicy(timeout_s=args.timeout))
    work = home / "work"
    work.mkdir()
    with HubServer(home / "hub") as hub:
        with FaultProxy(hub.endpoint, rate=args.rate, seed=args.seed, stall_s=3600) as proxy:
            faulty = _run(hub, proxy.endpoint, args, "faulty", work)
            counts = {k: proxy.counts[k] for k in FAULTS if proxy.counts[k]}
            requests = proxy.counts["requests"]
        clean = _run(hub, hub.endpoint, args, "clean", work)
        with FaultProxy(hub.endpoint, rate=1.0, seed=args.seed, stall_s=3600) as proxy:
            _point_at(proxy.endpoint)
            retry.configure(retry.RetryPolicy(timeout_s=args.timeout, total_s=30))
            t = time.monotonic()
            try:
                from etokit.data import load_records
                from etokit.hub.publish import push_dataset

                push_dataset(
                    load_records(_pairs_file(work / "outage.jsonl", 1, args.rows), "pair"), "bench/outage", card="pairs"
                )
                outage = "completed?!"
            except Exception as e:  # noqa: BLE001
                outage = f"{time.monotonic() - t:.0f} s to `{type(e).__name__}`"
    retry.configure(None)

    total = args.pushes + args.checkpoints
    med = statistics.median(faulty["times"]) if faulty["times"] else float("nan")
    base = statistics.median(clean["times"]) if clean["times"] else float("nan")
    print(
        f"| pushes at {args.rate:.0%} faults (seed {args.seed}) | {args.pushes} dataset (`push-pairs`, "
        f"{args.rows} rows) + {args.checkpoints} checkpoint |"
    )
    print("|---|---|")
    print(f"| completed | {faulty['completed']} / {total} (no faults: {clean['completed']} / {total}) |")
    print(
        f"| faults injected | {sum(counts.values())} of {requests} requests: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + " |"
    )
    print(f"| duplicate commits | {faulty['duplicates']} (no faults: {clean['duplicates']}) |")
    print(
        f"| time per push, median / max | {med:.1f} / {max(faulty['times'], default=float('nan')):.1f} s "
        f"(no faults: {base:.1f} / {max(clean['times'], default=float('nan')):.1f} s) |"
    )
    print(f"| 100% faults, 30 s retry budget | {outage} |")
    for p in faulty["problems"] + clean["problems"]:
        print(f"problem: {p}", file=sys.stderr)
    print(
        f"pushes under {args.rate:.0%} faults: {faulty['completed']}/{total} completed, "
        f"{sum(counts.values())} faults injected, {faulty['duplicates']} duplicate commits, "
        f"median {med:.1f} s vs {base:.1f} s without faults"
    )
    print(f"push time under {args.rate:.0%} faults: {med / base:.2f}x no faults")
    return 0 if faulty["completed"] == total and not faulty["duplicates"] else 1


if __name__ == "__main__":
    sys.exit(main())
