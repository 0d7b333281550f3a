"""Input builders and the accuracy criterion shared by the kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashcore.reference import attention_mask


def randn(*shape, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def qkv(batch, hq, hkv, sq, skv, d, *, dtype, device, seed=0):
    # q: [B, Hq, Sq, D]  k, v: [B, Hkv, Skv, D]
    return (randn(batch, hq, sq, d, dtype=dtype, device=device, seed=seed),
            randn(batch, hkv, skv, d, dtype=dtype, device=device, seed=seed + 1),
            randn(batch, hkv, skv, d, dtype=dtype, device=device, seed=seed + 2))


def sdpa_same_dtype(q, k, v, *, causal=True, q_offset=None, kv_start=None, kv_end=None) -> torch.Tensor:
    """PyTorch SDPA in the inputs' own precision with the reference's boolean mask (rows with no key -> 0)."""
    mask = attention_mask(q.shape[0], q.shape[2], k.shape[2], causal=causal, q_offset=q_offset,
                          kv_start=kv_start, kv_end=kv_end, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return torch.nan_to_num(out, nan=0.0)


def assert_close_to_reference(out: torch.Tensor, ref32: torch.Tensor, sdpa: torch.Tensor | None) -> None:
    """fp32: tight absolute tolerance. fp16/bf16: the flash-attention criterion
    max|out - ref32| <= 2 * max|sdpa_same_dtype - ref32| + 1e-5."""
    assert out.shape == ref32.shape, (out.shape, ref32.shape)
    assert torch.isfinite(out).all(), "output holds NaN/inf"
    err = (out.float() - ref32).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 2e-5, f"fp32 max error {err:.3g} > 2e-5"
        return
    assert sdpa is not None
    bound = 2 * (sdpa.float() - ref32).abs().max().item() + 1e-5
    assert err <= bound, f"{out.dtype} max error {err:.3g} > 2 * sdpa error + 1e-5 = {bound:.3g}"
