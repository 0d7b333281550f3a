"""The plain-PyTorch math every flashcore kernel must equal, computed in fp32.

Shapes (LLaMA convention, heads before sequence):
    q: [B, Hq, Sq, D]    k, v: [B, Hkv, Skv, D]    Hq % Hkv == 0  (query head h reads KV head h // (Hq // Hkv))

Masking, per batch row b, query i, key j (all positions are indices into the key axis):
    allowed(b, i, j) = kv_start[b] <= j < kv_end[b]  and  (not causal or j <= q_offset[b] + i)
    - q_offset[b]: key index of query 0 (default Skv - Sq: queries sit at the end of the keys, i.e. after a cache)
    - kv_start[b]: first valid key (left padding puts pad keys before it; default 0)
    - kv_end[b]:   one past the last valid key (a preallocated/static cache holds garbage after it; default Skv)
A query row with no allowed key outputs exactly 0 (never NaN).

    out = softmax(q @ k^T * sm_scale + mask) @ v,   sm_scale defaults to 1/sqrt(D)
"""

from __future__ import annotations

import math

import torch


def _per_row(value, batch: int, default: int, device) -> torch.Tensor:
    """An int, a [B] tensor or None -> an int64 [B] tensor on `device`."""
    if value is None:
        value = default
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    return value.to(device=device, dtype=torch.int64).reshape(batch)


def attention_mask(batch: int, sq: int, skv: int, *, causal: bool = True, q_offset=None,
                   kv_start=None, kv_end=None, device=None) -> torch.Tensor:
    """Boolean mask [B, 1, Sq, Skv], True where query i may attend key j (see module docstring)."""
    q_off = _per_row(q_offset, batch, skv - sq, device)
    start = _per_row(kv_start, batch, 0, device)
    end = _per_row(kv_end, batch, skv, device)
    j = torch.arange(skv, device=device).view(1, 1, skv)
    i = torch.arange(sq, device=device).view(1, sq, 1)
    allowed = (j >= start.view(-1, 1, 1)) & (j < end.view(-1, 1, 1))
    if causal:
        allowed = allowed & (j <= q_off.view(-1, 1, 1) + i)
    return allowed.unsqueeze(1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        q_offset=None, kv_start=None, kv_end=None, sm_scale: float | None = None) -> torch.Tensor:
    """fp32 attention with GQA; returns fp32 [B, Hq, Sq, D]. Fully masked query rows are 0."""
    # q: [B, Hq, Sq, D]  k, v: [B, Hkv, Skv, D]
    batch, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    allowed = attention_mask(batch, sq, skv, causal=causal, q_offset=q_offset, kv_start=kv_start,
                             kv_end=kv_end, device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no allowed key -> all-zero weights
    return torch.matmul(probs, vf)


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens, *,
                     kv_start=None, sm_scale: float | None = None) -> torch.Tensor:
    """One new token per row against a cache whose first kv_lens[b] slots are valid (the new token's key
    included). q: [B, Hq, 1, D]; caches: [B, Hkv, S_max, D]; returns fp32 [B, Hq, 1, D]."""
    return attention_reference(q, k_cache, v_cache, causal=False, kv_start=kv_start, kv_end=kv_lens,
                               sm_scale=sm_scale)
