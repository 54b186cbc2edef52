"""Reference log-probs, computed once and cached on disk.

DPO compares the policy with a frozen reference (ETO: the policy that explored). Its log-probs
never change during training, so they are computed in one no-grad pass before the first step and
the reference model is dropped; training holds one model. With LoRA the pass runs before the
adapters are attached, so the reference is the starting policy (ETO: the explorer). Each LoRA
iteration merges its adapters into the weights it saves, so the next iteration's reference is that
merged explorer, never the base model under a disabled, already trained adapter.

The cache key covers everything the numbers depend on: the reference weights (Hub commit sha, or a
content hash of a local checkpoint), the exact token ids and masks fed to it (which covers the
dataset, the tokenizer and its chat template, and the max length), the dtype, plus the tokenizer
name and max length spelled out. A resumed or repeated run with the same inputs loads the file;
any change recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from etokit.faults import faultpoint
from etokit.train.packing import Tokenized

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_FILES = ("config.json", "adapter_config.json")


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("ETOKIT_CACHE", Path(constants.HF_HOME) / "etokit")) / "ref-logps"


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """Identity of a checkpoint's weights: ``sha256:<hex>`` of a local folder's weight and config
    files, or ``hub:<repo>@<commit sha>`` for a Hub repo (the revision resolved to its commit,
    so a moved branch invalidates the cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        h = hashlib.sha256()
        # The checkpoint's own files only: not its training state (checkpoints/, optimizer moments
        # as large as the weights, different after a resume) nor a save in progress (.save.partial).
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and (p.suffix in _WEIGHT_SUFFIXES or p.name in _CONFIG_FILES)
            and not any(part == "checkpoints" or part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"no weight files in {path}")
        for p in files:
            h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return "sha256:" + h.hexdigest()
    from huggingface_hub import HfApi

    sha = HfApi().model_info(name_or_path, revision=revision).sha
    return f"hub:{name_or_path}@{sha}"


def sequences_fingerprint(seqs: Sequence[Tokenized]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(len(s.input_ids).to_bytes(8, "little"))
        h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(bytearray(map(bool, s.loss_mask))))
    return h.hexdigest()


def cache_key(*, model: str, sequences: str, tokenizer: str, max_length: int | None, dtype: str) -> dict[str, str]:
    meta = {
        "model": model,
        "sequences": sequences,
        "tokenizer": tokenizer,
        "max_length": str(max_length),
        "dtype": dtype,
        "format": "1",
    }
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    return meta


def load(cache_dir: Path, meta: dict[str, str]) -> torch.Tensor | None:
    from safetensors import safe_open

    path = Path(cache_dir) / f"{meta['key']}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if any(stored.get(k) != v for k, v in meta.items()):
                return None  # a key collision or a stale format: recompute
            return f.get_tensor("logps")
    except Exception:  # unreadable (a disk that lost it): the cache is only a cache, recompute
        return None


def save(cache_dir: Path, meta: dict[str, str], logps: torch.Tensor) -> Path:
    from safetensors.torch import save

    from etokit.data.io import atomic_write

    path = Path(cache_dir) / f"{meta['key']}.safetensors"
    # Temp file, fsync, rename: the other ranks and later runs load it, never half of it.
    with atomic_write(path) as f:
        f.write(save({"logps": logps.contiguous().float()}, metadata=meta))
        faultpoint("ref-cache.before-rename")
    return path


def cached_reference_logps(
    cache_dir: Path,
    meta: dict[str, str],
    compute: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, bool]:
    """``(logps, hit)``: the cached tensor for ``meta``, or ``compute()`` saved under it."""
    hit = load(cache_dir, meta)
    if hit is not None:
        return hit, True
    logps = compute()
    save(cache_dir, meta, logps)
    return logps, False
