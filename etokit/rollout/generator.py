"""The policy's side of a rollout: how it decodes (ExploreConfig), the batched chat-template
generation of one model (Generator; etokit/rollout/kv_reuse.py keeps each episode's KV cache
between steps, etokit/rollout/vllm_engine.py plays the same replies with vLLM), and which model
exactly was loaded (model_revision)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from etokit.agent.protocol import STOP_STRINGS
from etokit.data.schema import Message
from etokit.errors import EtokitError
from etokit.rollout.kv_reuse import KVReuseDecoder, kv_reuse_unsupported

KV_CACHES = ("slots", "in-place", "concat")  # ExploreConfig.kv_cache, fastest first


@dataclass
class ExploreConfig:
    """How the agent decodes and how many episodes share a batch."""

    batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (the paper's exploration and evaluation)
    top_p: float = 1.0
    icl: bool = True  # the 1-shot example in the prompt
    seed: int = 0
    max_steps: int | None = None  # None = the environment's own limit
    # An episode whose environment fails (a worker or JVM that died, a step past the timeout) is
    # played again from its reset this many times before it is recorded as an error.
    env_retries: int = 1
    # Keep each episode's KV cache between steps and prefill only what is new (etokit/rollout/kv_reuse.py);
    # False re-encodes the whole conversation with model.generate at every step.
    kv_reuse: bool = True
    # With kv_reuse, how the cache is held: "slots" (CPU default) keeps each episode's K/V in a slot of its
    # own, generated replies included, and reads the shared prompt prefix once for all episodes
    # (etokit/rollout/slot_pool.py; models or devices it does not support run "in-place"); "in-place" rebuilds a
    # left-padded batch cache per step, preallocated and written in place (etokit/rollout/slot_cache.py);
    # "concat" grows transformers' DynamicCache by concatenation at every token (the reference engine).
    kv_cache: str = "slots"
    # The instruction turn (the prompt's first user message): None is etokit's own for the
    # environment (etokit/agent/prompts/); a policy cloned on other expert data (the paper's
    # published trajectories) is explored with that data's instruction, the one it was trained on.
    instruction: str | None = None


def model_revision(model: str, revision: str | None) -> str:
    """What exactly was loaded: the commit sha for a Hub model; for a local folder "local:" and a
    fingerprint of its config and weight files (name, size, first and last MiB: cheap on 14 GB
    checkpoints, and any retraining changes it)."""
    path = Path(model)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                size = f.stat().st_size
                digest.update(f"{f.name}:{size}:".encode())
                with open(f, "rb") as fh:
                    digest.update(fh.read(1 << 20))
                    if size > 1 << 21:
                        fh.seek(-(1 << 20), 2)
                        digest.update(fh.read())
        return f"local:{digest.hexdigest()[:16]}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(model, revision=revision).sha
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise EtokitError(
            f"--model {model}{'@' + revision if revision else ''}: not a local folder and not found "
            f"on the Hub ({str(e).splitlines()[0]})"
        ) from None


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``PATH_OR_REPO[@REV]`` -> (name, revision). A local path containing "@" stays whole."""
    if Path(ref).exists() or "@" not in ref:
        return ref, None
    name, _, revision = ref.rpartition("@")
    if not name or not revision:
        raise EtokitError(f"--model {ref!r}: expected PATH_OR_REPO or REPO@REVISION")
    from etokit.data.names import check_repo_id, check_revision

    return check_repo_id(name, "--model"), check_revision(revision, "--model revision")


class Generator:
    """Batched chat-template generation with stop strings, for one model and tokenizer."""

    def __init__(self, model, tokenizer, config: ExploreConfig):
        import torch
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = config.temperature > 0
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=sampling,
            temperature=config.temperature if sampling else None,
            top_p=config.top_p if sampling else None,
            top_k=None,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=self.pad_id,
            stop_strings=list(STOP_STRINGS),
        )
        self.max_context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.device = next(model.parameters()).device
        self._torch = torch
        # _stopped: how many tokens before the new ones a stop string can start in, plus one whose
        # text may change alone (0: always decode the whole reply).
        self._stop_reach = max(len(s.encode()) for s in STOP_STRINGS) + 1 if _local_decoder(tokenizer) else 0
        self._added = set(getattr(tokenizer, "added_tokens_decoder", None) or ())
        byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        self._byte_pieces = (
            {i for t, i in tokenizer.get_vocab().items() if byte_piece.fullmatch(t)} if self._stop_reach else set()
        )
        self.decoder = None
        if config.kv_cache not in KV_CACHES:
            raise EtokitError(f"kv_cache {config.kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        if config.kv_reuse and kv_reuse_unsupported(model) is None:
            eos = self.generation_config.eos_token_id
            options = dict(
                eos_ids=[eos] if isinstance(eos, int) else list(eos or []),
                max_new_tokens=config.max_new_tokens,
                stopped=self._stopped,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=config.seed,
            )
            from etokit.rollout.slot_pool import SlotDecoder, slots_unsupported  # imports torch

            if config.kv_cache == "slots" and slots_unsupported(model) is None:
                self.decoder = SlotDecoder(model, pad_id=self.pad_id, **options)
            else:
                in_place = config.kv_cache != "concat"
                self.decoder = KVReuseDecoder(model, pad_id=self.pad_id, in_place=in_place, **options)

    def _stopped(self, ids: list[int], checked: int = 0) -> bool:
        """Whether the reply ``ids`` holds a stop string, its first ``checked`` tokens having held
        none (the decoder asks after every new token, with ``checked`` = the tokens before it).
        Decoding the whole reply each time is quadratic in its length (13 ms of checks for a
        256-token reply with SmolLM2's tokenizer); a new stop string must end in a new token, so only
        the new tokens and the ``_stop_reach`` tokens before them are decoded: same answer (see
        _local_decoder)."""
        start = checked - self._stop_reach if self._stop_reach else 0
        # Byte-fallback pieces decode as a group, skipped special tokens aside (an invalid group is
        # all U+FFFD, its ASCII bytes too): never start inside one.
        while start > 0 and (ids[start - 1] in self._byte_pieces or ids[start - 1] in self._added):
            start -= 1
        text = self.tokenizer.decode(ids[max(start, 0) :], skip_special_tokens=True)
        return any(s in text for s in STOP_STRINGS)

    def encode(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes its own BOS and role tokens.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fits(self, ids: list[int]) -> bool:
        return len(ids) + self.config.max_new_tokens <= self.max_context

    def generate(
        self, batch: list[list[int]], keys: Sequence[Any] | None = None, seeds: Sequence[int] | None = None
    ) -> list[str]:
        """One reply per prompt. ``keys`` name each row's episode, so that its KV cache is kept for
        its next step (see KVReuseDecoder); without keys every prompt is encoded from scratch.
        ``seeds`` seed each row's sampling (KV-reuse engine; model.generate draws from torch's global
        generator, seeded once per run)."""
        if self.decoder is not None and keys is not None:
            out = self.decoder.generate(batch, keys, seeds)
            return [cut_at_stop(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        torch = self._torch
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self.generation_config,
                tokenizer=self.tokenizer,
            )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        # Generation stops a row at a stop string but keeps the rows around it going (and the
        # stopped row may hold a few tokens past it): cut every reply at its first stop string.
        return [cut_at_stop(t) for t in texts]


def _local_decoder(tokenizer) -> bool:
    """Whether the text a token adds, as far as it can hold a stop string, does not depend on the
    tokens before it, so that the last tokens' text shows a stop string ending in them. True for
    byte-level BPE (GPT-2, Llama 3, SmolLM2: an ASCII character is one byte, decoded alike
    wherever a window starts) and SentencePiece's (▁ replaced by a space, byte fallback, fused,
    the first space stripped: only the window's first token can change, and it is not needed;
    a group of byte pieces is decoded whole, see Generator._stopped).
    The stop strings must be ASCII without spaces (a cleaned-up or stripped space is no part of
    one). Any other decoder decodes the whole reply at every token, as before."""
    import json

    if not all(s.isascii() and " " not in s for s in STOP_STRINGS):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    for part in parts:
        kind = part.get("type")
        if kind == "Replace":
            if part.get("pattern") != {"String": "▁"} or part.get("content") != " ":
                return False
        elif kind == "Strip":
            if part.get("content") != " " or part.get("stop", 0):
                return False
        elif kind not in ("ByteLevel", "ByteFallback", "Fuse", "Metaspace"):
            return False
    return bool(parts)


def cut_at_stop(text: str) -> str:
    cuts = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    return text[: min(cuts)] if cuts else text
