"""Secrets and loading policy.

- The HF token never appears in what a full `etokit run` prints or writes: stdout/stderr, the run
  dir (manifest, saved configs, data files, train logs, TensorBoard events, launch logs, model
  cards), the HF_HOME caches and the Hub's store. The Hub server is made to require the token for
  the run, so the token is really in use while it is grepped for.
- A token typed into the wrong option is not echoed back in the error.
- Models load from safetensors only, and a model's own code (``auto_map``) runs only when
  ``trust_remote_code`` opts in; every ``from_pretrained`` in etokit/ and scripts/ says so.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import factories
from tests.run_fixtures import TINY_RUN
from etokit.errors import EtokitError

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
# Distinctive, and token-shaped (hf_ + 20+ characters), as a real one is.
TOKEN = "hf_faultsSECRET" + uuid.uuid4().hex
# The tiny loop of the run tests (about a minute on 2 cores), with TensorBoard on for both trainings
# so that its event files (and the hparams they record) are among the files grepped.
RUN_FLAGS = [*TINY_RUN, "--bc.report-to", "tensorboard", "--dpo.report-to", "tensorboard"]


def _files_holding(secret: str, *roots: Path) -> list[str]:
    needle = secret.encode()
    hits = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
    return hits


def test_full_run_never_prints_or_writes_the_token(hub_server, hub, tmp_path, monkeypatch, capfd):
    from etokit.cli import app

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # From now on the server refuses any request without this token: the run really uses it.
    monkeypatch.setattr(hub_server, "token", TOKEN)
    run_dir = tmp_path / "run"
    repo = f"etokit-tests/secrets-{uuid.uuid4().hex[:8]}"

    result = CliRunner().invoke(app, ["run", *RUN_FLAGS, "--run-dir", str(run_dir), "--push-to", repo])
    captured = capfd.readouterr()
    assert result.exit_code == 0, result.output
    printed = result.output + captured.out + captured.err
    assert "iter-1" in printed
    assert TOKEN not in printed

    # What the grep must have seen: every kind of output the brief lists.
    names = {p.name for p in run_dir.rglob("*") if p.is_file()}
    assert {
        "manifest.json",
        "results.json",
        "etokit_config.yaml",
        "train_log.jsonl",
        "launch.log",
        "expert.jsonl",
        "pairs_iter1.jsonl",
        "reward_per_iteration.md",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    hf_home = Path(os.environ["HF_HOME"])
    hub_files = {p.name for p in hub_server.storage.root.rglob("*") if p.is_file()}
    assert hf_home.is_dir() and hub_files

    leaks = _files_holding(TOKEN, run_dir, hf_home, hub_server.storage.root)
    assert not leaks, f"the token was written to {leaks}"

    # The cards themselves, read back from the Hub: model card per checkpoint and the dataset cards.
    from huggingface_hub import hf_hub_download

    cards = [hf_hub_download(repo, "README.md", revision="iter-1")]
    cards += [hf_hub_download(f"{repo}-{kind}", "README.md", repo_type="dataset") for kind in ("expert", "pairs")]
    for card in cards:
        assert TOKEN not in Path(card).read_text()


def test_a_token_typed_into_the_wrong_option_is_not_echoed(hub, tmp_path, monkeypatch):
    from etokit.cli import app
    from etokit.recipes.launch import run_recipe

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    data = tmp_path / "t.jsonl"
    factories.write_jsonl(data, [factories.trajectory("t1", 1.0)])
    runner = CliRunner()
    for argv in (
        ["push-expert", str(data), "--repo-id", TOKEN],
        ["push-expert", str(data), "--repo-id", f"me/{TOKEN}!"],
        ["hub", "serve", "--data-dir", str(tmp_path / "hub"), "--token", TOKEN, "--port", "70000"],
        ["run", "--run-dir", str(tmp_path / "run"), "--push-to", TOKEN],
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert "Error:" in result.output and TOKEN not in result.output, result.output

    # A token that is not HF_TOKEN's value is still recognised by its shape.
    other = "hf_" + "Z" * 30
    result = runner.invoke(app, ["push-expert", str(data), "--repo-id", other])
    assert result.exit_code == 2 and other not in result.output and "***" in result.output

    # The training scripts' entry point redacts the same way.
    def main():
        raise EtokitError(f"--push-to {TOKEN!r} must be NAMESPACE/NAME")

    with pytest.raises(SystemExit) as exit_info:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            run_recipe(main)
    assert exit_info.value.code == 2 and TOKEN not in err.getvalue() and "***" in err.getvalue()


# ------------------------------------------------------------------------------ loading policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from etokit.models.init_model import build_tiny_model

    out = tmp_path_factory.mktemp("policy") / "tiny"
    texts = [m["content"] for i in range(6) for m in factories.trajectory(f"t{i}", 1.0, seed=i).messages]
    build_tiny_model(texts, out, vocab_size=400)
    return out


def _remote_code_model(tiny: Path, dest: Path, marker: Path) -> Path:
    """``tiny`` with a custom model type whose code (evil.py) leaves ``marker`` when it is imported."""
    shutil.copytree(tiny, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(
        model_type="evil_llama",
        architectures=["EvilModel"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "evil.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return dest


def test_custom_code_runs_only_with_trust_remote_code(tiny, tmp_path):
    from etokit.train.model_loading import load_model_and_tokenizer

    marker = tmp_path / "RAN"
    model_dir = _remote_code_model(tiny, tmp_path / "remote", marker)
    with pytest.raises(EtokitError, match="--trust-remote-code"):
        load_model_and_tokenizer(str(model_dir))
    assert not marker.exists()

    # The training scripts pass their config's trust_remote_code (default False) to the loader.
    from etokit.train.config import TrainConfig

    assert TrainConfig(model="m", data="d", output_dir=str(tmp_path / "o")).trust_remote_code is False

    model, _ = load_model_and_tokenizer(str(model_dir), trust_remote_code=True)  # the user opted in
    assert marker.exists() and type(model).__name__ == "EvilModel"


def test_a_builtin_model_type_ignores_auto_map_without_running_it(tiny, tmp_path):
    from etokit.train.model_loading import load_model_and_tokenizer

    marker = tmp_path / "RAN"
    model_dir = _remote_code_model(tiny, tmp_path / "remote", marker)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_model_and_tokenizer(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_pickle_weights_are_never_loaded(tiny, tmp_path):
    import pickle

    from etokit.train.model_loading import load_model_and_tokenizer

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    only_pickle = tmp_path / "only_pickle"
    shutil.copytree(tiny, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    (only_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(EtokitError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model_and_tokenizer(str(only_pickle))

    # Both formats present: the safetensors file is what loads, the pickle is never opened.
    both = tmp_path / "both"
    shutil.copytree(tiny, both)
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    model, _ = load_model_and_tokenizer(str(both))
    assert not marker.exists() and model.num_parameters() > 0


def _from_pretrained_calls():
    for path in sorted([*ROOT.joinpath("etokit").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                yield path.relative_to(ROOT), node


def test_every_from_pretrained_states_the_loading_policy():
    calls = list(_from_pretrained_calls())
    assert len(calls) >= 5
    for path, call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        where = f"{path}:{call.lineno}"
        # trust_remote_code explicitly (a literal False, or the caller's opt-in passed through).
        passes_kwargs = any(k.arg is None for k in call.keywords)
        assert "trust_remote_code" in keywords or passes_kwargs, f"{where}: no trust_remote_code"
        if isinstance(keywords.get("trust_remote_code"), ast.Constant):
            assert keywords["trust_remote_code"].value is False, where
        is_model = "Tokenizer" not in ast.unparse(call.func)
        if is_model and "gguf_file" not in keywords:
            assert (
                isinstance(keywords.get("use_safetensors"), ast.Constant) and keywords["use_safetensors"].value is True
            ), f"{where}: weights must load with use_safetensors=True"


def test_eval_runs_custom_code_only_with_the_flag(tiny, tmp_path):
    from typer.testing import CliRunner

    from etokit.cli import app

    marker = tmp_path / "RAN"
    model_dir = _remote_code_model(tiny, tmp_path / "remote", marker)
    argv = [
        "eval",
        "--model",
        str(model_dir),
        "--env",
        "textworld-express",
        "--split",
        "test-seen",
        "--limit",
        "1",
        "--max-steps",
        "1",
        "--max-new-tokens",
        "4",
        "--no-icl",
        "--out",
        str(tmp_path / "eval.json"),
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "--trust-remote-code" in result.output, result.output
    assert not marker.exists() and not (tmp_path / "eval.json").exists()

    result = CliRunner().invoke(app, argv + ["--trust-remote-code"])  # the user opted in
    assert result.exit_code == 0, result.output
    assert marker.exists() and json.loads((tmp_path / "eval.json").read_text())["episodes"] == 1
