"""The model a recipe trains, ready to train: a causal LM and its tokenizer from a folder or the
Hub, then LoRA adapters and gradient checkpointing as the config asks.

Loading is also where untrusted input meets the process, so it is strict: weights only from
safetensors (no pickle), remote code only when allowed, and a tokenizer without a chat template is
refused up front, since every loss mask etokit trains with comes from the rendered conversation.
`etokit explore` and `etokit eval` load their policy through the same function."""

from __future__ import annotations

from etokit.errors import EtokitError

# Precisions a policy can be loaded in (``dtype``): "auto" is the checkpoint's own (its config's dtype).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model_and_tokenizer(
    name: str, *, revision=None, trust_remote_code=False, attn_implementation=None, dtype=None, option="--model"
):
    """A causal LM and its tokenizer from a local folder or a Hub repo. Weights load from
    safetensors only (no pickle), and remote code runs only when explicitly allowed. ``dtype``: None
    (float32), one of DTYPES, or a torch dtype."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise EtokitError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etokit.models.files import check_model_dir

    check_model_dir(name, option=option, trust_remote_code=trust_remote_code)  # a local folder, from its files
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, use_safetensors=True, attn_implementation=attn_implementation, dtype=dtype, **kwargs
        )
    except (OSError, ValueError) as e:  # ValueError: custom code not trusted, unknown model type, bad repo id
        raise EtokitError(
            f"{option} {name!r}: cannot load model (revision {revision}): {str(e).splitlines()[0]}"
        ) from None
    if tokenizer.chat_template is None:
        raise EtokitError(
            f"{option} {name!r}: the tokenizer has no chat template; etokit trains on rendered conversations"
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules):
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules and target_modules != ["all-linear"] else "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapt_for_training(model, cfg):
    """``cfg.lora`` adapters and ``cfg.gradient_checkpointing``, as a recipe's config asks."""
    if cfg.lora:
        model = apply_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph
