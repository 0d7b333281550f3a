"""Decode attention: one new query token per row against a KV cache, split-K ("flash-decoding"), GQA-aware.

    decode_attention(q, k_cache, v_cache, kv_lens, *, kv_start=None, sm_scale=None, num_splits=None)
    # q: [B, Hq, 1, D]  k_cache, v_cache: [B, Hkv, S_max, D]  kv_lens: int [B]  ->  [B, Hq, 1, D] in q.dtype

Only the first kv_lens[b] slots of row b are valid (the new token's key included); slots from kv_lens[b] on may
hold anything (a static cache) and never reach the result. Keys before kv_start[b] (left padding) are ignored.
The grid depends on shapes only and nothing is read back to the host: the op is CUDA-graph capturable, and a
captured graph stays correct when kv_lens changes between replays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashcore.ops._common import (LOG2E, LaunchCache, check_qkv, default_scale, empty_bhsd, split_row_arg,
                                   use_custom_op)


@triton.jit
def _decode_split_kernel(Q, K, V, KVLens, KVStart, kv_start_int, PartOut, PartLse, qk_scale,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                         HKV, S_MAX, CHUNK,
                         NUM_SPLITS: tl.constexpr,
                         GROUP: tl.constexpr,        # Hq // Hkv: query heads served by one KV head
                         BLOCK_H: tl.constexpr,      # GROUP padded to a power of two >= 16 (the tl.dot M dimension)
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one (batch row, KV head, split of the cache): the flash-decoding partial pass.

    All GROUP query heads of the KV head form the rows of one tile, so each K/V block is read once per group
    (GQA-aware). Over its keys j in [split * CHUNK, (split + 1) * CHUNK) within [kv_start, kv_len) the program
    runs the FlashAttention online softmax (running max m, denominator l, accumulator acc; exp2 with
    sm_scale * log2(e) folded in) and writes the normalised partial output acc / l and its log-sum-exp
    lse = m + log2(l) (log2 units; -inf for an empty split). Dao et al., "Flash-Decoding for long-context
    inference", 2023; FlashAttention-2 (Dao, 2023) for the online softmax.
    """
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)  # 64-bit batch offsets: b * stride_b can pass 2**31 for big caches
    kvh = pid_bk % HKV

    kv_hi = tl.minimum(tl.load(KVLens + b).to(tl.int32), S_MAX)
    kv_lo = kv_start_int
    if HAS_KV_START:
        kv_lo = tl.load(KVStart + b).to(tl.int32)
    kv_lo = tl.maximum(kv_lo, 0)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, kv_hi)
    lo = tl.maximum(lo, (kv_lo // BLOCK_N) * BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_h  # query heads of this group (rows >= GROUP are padding)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=offs_h[:, None] < GROUP, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_j = start_n + offs_n
        valid_j = (offs_j >= kv_lo) & (offs_j < hi)
        # -- keys outside [kv_lo, kv_len) load as 0: static-cache garbage (NaN, inf) never reaches the sums
        k = tl.load(k_base + offs_j[None, :] * stride_kn + offs_d[:, None], mask=valid_j[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(valid_j[None, :], qk, float("-inf"))
        # -- update running max and denominator (a split always holds >= 1 valid key when the loop runs,
        #    but a block can be all-invalid at the left edge, hence the -inf guard)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_j[:, None] * stride_vn + offs_d[None, :], mask=valid_j[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- partial result of this split: normalised output and log2-sum-exp (-inf when it saw no key)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    rows = (b * HKV * GROUP + heads) * NUM_SPLITS + split  # PartLse: [B, Hq, NUM_SPLITS]
    head_ok = offs_h < GROUP
    tl.store(PartLse + rows, lse, mask=head_ok)
    tl.store(PartOut + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=head_ok[:, None])


@triton.jit
def _decode_merge_kernel(PartOut, PartLse, Out, stride_ob, stride_oh, HQ,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program = one (batch row, query head): merge the split partials by log-sum-exp.

    out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max_s lse_s) (flash-decoding reduction step).
    A row whose splits are all empty (no valid key) outputs exactly 0.
    """
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(PartLse + pid * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_shift)  # 0 for empty splits
    parts = tl.load(PartOut + (pid * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=offs_s[:, None] < NUM_SPLITS, other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: a host query, no device sync); 8 on CPU (interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _decode_config(on_gpu: bool) -> dict:
    """Key block and launch parameters (fixed: no autotune, so the first call is capturable)."""
    if not on_gpu:
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, min_chunk=64, waves=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3, min_chunk=256, waves=2)


def choose_num_splits(batch: int, hkv: int, s_max: int, sm_count: int, block_n: int, min_chunk: int,
                      waves: int = 2) -> int:
    """Splits of the cache per (row, KV head): enough programs for `waves` programs per multiprocessor (more
    waves shrink the idle tail of the last one), but no split shorter than min_chunk keys (each split costs a
    partial write and a merge)."""
    want = triton.cdiv(waves * sm_count, batch * hkv)
    most = max(1, triton.cdiv(s_max, max(min_chunk, block_n)))
    return max(1, min(want, most))


def _split_chunk(s_max: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """Chunk length (a multiple of block_n) and the number of non-empty splits it gives."""
    chunk = triton.cdiv(triton.cdiv(s_max, num_splits), block_n) * block_n
    return chunk, max(1, triton.cdiv(s_max, chunk))


def _decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                   kv_start: torch.Tensor | None, kv_start_int: int, sm_scale: float, num_splits: int) -> torch.Tensor:
    # q: [B, Hq, 1, D]  k_cache, v_cache: [B, Hkv, S_max, D]  kv_lens: [B]  (checked by decode_attention)
    batch, hq, _, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    out = empty_bhsd(batch, hq, 1, d, q)
    if out.numel() == 0:
        return out
    for t in (q, k_cache, v_cache):
        if t.stride(3) != 1:
            raise ValueError("decode_attention: the head_dim axis of q and the caches must have stride 1")
    cfg = _decode_config(q.is_cuda)
    group = hq // hkv
    if num_splits <= 0:
        num_splits = choose_num_splits(batch, hkv, s_max, _sm_count(q.device), cfg["BLOCK_N"], cfg["min_chunk"],
                                       cfg["waves"])
    chunk, num_splits = _split_chunk(s_max, num_splits, cfg["BLOCK_N"])
    # -- one fp32 buffer for the partials: outputs [B, Hq, splits, D], then log-sum-exps [B, Hq, splits]
    rows = batch * hq * num_splits
    part = torch.empty(rows * (d + 1), dtype=torch.float32, device=q.device)
    part_lse = part[rows * d:]
    _split_launch((batch * hkv, num_splits), (
        q, k_cache, v_cache, kv_lens, kv_start if kv_start is not None else kv_lens, kv_start_int,
        part, part_lse, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        hkv, s_max, chunk,
        num_splits, group, max(16, triton.next_power_of_2(group)), d, cfg["BLOCK_N"], kv_start is not None,
        "ieee" if q.dtype == torch.float32 else "tf32",
    ), cfg["num_warps"], cfg["num_stages"])
    _merge_launch((batch * hq,), (
        part, part_lse, out, out.stride(0), out.stride(1), hq,
        num_splits, max(2, triton.next_power_of_2(num_splits)), d,
    ), 4, 3)
    return out


# Positional launches through LaunchCache (argument order = the kernels' signatures): an eager decode call
# would otherwise spend more host time in triton's launcher than the GPU spends on the kernels.
_split_launch = LaunchCache(_decode_split_kernel)
_merge_launch = LaunchCache(_decode_merge_kernel)


_decode_op = torch.library.custom_op("flashcore::decode_attention", mutates_args=())(_decode_launch)


@_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, kv_lens, kv_start, kv_start_int, sm_scale, num_splits):
    batch, hq, _, d = q.shape
    return empty_bhsd(batch, hq, 1, d, q)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                     kv_start=None, sm_scale: float | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One query token per row, q [B, Hq, 1, D], against caches [B, Hkv, S_max, D] whose first kv_lens[b]
    slots are valid; returns [B, Hq, 1, D] in q.dtype. num_splits=None picks a split count from the shapes."""
    check_qkv("decode_attention", q, k_cache, v_cache)
    batch = q.shape[0]
    if q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must hold one token per row [B, Hq, 1, D], got {tuple(q.shape)}")
    if not isinstance(kv_lens, torch.Tensor):
        raise ValueError(f"decode_attention: kv_lens must be an integer tensor [B] on q's device, got {type(kv_lens)}")
    lens_t, _ = split_row_arg("decode_attention", "kv_lens", kv_lens, batch, 0, q.device)
    start_t, start_i = split_row_arg("decode_attention", "kv_start", kv_start, batch, 0, q.device)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"decode_attention: num_splits must be a positive int or None, got {num_splits!r}")
    launch = _decode_op if use_custom_op() else _decode_launch
    return launch(q, k_cache, v_cache, lens_t, start_t, start_i, default_scale(sm_scale, q.shape[3]),
                  num_splits or 0)
