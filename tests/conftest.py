"""Test session setup: an embedded Hub server on loopback, and the HF client env pointing at it.

HF_ENDPOINT / HF_HUB_DISABLE_XET are read when huggingface_hub is imported, so they are set here,
at conftest import, before any test module imports an HF library.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="etokit-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
# A fake token: the embedded server accepts any, and the secret-leak tests grep for its value.
HF_TEST_TOKEN = "hf_etokitTESTtoken0123456789abcdefSECRET"

os.environ.update(
    {
        "HF_ENDPOINT": HUB_ENDPOINT,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": HF_TEST_TOKEN,
        "HF_HOME": str(_HOME / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
)
assert "huggingface_hub" not in sys.modules, "conftest must run before huggingface_hub is imported"

# Imported now, with the env above, so their loggers bind to the session's stderr rather than to a
# CliRunner's temporary stream (closed once that invocation ends).
import datasets  # noqa: E402,F401
import huggingface_hub  # noqa: E402,F401


@pytest.fixture(scope="session")
def hub_server():
    """The embedded Hub server for the whole session. Tests fail if a client hit a route the
    server does not implement (an HF client upgrade that changed the protocol)."""
    from etokit.hub.server import HubServer

    server = HubServer(data_dir=_HOME / "hub", host="127.0.0.1", port=HUB_PORT)
    server.start()
    yield server
    server.stop()
    assert not server.unknown_routes, f"HF clients called routes the server lacks: {server.unknown_routes}"


@pytest.fixture
def hub(hub_server):
    """Per-test view of the session server; checks no unknown route was hit during the test."""
    before = len(hub_server.unknown_routes)
    yield hub_server
    new = hub_server.unknown_routes[before:]
    assert not new, f"HF clients called routes the server lacks: {new}"


_counter = iter(range(10**9))


@pytest.fixture
def repo_name(request):
    """A unique `namespace/name` per test (the server's namespace is the token's user)."""
    safe = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")  # the Hub refuses "--"
    return f"etokit-tests/{safe}-{next(_counter)}"


class ResumeProbe:
    """What a training run's optimizer steps saw: how many it took, and the optimizer and
    scheduler state in force at its first step (before that step changed them)."""

    def __init__(self):
        self.steps = 0
        self.first_optimizer_state: dict | None = None
        self.first_scheduler_state: dict | None = None

    def assert_continued(self, checkpoint: Path, *, total_steps: int) -> None:
        """The run resumed from ``checkpoint`` (checkpoints/step-N): it took only the steps after N,
        and its first one started from the optimizer and scheduler state saved there. A resume
        that restarts from scratch (same final numbers on a deterministic run) fails here."""
        import torch

        saved_step = int(checkpoint.name.split("-")[1])
        assert self.steps == total_steps - saved_step, (
            f"the resumed run took {self.steps} optimizer steps, expected {total_steps - saved_step} "
            f"(it should redo none of the {saved_step} checkpointed ones)"
        )
        saved_sched = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
        assert self.first_scheduler_state == saved_sched and saved_sched["last_epoch"] == saved_step
        saved_opt = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
        got = self.first_optimizer_state["state"]
        assert saved_opt and got.keys() == saved_opt.keys()
        for i, state in saved_opt.items():
            assert int(got[i]["step"]) == int(state["step"]) == saved_step
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[i][k], state[k]), f"optimizer state {i}.{k} differs from the checkpoint's"


@pytest.fixture
def resume_probe(monkeypatch):
    """Records every ``etokit.train.optimization.optimizer_step`` of the recipes run in this test."""
    import copy

    from etokit.train import optimization

    probe, real = ResumeProbe(), optimization.optimizer_step

    def recording(accelerator, model, optimizer, scheduler, *args, **kwargs):
        if probe.steps == 0:
            probe.first_optimizer_state = copy.deepcopy(optimizer.state_dict())
            probe.first_scheduler_state = copy.deepcopy(scheduler.state_dict())
        probe.steps += 1
        return real(accelerator, model, optimizer, scheduler, *args, **kwargs)

    monkeypatch.setattr(optimization, "optimizer_step", recording)
    return probe


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random Llama whose replies depend on the prompt (tests.factories.build_policy)."""
    from types import SimpleNamespace

    from tests.factories import build_policy

    path = tmp_path_factory.mktemp("policy") / "tiny"
    model, tokenizer = build_policy(path)
    return SimpleNamespace(path=path, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def reference_run(hub_server, tmp_path_factory):
    """(config, rows) of one uninterrupted `etokit run` of tests.run_fixtures.FLAGS, made once per
    session: test_run.py and test_faults_crash.py compare their crashed-and-resumed runs with it."""
    from etokit.run import Run
    from tests.run_fixtures import make_config, new_repo

    cfg = make_config(tmp_path_factory.mktemp("run") / "a", new_repo("a"))
    return cfg, Run(cfg).run()
