"""`make demo`: the whole ETO loop on CPU against an embedded Hub, then the last checkpoint loaded
back from the Hub by revision, as a user would.

    python -m etokit.demo [--dir .demo] [--config demo|demo-smollm2|FILE.yaml]

Starts `etokit hub serve`'s server on a free loopback port (data under <dir>/hub, wiped first),
points the HF clients at it, and runs `etokit run` with the shipped demo config (etokit/configs/demo.yaml): expert trajectories on
TextWorldExpress train seeds, a tiny Llama + SentencePiece tokenizer built from them, BC and two
ETO iterations, evaluation on test-seen / test-unseen, every dataset and checkpoint pushed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import time
from pathlib import Path

REPO = "demo/eto-textworld-express"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="working folder (wiped first)")
    parser.add_argument("--config", default="demo", help="a shipped config name (demo, demo-smollm2) or a YAML file")
    args, overrides = parser.parse_known_args(argv)
    from etokit.configs import resolve

    args.config = resolve(args.config)

    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    with embedded_hub(args.dir):
        _demo(args, overrides)


@contextlib.contextmanager
def embedded_hub(folder: Path):
    """An embedded Hub server on a free loopback port (data in ``folder``/hub, kept), with the HF
    clients of this process and of the training subprocesses it starts pointed at it."""
    port = _free_port()
    # huggingface_hub, datasets and transformers read these at import: set them before any of them
    # is imported (here, and in the training subprocesses, which inherit them).
    os.environ.update(
        {
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "HF_HUB_DISABLE_XET": "1",  # the embedded server speaks LFS, not Xet
            "HF_TOKEN": "hf_demo_token_for_the_embedded_hub",  # any token: the local server checks none
            "HF_HOME": str(folder / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    from etokit.hub.server import HubServer

    server = HubServer(data_dir=folder / "hub", host="127.0.0.1", port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _demo(args, overrides) -> None:
    import datasets

    datasets.logging.set_verbosity_error()
    from etokit.cli._console import print_unwrapped
    from etokit.run import Run, RunConfig, console, results_table
    from etokit.train.config import parse_config

    start = time.monotonic()
    console.print(f"[bold]etokit demo[/]: embedded Hub at {os.environ['HF_ENDPOINT']}, run in {args.dir / 'run'}")
    cfg = parse_config(
        RunConfig, ["--config", str(args.config), "--run-dir", str(args.dir / "run"), "--push-to", REPO, *overrides]
    )
    run = Run(cfg)
    rows = run.run()

    import torch
    from transformers import AutoModelForCausalLM

    last = rows[-1]["model"]
    with console.status(f"Loading {REPO}@{last} back from the Hub..."):
        model = AutoModelForCausalLM.from_pretrained(REPO, revision=last, use_safetensors=True, trust_remote_code=False)
    local = AutoModelForCausalLM.from_pretrained(
        args.dir / "run" / run.manifest.get(f"dpo-{last.split('-')[1]}")["model"],
        use_safetensors=True,
        trust_remote_code=False,
    )
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    console.print(
        f'[green]✓[/] AutoModelForCausalLM.from_pretrained("{REPO}", revision="{last}"): '
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{'identical to' if same else '[red]DIFFERENT from[/]'} the local checkpoint"
    )
    print_unwrapped(results_table(rows), on=console)
    console.print(
        f"demo finished in {(time.monotonic() - start) / 60:.1f} min; results in {args.dir / 'run' / 'results.json'}"
    )
    from etokit.report import REPORT_FILE

    console.print(f"report (open it in a browser): {(args.dir / 'run' / REPORT_FILE).resolve()}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
