"""`--engine vllm`: the adapter between run_episodes and vLLM's LLM.generate. vLLM needs a CUDA host,
so these tests give it a stand-in module with vLLM's interface (LLM, SamplingParams, outputs with
.outputs[0].text) and check what etokit sends and how it reads the replies back; real vLLM was not
run here (no GPU)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from typer.testing import CliRunner

from etokit.agent.protocol import STOP_STRINGS
from etokit.cli import app
from etokit.data import read_jsonl
from etokit.explore import ExploreConfig, Job, run_episodes

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_explore import CounterEnv, policy  # noqa: E402,F401  (policy is a fixture)

runner = CliRunner()


@pytest.fixture
def fake_vllm(monkeypatch):
    """A vllm module whose LLM answers `say <task>` for the task named in the prompt's text, with a
    made-up observation after the action (which the stop strings must cut)."""
    seen = {"init": [], "prompts": [], "params": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            seen["init"].append(kwargs)
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"].append(prompts)
            seen["params"].append(params)
            outs = []
            for p in prompts:
                text = self.tokenizer.decode(p["prompt_token_ids"])
                task = text.rsplit("Your task is to say ", 1)[1].split(".")[0] if "Your task is to say " in text else "x"
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    text=f"Thought: easy.\nAction: say {task}\nObservation: made up")]))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return seen


def test_vllm_generator_plays_episodes(fake_vllm, policy):
    from etokit.vllm_engine import VLLMGenerator

    config = ExploreConfig(icl=False, max_new_tokens=20, max_steps=3, seed=7)
    gen = VLLMGenerator(str(policy.path), policy.tokenizer, config)
    envs = [CounterEnv(), CounterEnv()]
    played = sorted(run_episodes(gen, envs, [Job("t1"), Job("t2"), Job("t3")], split="train"),
                    key=lambda t: t.task_id)
    assert [(t.task_id, t.reward, t.num_steps) for t in played] == [("t1", 1.0, 1), ("t2", 1.0, 1), ("t3", 1.0, 1)]
    assert played[0].messages[-1] == {"role": "assistant", "content": "Thought: easy.\nAction: say t1"}
    (init,) = fake_vllm["init"]
    assert init["model"] == str(policy.path) and init["seed"] == 7 and init["enable_prefix_caching"]
    params = fake_vllm["params"][0].kwargs
    assert params["max_tokens"] == 20 and params["temperature"] == 0.0 and params["stop"] == list(STOP_STRINGS)
    # The prompts are the chat-template token ids of the transformers engine, two episodes per call.
    first = fake_vllm["prompts"][0]
    assert len(first) == 2 and first[0]["prompt_token_ids"] == gen.encode(played[0].messages[:3])


def test_explore_cli_with_the_vllm_engine(fake_vllm, policy, tmp_path):
    out = tmp_path / "explore.jsonl"
    result = runner.invoke(app, ["explore", "--model", str(policy.path), "--env", "webshop", "--engine", "vllm",
                                 "--no-icl", "--max-steps", "2", "--limit", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out, "trajectory")
    assert len(rows) == 2 and all(r.model_revision.startswith("local:") for r in rows)
    assert all(m["content"].endswith("Action: say x") for r in rows for m in r.messages[3::2])


def test_vllm_engine_missing_is_one_line(policy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, find_spec says so
    result = runner.invoke(app, ["eval", "--model", str(policy.path), "--env", "webshop", "--engine", "vllm"])
    assert result.exit_code == 2
    assert "pip install 'etokit[vllm]'" in result.output and "Traceback" not in result.output
