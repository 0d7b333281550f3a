"""flashcore as a transformers attention backend: one attention function and one mask function, registered.

    AttentionInterface.register("fcore", attention)       # called by every decoder layer
    AttentionMaskInterface.register("fcore", mask)        # called once per forward by create_causal_mask

The registered name is "fcore", not "flashcore": transformers 5.x treats every implementation name containing
"flash" as a FlashAttention kernel (utils/generic.py is_flash_attention_requested) and tries to fetch it from the
hub, so `attn_implementation="flashcore"` cannot work. Use `attn_implementation="fcore"` (or flashcore.NAME).

The mask function returns a compact description (flashcore.integrations.masks) instead of a dense mask; the
attention function turns it into the kernels' q_offset / kv_start / kv_end. A single new token (Sq == 1) goes to
decode_attention with kv_lens as a device tensor (no host sync: capturable in a CUDA graph over a StaticCache);
everything else to prefill_attention. Keys arrive un-repeated ([B, Hkv, Skv, D]); the output is [B, Sq, Hq, D].

Masks the kernels cannot express (sliding windows, packed sequences, custom or_/and_ masks, padding with holes)
are not silently dropped: the mask function then returns transformers' dense boolean mask and the attention
falls back to torch SDPA for that call (counted as a fallback in the stats).
Works with transformers 5.x (checked on 5.17 and 5.24): both call the mask function with keyword arguments
batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, ...
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from flashcore.integrations import masks, stats

NAME = "fcore"  # no "flash" in it: see the module docstring

PrefillFn = Callable[..., torch.Tensor]
DecodeFn = Callable[..., torch.Tensor]


def _kernels() -> tuple[PrefillFn, DecodeFn]:
    from flashcore.ops import decode_attention, prefill_attention  # imported late: triton loads on first use
    return prefill_attention, decode_attention


def _capturing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def flashcore_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
                   kv_offset=0, mask_function: Callable = causal_mask_function,
                   attention_mask: torch.Tensor | None = None, device=None, **kwargs):
    """AttentionMaskInterface entry: a flashcore description (or None) for plain causal masks with left padding;
    transformers' dense boolean mask for anything else (the attention then falls back to SDPA)."""
    if q_length is None and kwargs.get("cache_position") is not None:  # older 5.x call style
        q_length, q_offset = kwargs["cache_position"].shape[0], kwargs["cache_position"][0]
    padding = attention_mask
    if padding is not None:
        padding = padding.to(torch.bool)
    simple = mask_function is causal_mask_function and isinstance(kv_offset, int) and kv_offset == 0
    if simple and padding is not None and q_length > 1 and not _capturing():
        simple = masks.is_left_padded(padding)  # prefill only: decode extends a layout already checked
    if not simple:
        kwargs.pop("allow_is_causal_skip", None)
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, device=device, **kwargs)
    return masks.build_description(batch_size, q_length, kv_length, q_offset, padding,
                                   device if device is not None else (padding.device if padding is not None else "cpu"))


def make_attention(prefill: PrefillFn | None = None, decode: DecodeFn | None = None) -> Callable:
    """An AttentionInterface function over the given kernels (default: flashcore.ops). Tests pass deliberately
    broken kernels here to prove the parity suite catches them."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask, dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                  **kwargs) -> tuple[torch.Tensor, None]:
        # query: [B, Hq, Sq, D]  key, value: [B, Hkv, Skv, D]  ->  [B, Sq, Hq, D]
        batch, _, sq, _ = query.shape
        if attention_mask is not None and not masks.is_description(attention_mask):
            stats.record(module, "fallback", batch * sq)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if dropout and module.training:
            raise NotImplementedError("flashcore attention is inference-only: attention dropout is not supported")
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError("flashcore attention supports neither logit softcapping nor attention sinks")
        prefill_fn, decode_fn = prefill, decode
        if prefill_fn is None or decode_fn is None:
            default_prefill, default_decode = _kernels()
            prefill_fn, decode_fn = prefill_fn or default_prefill, decode_fn or default_decode
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q_offset = kv_start = kv_end = None
        if attention_mask is not None:
            q_offset, kv_start, kv_end = masks.unpack_description(attention_mask)
        if sq == 1 and causal:
            if kv_end is None:  # all key slots valid: a host-known length, filled on the device (no sync)
                kv_end = torch.full((batch,), key.shape[2], dtype=masks.DESC_DTYPE, device=query.device)
            out = decode_fn(query, key, value, kv_end, kv_start=kv_start, sm_scale=scaling)
            stats.record(module, "decode", batch)
        else:
            out = prefill_fn(query, key, value, causal=causal, q_offset=q_offset, kv_start=kv_start, kv_end=kv_end,
                             sm_scale=scaling)
            stats.record(module, "prefill", batch * sq)
        return out.transpose(1, 2), None

    return attention


flashcore_attention = make_attention()


def register(name: str = NAME, attention: Callable | None = None) -> str:
    """Register an attention function (default: flashcore's) and flashcore's mask function under `name`."""
    AttentionInterface.register(name, attention or flashcore_attention)
    AttentionMaskInterface.register(name, flashcore_mask)
    return name
