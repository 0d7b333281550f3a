"""The compact mask flashcore hands from transformers' mask step to its attention step (no transformers import).

transformers builds one mask per forward (AttentionMaskInterface) and passes it to every layer's attention
(AttentionInterface). SDPA gets a dense [B, 1, Sq, Skv] boolean mask; flashcore only needs three numbers per
batch row, in the flashcore.reference convention:

    q_offset[b]  key index of query 0 (= tokens already in the cache)
    kv_start[b]  first valid key (left padding sits before it)
    kv_end[b]    one past the last valid key (a static cache holds stale slots after it)

They travel as a "description": an int32 tensor of shape [1, 1, 3, B] (rows q_offset, kv_start, kv_end). It is
4-D on purpose: transformers passes any 4-D tensor through untouched (generate() precomputes masks for static
caches and feeds them back as `attention_mask`), and each row desc[0, 0, i] is a contiguous [B] tensor the kernels
read directly. Everything is computed on the device: no .item(), so building it is CUDA-graph capturable.
`None` means the default: causal, queries at the end of the keys, every key valid (a multi-token forward over a
DynamicCache without padding).
"""

from __future__ import annotations

import torch

DESC_DTYPE = torch.int32
Q_OFFSET, KV_START, KV_END = 0, 1, 2


def is_description(mask) -> bool:
    """True for a flashcore mask description (int32 [1, 1, 3, B]); False for dense masks and None."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == DESC_DTYPE and mask.dim() == 4
            and mask.shape[0] == 1 and mask.shape[1] == 1 and mask.shape[2] == 3)


def unpack_description(desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """desc [1, 1, 3, B] -> (q_offset, kv_start, kv_end), each a contiguous int32 [B] view."""
    rows = desc[0, 0]
    return rows[Q_OFFSET], rows[KV_START], rows[KV_END]


def first_valid_key(padding_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool (True = real token) -> [B] index of the first True (0 for an all-False row). Device-side."""
    # argmax over an int tensor returns the first maximal index
    return padding_mask.to(torch.int32).argmax(dim=-1).to(DESC_DTYPE)


def is_left_padded(padding_mask: torch.Tensor) -> bool:
    """Whether each row is False* True* (left padding or none). Reads the mask back: call it outside capture."""
    length = padding_mask.shape[-1]
    start = first_valid_key(padding_mask)
    expected = torch.arange(length, device=padding_mask.device).view(1, -1) >= start.view(-1, 1)
    return bool(torch.equal(expected, padding_mask.to(torch.bool)))


def build_description(batch: int, q_length: int, kv_length: int, q_offset, padding_mask: torch.Tensor | None,
                      device) -> torch.Tensor | None:
    """The compact mask for a causal forward of q_length queries against kv_length keys.

    q_offset: int or 0-d tensor (a StaticCache hands its live length counter: it is read here, at once, into a new
    tensor, because the cache increments it in place during the forward). padding_mask: [B, L] bool or None.
    Returns None when the defaults already describe the mask.
    """
    int_offset = not isinstance(q_offset, torch.Tensor)
    if padding_mask is None and int_offset and kv_length == q_offset + q_length and q_length > 1:
        return None  # (a decode step still gets a description: its kv_lens, built once per forward, not per layer)
    if int_offset:
        q_off = torch.full((batch,), int(q_offset), dtype=DESC_DTYPE, device=device)
    else:
        q_off = q_offset.to(device=device, dtype=DESC_DTYPE).reshape(1).expand(batch)
    if padding_mask is None:
        start = torch.zeros(batch, dtype=DESC_DTYPE, device=device)
    else:
        start = first_valid_key(padding_mask.to(device))
    end = q_off + q_length
    return torch.stack([q_off, start, end]).view(1, 1, 3, batch)
