"""vLLM as the exploration / evaluation engine on GPU hosts (`--engine vllm`, extra ``vllm``).

Same interface as explore.Generator, so run_episodes, the trajectories and their format do not
change: prompts are the chat-template token ids the transformers engine would see, replies are cut
at the same stop strings. vLLM schedules the batch itself and its prefix cache keeps each
episode's earlier turns (what etokit/rollout/kv_reuse.py does for the transformers engine).

Greedy replies can differ from the transformers engine's in the last bits of a near-tie: vLLM's
kernels are not transformers'. Sampling takes one seed for the engine (``LLM(seed=...)``), not one
per request, so samples of the same prompt differ.

Supported: vllm>=0.6 (setup.cfg). Not run on real vLLM here: this host has no GPU;
tests/test_vllm_engine.py checks the adapter against a stand-in that takes only the parameter names
of LLM.__init__ / EngineArgs / SamplingParams / LLM.generate common to that range (read from vLLM's
source) and applies stop strings and max_tokens as vLLM does.
"""

from __future__ import annotations

from typing import Any, Sequence

from etokit.agent.protocol import STOP_STRINGS
from etokit.errors import EtokitError
from etokit.rollout.generator import ExploreConfig, Generator, cut_at_stop


class VLLMGenerator(Generator):
    def __init__(
        self,
        model: str,
        tokenizer,
        config: ExploreConfig,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **engine_args: Any,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise EtokitError("--engine vllm needs vLLM (a CUDA host): pip install 'etokit[vllm]'") from None
        self.tokenizer, self.config = tokenizer, config
        self.decoder = None
        self.llm = LLM(
            model=model,
            tokenizer=model,
            revision=revision,
            tokenizer_revision=revision,
            dtype=dtype,
            seed=config.seed,
            enable_prefix_caching=True,
            trust_remote_code=trust_remote_code,
            **engine_args,
        )
        sampling = config.temperature > 0
        self.params = SamplingParams(
            n=1,
            max_tokens=config.max_new_tokens,
            temperature=config.temperature if sampling else 0.0,
            top_p=config.top_p if sampling else 1.0,
            stop=list(STOP_STRINGS),
            skip_special_tokens=True,
        )
        self.max_context = self.llm.llm_engine.model_config.max_model_len

    def generate(
        self, batch: list[list[int]], keys: Sequence[Any] | None = None, seeds: Sequence[int] | None = None
    ) -> list[str]:
        # ``seeds`` is not used: vLLM draws from the engine's generator, seeded once with config.seed.
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in batch], self.params, use_tqdm=False)
        # vLLM returns the outputs in the order of the prompts; its stop strings are excluded from
        # the text, the cut is kept for replies that stop at EOS with a stop string inside.
        return [cut_at_stop(out.outputs[0].text) for out in outputs]
