"""flashcore for Hugging Face transformers: register the backend, switch a model to it and back, read counters.

    from flashcore.integrations import replace_llama_attention_with_flashcore, get_flashcore_attention_stats
    model = replace_llama_attention_with_flashcore(model)        # or from_pretrained(..., attn_implementation="fcore")
    model.generate(...)
    get_flashcore_attention_stats(model).total.decode_calls
    restore_sdpa_attention(model)

No class surgery and no weight changes: switching is transformers' own set_attn_implementation over the
registered "fcore" attention + mask functions (why not "flashcore": see flashcore.integrations.hf) (flashcore.integrations.hf).
"""

from __future__ import annotations

import torch

from flashcore.integrations import hf, stats
from flashcore.integrations.hf import NAME, flashcore_attention, flashcore_mask, make_attention, register
from flashcore.integrations.stats import AttentionStats, LayerStats


def set_attention(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Switch a loaded transformers model to attention implementation `name` (registered names included)."""
    if name == NAME:
        register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers without set_attn_implementation: the config attribute is what the layers read
        model.config._attn_implementation = name
    return model


def replace_llama_attention_with_flashcore(model: torch.nn.Module) -> torch.nn.Module:
    """Route every attention layer of a Llama / Mistral / Qwen2 model through flashcore (in place; returns it)."""
    return set_attention(model, NAME)


def restore_sdpa_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch back to PyTorch SDPA (in place; returns the model)."""
    return set_attention(model, "sdpa")


def load_llama_with_flashcore(name_or_preset: str, *, device=None, dtype=None, token: str | None = None,
                              seed: int | None = None) -> torch.nn.Module:
    """A model preset (flashcore.models: "tiny", "llama-3.1-8b", ...) or a hub id, loaded with flashcore attention."""
    from flashcore.models import load_model
    register()
    return load_model(name_or_preset, device=device, dtype=dtype, token=token, seed=seed,
                      attn_implementation=NAME).model


def get_flashcore_attention_stats(model: torch.nn.Module) -> AttentionStats:
    """Per-layer counters: prefill / decode / fallback calls and query tokens (a snapshot)."""
    return stats.collect(model)


def reset_flashcore_attention_stats(model: torch.nn.Module) -> None:
    stats.reset(model)


__all__ = [
    "NAME", "AttentionStats", "LayerStats", "flashcore_attention", "flashcore_mask", "get_flashcore_attention_stats",
    "hf", "load_llama_with_flashcore", "make_attention", "register", "replace_llama_attention_with_flashcore",
    "reset_flashcore_attention_stats", "restore_sdpa_attention", "set_attention",
]
