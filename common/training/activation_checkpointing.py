"""Gradient (activation) checkpointing for local training, through transformers' own switch.

A client's training step keeps every block's activations for the backward pass; on a
small device those, not the 4-bit weights, are most of its memory (SmolLM2-135M, batch
8: ~750 MB of saved activations against ~100 MB of NF4 weights). Checkpointing keeps only
each block's input and recomputes the block during backward: about one more forward pass
of compute for a fraction of the memory. QLoRA trains this way by default.

We only switch transformers' `activation_checkpointing_enable` (non-reentrant
`torch.utils.checkpoint`) on for the duration of local training, and refuse methods it
would silently break: transformers drops the `past_key_values` a checkpointed block
receives, which is exactly where prefix-style methods put their trainable prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from fedpeft.common.errors import ConfigError

KV_PREFIX_REASON = "its trainable prefix reaches the blocks as past_key_values, which checkpointed blocks drop"


def refuses_checkpointing(method: str) -> bool:
    """True for a registered prefix-style method (config validators ask before a run starts)."""
    from fedpeft.common.methods import available_methods, get_method

    return method in available_methods() and get_method(method).kv_prefix


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside `model` (a peft or fedpeft wrapper, or the model itself)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def passes_kv_prefix(model: nn.Module) -> bool:
    """True when a peft prefix-tuning config (prefix, P-tuning v2, MAM, UniPELT) feeds the
    blocks a key/value prefix through `past_key_values`."""
    from peft import PeftType

    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and any(getattr(c, "peft_type", None) == PeftType.PREFIX_TUNING
                                             for c in configs.values()):
            return True
    return False


def check_checkpointable(model: nn.Module, what: str) -> nn.Module:
    """The transformers model to switch, or a ConfigError saying why `what` cannot be checkpointed."""
    hf = _hf_model(model)
    if hf is None or not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient checkpointing: {what} ({type(model).__name__}) has no transformers model "
                          "that supports it")
    if passes_kv_prefix(model):
        raise ConfigError(f"gradient checkpointing cannot train {what}: {KV_PREFIX_REASON}; "
                          "train it without gradient checkpointing")
    return hf


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool, what: str = "this model") -> Iterator[None]:
    """Within the block, `model`'s transformer blocks recompute their activations in backward.

    The model is usually cached across rounds, so the previous setting is restored after.
    """
    if not enabled:
        yield
        return
    hf = check_checkpointable(model, what)
    # transformers 5.23 renamed gradient_* to activation_* (the old names warn); older releases have only gradient_*
    renamed = hasattr(hf, "activation_checkpointing_enable")
    if getattr(hf, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", False):
        yield  # already on, with the caller's own settings: leave them as they are
        return
    hooks_before = list(getattr(hf, "_require_grads_hooks", None) or [])
    if renamed:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Enabling also hooks the input embeddings so that their output requires grad, which only
    # reentrant checkpointing needs; disabling would remove the hook only for models loaded
    # through transformers' own peft integration. Remove it now: no backward through frozen
    # embeddings during training, and no hook left behind on a model cached across rounds.
    added = [h for h in (getattr(hf, "_require_grads_hooks", None) or []) if h not in hooks_before]
    for handle in added:
        handle.remove()
    if added:
        hf._require_grads_hooks = hooks_before
    try:
        yield
    finally:
        hf.activation_checkpointing_disable() if renamed else hf.gradient_checkpointing_disable()
