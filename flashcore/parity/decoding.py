"""Greedy decoding and teacher forcing through a transformers KV cache (the steps the scenarios are built from).

Written against the model's forward only (not generate()), so every model sees exactly the same tokens, positions
and masks; works with transformers 5.x whether the cache argument is called `cache` (5.2x) or `past_key_values`,
and passes `cache_position` to the versions that take it. Three ways a cache is fed, as production feeds it:

    DynamicCache   grows with every token (HF generate's default; valid length == allocated length)
    StaticCache    allocated once (generate(cache_implementation="static"), CUDA graphs): valid length < size;
                   `poison` fills the slots past the valid length with NaN, so a kernel that reads one shows it
    CUDA graph     one decode step captured over a StaticCache and replayed per token (GPU only)
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, StaticCache


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def wants_cache_position(model) -> bool:
    return "cache_position" in inspect.signature(model.forward).parameters


def new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def static_cache(model, max_len: int, batch: int = 1) -> StaticCache:
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older 5.x signature
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                           device=model.device, dtype=model.dtype)


def step_kwargs(model, cache, position: torch.Tensor, start: int | torch.Tensor | None = None) -> dict:
    """Forward kwargs of one cached step: position_ids [B, S]; `cache_position` (the cache slots written) where the
    model takes it, from `start` (slot of the first new token) or, for batch 1 without padding, the positions."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1, "position_ids": position}
    if wants_cache_position(model):  # transformers versions whose StaticCache writes at cache_position
        if start is None:
            kwargs["cache_position"] = position[0]
        else:
            kwargs["cache_position"] = start + torch.arange(position.shape[1], device=position.device)
    return kwargs


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every initialised layer, [B, Hkv, S, D] each (any transformers 5.x cache)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers
                if getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None]
    return list(zip(cache.key_cache, cache.value_cache))


def poison(cache, start: int, value: float = float("nan")) -> int:
    """Fill every cache slot from `start` on with `value` (NaN: what a kernel reading past the valid length would
    turn into a NaN output). Returns the number of slots poisoned per layer."""
    layers = cache_layers(cache)
    for keys, values in layers:
        keys[:, :, start:] = value
        values[:, :, start:] = value
    return layers[0][0].shape[2] - start if layers else 0


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 0/1 padding mask -> [B, S] positions (left padding: each row's first real token is position 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, ids: torch.Tensor, cache, mask: torch.Tensor | None, positions: torch.Tensor | None,
            all_logits: bool = False, start: int | None = None) -> torch.Tensor:
    """One cached forward; returns fp32 logits [B, S, V] (all positions) or [B, 1, V] (the last one). `start`: the
    cache slot of ids[:, 0] (for transformers versions that take cache_position)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 0 if all_logits else 1}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if positions is not None:
        kwargs["position_ids"] = positions
    if start is not None and wants_cache_position(model):
        kwargs["cache_position"] = start + torch.arange(ids.shape[1], device=ids.device)
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


def prompt_pieces(length: int, chunk: int | None) -> list[int]:
    """A prompt of `length` tokens fed whole (chunk None) or in pieces of `chunk` (prefill after a cache)."""
    if not chunk or chunk >= length:
        return [length]
    return [min(chunk, length - s) for s in range(0, length, chunk)]


@torch.no_grad()
def teacher_force(model, prompt: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  chunk: int = 1, prompt_logits: bool = False, cache=None, prompt_chunk: int | None = None,
                  poison_after_first: bool = False):
    """Feed prompt [B, P] then targets [B, T] through `cache` (default: a fresh DynamicCache). Returns (logits
    [B, T, V] fp32 where step t predicts targets[:, t], cache, prompt logits [B, P, V] or None).

    prompt_chunk: feed the prompt in pieces (the later ones are prefills after a cache). poison_after_first: after
    the first piece, fill the cache's unused slots with NaN (a StaticCache: garbage past the valid length)."""
    cache = cache if cache is not None else new_cache(model)
    mask = mask if mask is not None else torch.ones_like(prompt)
    positions = positions_from_mask(mask)
    outs, fed = [], 0
    for size in prompt_pieces(prompt.shape[1], prompt_chunk):
        outs.append(forward(model, prompt[:, fed:fed + size], cache, mask[:, :fed + size],
                            positions[:, fed:fed + size], all_logits=prompt_logits, start=fed))
        if poison_after_first and fed == 0:
            poison(cache, size)
        fed += size
    first = torch.cat(outs, dim=1) if prompt_logits else outs[-1]
    steps = [first[:, -1:]]
    next_pos = positions[:, -1:] + 1
    done = 0
    for size in segments(targets.shape[1] - 1, chunk):
        ids = targets[:, done:done + size]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = next_pos + torch.arange(size, device=ids.device).view(1, -1)
        steps.append(forward(model, ids, cache, mask, pos, all_logits=True, start=fed + done))
        next_pos = pos[:, -1:] + 1
        done += size
    return torch.cat(steps, dim=1), cache, (first if prompt_logits else None)


@torch.no_grad()
def warm_up_for_capture(model, prompt: torch.Tensor, max_len: int) -> None:
    """Compile the kernels and initialise cuBLAS outside CUDA-graph capture: two decode steps on a scratch
    StaticCache of the same shape, on a side stream."""
    scratch = static_cache(model, max_len)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pos0 = torch.zeros(1, 1, dtype=torch.long, device=prompt.device)
        for _ in range(2):
            model(input_ids=prompt[:, :1], **step_kwargs(model, scratch, pos0))
    torch.cuda.current_stream().wait_stream(side)


@torch.no_grad()
def graph_teacher_force(model, prompt: torch.Tensor, targets: torch.Tensor, max_len: int, prompt_chunk=None):
    """Batch-1 teacher forcing as CUDA-graph decoding runs it: the prompt prefilled into a NaN-poisoned StaticCache
    of max_len slots, then one decode step captured as a CUDA graph and replayed per target token.
    Returns logits [1, T, V] fp32 (step t predicts targets[:, t])."""
    warm_up_for_capture(model, prompt, max_len)
    cache = static_cache(model, max_len)
    first, _, _ = teacher_force(model, prompt, targets[:, :1], cache=cache, prompt_chunk=prompt_chunk,
                                poison_after_first=True)
    length = prompt.shape[1]
    token = targets[:, :1].clone()
    position = torch.full((1, 1), length, dtype=torch.long, device=prompt.device)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(input_ids=token, **step_kwargs(model, cache, position)).logits
    steps = [first[:, :1]]
    for t in range(1, targets.shape[1]):
        token.copy_(targets[:, t - 1:t])
        position.fill_(length + t - 1)
        graph.replay()
        steps.append(out[:, -1:].float().clone())
    return torch.cat(steps, dim=1)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int, mask: torch.Tensor | None = None, prompt_logits: bool = False):
    """Greedy generation, one decode step at a time. Returns (tokens [B, steps], logits [B, steps, V] fp32, the
    logits at every prompt position [B, P, V] or None): with prompt_logits, what teacher_force(prompt, tokens,
    prompt_logits=True) would return for the same tokens, from one pass."""
    cache = new_cache(model)
    mask = mask if mask is not None else torch.ones_like(prompt)
    positions = positions_from_mask(mask)
    first = forward(model, prompt, cache, mask, positions, all_logits=prompt_logits)
    logits = first[:, -1]
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
    return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1), (first if prompt_logits else None)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a cache's key and value tensors (DynamicCache of any transformers 5.x)."""
    return sum(t.numel() * t.element_size() for pair in cache_layers(cache) for t in pair)
