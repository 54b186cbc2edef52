"""2-process DDP (gloo on CPU, launched by torchrun) takes the same optimizer steps as 1 process
with the same global batch.

On a CPU-only host `accelerate launch --cpu --num_processes 2` runs ONE process, and
`--multi_gpu --num_processes 2` starts two processes that each set ACCELERATE_USE_CPU=False and
so fall back to two independent single-process runs (no CUDA -> DistributedType.NO). torchrun
with ACCELERATE_USE_CPU=true gives accelerate MULTI_CPU with gloo: real DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.factories import pair, write_jsonl

from etokit.train.metric_logging import read_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_processes_equal_one(tmp_path):
    from etokit.models.init_model import build_tiny_model

    pairs = [pair(f"t{i}", outcome="lose" if i % 3 else "win") for i in range(8)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    build_tiny_model([m["content"] for p in pairs for m in p.prompt + p.chosen + p.rejected], tmp_path / "tiny")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_MIXED_PRECISION": "no",
    }
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
        "1",
        "--report-to",
        "none",
        "--ref-cache-dir",
        str(tmp_path / "cache"),
    ]

    def launch(n, out):
        cmd = [
            str(TORCHRUN),
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(n),
            str(ROOT / "scripts" / "train_dpo.py"),
            *args,
            "--output-dir",
            str(out),
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    one = launch(1, tmp_path / "one")
    two = launch(2, tmp_path / "two")
    assert "DPO on 1 process(es)" in one.stdout and "DPO on 2 process(es)" in two.stdout
    log1, log2 = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(log1) == len(log2) == 2
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in log2]), torch.tensor([r[key] for r in log1]), rtol=1e-5, atol=1e-5, msg=key
        )
    assert log1[-1]["loss"] < log1[0]["loss"]
    # both runs saw every token of every step: 2 processes really split the batch
    assert [r["trained_tokens"] for r in log2] == [r["trained_tokens"] for r in log1]
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        # Adam normalises updates: where a gradient is ~0, reduction-order noise can move a weight
        # by up to a fraction of lr (1e-3) in either run.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-4)
