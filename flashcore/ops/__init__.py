"""Triton attention kernels (no transformers import here).

    prefill_attention(q, k, v, *, causal=True, q_offset=None, kv_start=None, kv_end=None, sm_scale=None)
    decode_attention(q, k_cache, v_cache, kv_lens, *, kv_start=None, sm_scale=None, num_splits=None)

Both are torch custom ops (flashcore::prefill_attention, flashcore::decode_attention) with fake implementations,
so they trace under torch.compile and capture in CUDA graphs; the math they equal is flashcore/reference.py.
"""

from flashcore.ops.decode import decode_attention
from flashcore.ops.prefill import prefill_attention

__all__ = ["prefill_attention", "decode_attention"]
