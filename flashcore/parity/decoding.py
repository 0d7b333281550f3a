"""Greedy decoding and teacher forcing through a transformers KV cache (the steps the scenarios are built from).

Written against the model's forward only (not generate()), so every model sees exactly the same tokens, positions
and masks; works with transformers 5.x whether the cache argument is called `cache` (5.2x) or `past_key_values`.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 0/1 padding mask -> [B, S] positions (left padding: each row's first real token is position 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, ids: torch.Tensor, cache, mask: torch.Tensor | None, positions: torch.Tensor | None,
            all_logits: bool = False) -> torch.Tensor:
    """One cached forward; returns fp32 logits [B, S, V] (all positions) or [B, 1, V] (the last one)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 0 if all_logits else 1}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if positions is not None:
        kwargs["position_ids"] = positions
    return model(input_ids=ids, **kwargs).logits.float()


def segments(total: int, chunk: int) -> list[int]:
    """How `total` teacher-forced tokens are fed: chunk == 1 -> one decode step each; chunk > 1 -> groups of
    (chunk - 1) tokens through the prefill kernel onto the cache, each followed by one single-token decode step."""
    if chunk <= 1:
        return [1] * total
    out, left = [], total
    while left:
        multi = min(chunk - 1, left - 1)
        if multi > 0:
            out.append(multi)
            left -= multi
        out.append(1)
        left -= 1
    return out


@torch.no_grad()
def teacher_force(model, prompt: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  chunk: int = 1, prompt_logits: bool = False):
    """Feed prompt [B, P] then targets [B, T] through a fresh cache. Returns (logits [B, T, V] fp32 where step t
    predicts targets[:, t], cache, prefill logits [B, P, V] or None)."""
    cache = new_cache(model)
    mask = mask if mask is not None else torch.ones_like(prompt)
    positions = positions_from_mask(mask)
    first = forward(model, prompt, cache, mask, positions, all_logits=prompt_logits)
    steps = [first[:, -1:]]
    next_pos = positions[:, -1:] + 1
    fed = 0
    for size in segments(targets.shape[1] - 1, chunk):
        ids = targets[:, fed:fed + size]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = next_pos + torch.arange(size, device=ids.device).view(1, -1)
        steps.append(forward(model, ids, cache, mask, pos, all_logits=True))
        next_pos = pos[:, -1:] + 1
        fed += size
    return torch.cat(steps, dim=1), cache, (first if prompt_logits else None)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int, mask: torch.Tensor | None = None):
    """Greedy generation, one decode step at a time. Returns (tokens [B, steps], logits [B, steps, V] fp32)."""
    cache = new_cache(model)
    mask = mask if mask is not None else torch.ones_like(prompt)
    positions = positions_from_mask(mask)
    logits = forward(model, prompt, cache, mask, positions)[:, -1]
    next_pos = positions[:, -1:] + 1
    tokens, all_logits = [], []
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        all_logits.append(logits)
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        logits = forward(model, token, cache, mask, next_pos)[:, -1]
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a cache's key and value tensors (DynamicCache of any transformers 5.x)."""
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors)
