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
from etokit.rollout.episodes import run_episodes
from etokit.rollout.generator import ExploreConfig
from etokit.rollout.jobs import Job

from tests.factories import CounterEnv

runner = CliRunner()


# vLLM's parameters that exist across the supported range (setup.cfg: vllm>=0.6), recorded from its
# source: v0.6.0, v0.9 (entrypoints/llm.py at 0012cf69) and main (10fdb8f0). A name etokit passes
# must be in these lists; anything else (a misspelling, a parameter only some versions have) is a
# TypeError here, as in vLLM.
LLM_INIT_PARAMS = frozenset(
    {
        "model",
        "tokenizer",
        "tokenizer_mode",
        "skip_tokenizer_init",
        "trust_remote_code",
        "tensor_parallel_size",
        "dtype",
        "quantization",
        "revision",
        "tokenizer_revision",
        "seed",
        "gpu_memory_utilization",
        "swap_space",
        "cpu_offload_gb",
        "enforce_eager",
        "disable_custom_all_reduce",
    }
)
# LLM(**kwargs) goes to EngineArgs: the fields of it that etokit may pass.
ENGINE_ARGS_FIELDS = frozenset({"enable_prefix_caching", "max_model_len", "max_num_seqs", "download_dir"})
SAMPLING_PARAMS = frozenset(
    {
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    }
)
TOKENS_PROMPT_KEYS = frozenset({"prompt_token_ids"})  # vllm.inputs.TokensPrompt's required key


def _check_names(what, names, allowed):
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise TypeError(f"{what} got unexpected keyword argument(s) {unknown}")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A vllm module whose LLM answers `say <task>` for the task named in the prompt's text, with a
    made-up observation after the action. It takes only vLLM's parameter names and applies the
    SamplingParams it is given as vLLM does: generation ends at the first stop string (left out of
    the text) or after max_tokens tokens."""
    seen = {"init": [], "prompts": [], "params": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            _check_names("SamplingParams", kwargs, SAMPLING_PARAMS)
            self.kwargs = kwargs
            self.stop = kwargs.get("stop") or []
            self.max_tokens = kwargs.get("max_tokens", 16)
            self.include_stop_str_in_output = kwargs.get("include_stop_str_in_output", False)

    class LLM:
        def __init__(self, model, **kwargs):
            _check_names("LLM.__init__", kwargs, LLM_INIT_PARAMS | ENGINE_ARGS_FIELDS)
            seen["init"].append({"model": model, **kwargs})
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))

        # prompts is positional-only in v0.9; use_tqdm follows prompt_token_ids in v0.6: keyword only.
        def generate(self, prompts, /, sampling_params=None, *, use_tqdm=True, lora_request=None):
            assert isinstance(sampling_params, SamplingParams), sampling_params
            assert all(isinstance(p, dict) and set(p) <= TOKENS_PROMPT_KEYS for p in prompts), prompts
            seen["prompts"].append(prompts)
            seen["params"].append(sampling_params)
            outs = []
            for p in prompts:
                text = self.tokenizer.decode(p["prompt_token_ids"])
                task = (
                    text.rsplit("Your task is to say ", 1)[1].split(".")[0] if "Your task is to say " in text else "x"
                )
                reply = f"Thought: easy.\nAction: say {task}\nObservation: made up"
                ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"][: sampling_params.max_tokens]
                reply = self.tokenizer.decode(ids)
                for stop in sampling_params.stop:
                    if stop in reply:
                        cut = reply.index(stop) + (len(stop) if sampling_params.include_stop_str_in_output else 0)
                        reply = reply[:cut]
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=reply)]))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return seen


def test_vllm_generator_plays_episodes(fake_vllm, policy):
    from etokit.rollout.vllm_engine import VLLMGenerator

    config = ExploreConfig(icl=False, max_new_tokens=20, max_steps=3, seed=7)
    gen = VLLMGenerator(str(policy.path), policy.tokenizer, config)
    envs = [CounterEnv(), CounterEnv()]
    played = sorted(run_episodes(gen, envs, [Job("t1"), Job("t2"), Job("t3")], split="train"), key=lambda t: t.task_id)
    assert [(t.task_id, t.reward, t.num_steps) for t in played] == [("t1", 1.0, 1), ("t2", 1.0, 1), ("t3", 1.0, 1)]
    assert played[0].messages[-1] == {"role": "assistant", "content": "Thought: easy.\nAction: say t1"}
    (init,) = fake_vllm["init"]
    assert init["model"] == str(policy.path) and init["seed"] == 7 and init["enable_prefix_caching"]
    params = fake_vllm["params"][0].kwargs
    assert params["max_tokens"] == 20 and params["temperature"] == 0.0 and params["stop"] == list(STOP_STRINGS)
    assert "Observation" not in played[0].messages[-1]["content"]
    # The prompts are the chat-template token ids of the transformers engine, two episodes per call.
    first = fake_vllm["prompts"][0]
    assert len(first) == 2 and first[0]["prompt_token_ids"] == gen.encode(played[0].messages[:3])


def test_vllm_generator_replies_end_where_sampling_params_end_them(fake_vllm, policy):
    """max_new_tokens reaches vLLM as max_tokens: a 3-token budget gives 3-token replies."""
    from etokit.rollout.vllm_engine import VLLMGenerator

    gen = VLLMGenerator(str(policy.path), policy.tokenizer, ExploreConfig(icl=False, max_new_tokens=3, max_steps=1))
    (played,) = run_episodes(gen, [CounterEnv()], [Job("t1")], split="train")
    reply = played.messages[3]["content"]
    assert reply and len(policy.tokenizer(reply, add_special_tokens=False)["input_ids"]) <= 3 and played.reward == 0


def test_fake_vllm_refuses_what_vllm_refuses(fake_vllm):
    import vllm

    with pytest.raises(TypeError, match="max_new_tokens"):
        vllm.SamplingParams(max_new_tokens=5)
    with pytest.raises(TypeError, match="enable_prefix_cache"):
        vllm.LLM("m", enable_prefix_cache=True)


def test_explore_cli_with_the_vllm_engine(fake_vllm, policy, tmp_path):
    out = tmp_path / "explore.jsonl"
    result = runner.invoke(
        app,
        [
            "explore",
            "--model",
            str(policy.path),
            "--env",
            "webshop",
            "--engine",
            "vllm",
            "--no-icl",
            "--max-steps",
            "2",
            "--limit",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out, "trajectory")
    assert len(rows) == 2 and all(r.model_revision.startswith("local:") for r in rows)
    assert all(m["content"].endswith("Action: say x") for r in rows for m in r.messages[3::2])


def test_vllm_engine_missing_is_one_line(policy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, find_spec says so
    result = runner.invoke(app, ["eval", "--model", str(policy.path), "--env", "webshop", "--engine", "vllm"])
    assert result.exit_code == 2
    assert "pip install 'etokit[vllm]'" in result.output and "Traceback" not in result.output
