"""Prefill attention: causal (or full) attention of a block of queries against keys, GQA-aware.

    prefill_attention(q, k, v, *, causal=True, q_offset=None, kv_start=None, kv_end=None, sm_scale=None)
    # q: [B, Hq, Sq, D]  k, v: [B, Hkv, Skv, D]  ->  [B, Hq, Sq, D] in q.dtype (a [B, Sq, Hq, D] buffer)

Masking follows flashcore/reference.py exactly: query i of row b attends key j when
kv_start[b] <= j < kv_end[b] and (not causal or j <= q_offset[b] + i); rows with no key output 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from flashcore.ops._common import LOG2E, check_qkv, default_scale, empty_bhsd, split_row_arg, use_custom_op


@triton.jit
def _row_bound(ptr, fallback, b, HAS_TENSOR: tl.constexpr):
    """Per-row bound: ptr[b] when a tensor was given, else the int fallback."""
    if HAS_TENSOR:
        return tl.load(ptr + b).to(tl.int32)
    return fallback


@triton.jit
def _load_k_t(k_base, k_desc, b, kvh, start_n, stride_kn, offs_j, offs_d, valid_j,
              MASKED: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K block transposed, [HEAD_DIM, BLOCK_N]. Keys outside the valid range need no zeroing: their scores are
    replaced by -inf before use."""
    if USE_TMA:
        return tl.trans(k_desc.load([b.to(tl.int32), kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM))
    if MASKED:
        return tl.load(k_base + offs_j[None, :] * stride_kn + offs_d[:, None], mask=valid_j[None, :], other=0.0)
    return tl.load(k_base + offs_j[None, :] * stride_kn + offs_d[:, None])


@triton.jit
def _load_v(v_base, v_desc, b, kvh, start_n, stride_vn, offs_j, offs_d, valid_j,
            MASKED: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """V block, [BLOCK_N, HEAD_DIM]; in masked blocks invalid rows are zeroed (0 * NaN garbage would be NaN)."""
    if USE_TMA:
        v = v_desc.load([b.to(tl.int32), kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if MASKED:
            v = tl.where(valid_j[:, None], v, 0.0)
        return v
    if MASKED:
        return tl.load(v_base + offs_j[:, None] * stride_vn + offs_d[None, :], mask=valid_j[:, None], other=0.0)
    return tl.load(v_base + offs_j[:, None] * stride_vn + offs_d[None, :])


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, stride_kn, stride_vn,
               offs_m_key, offs_n, offs_d, start_n, kv_lo, kv_hi, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax (FlashAttention-2, Algorithm 1, inner loop body)."""
    offs_j = start_n + offs_n
    valid_j = (offs_j >= kv_lo) & (offs_j < kv_hi)
    k = _load_k_t(k_base, k_desc, b, kvh, start_n, stride_kn, offs_j, offs_d, valid_j,
                  MASKED, USE_TMA, BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASKED:
        # -- scores in log2 units, s = (q . k) * sm_scale * log2(e); disallowed pairs -> -inf
        qk = qk * qk_scale
        allowed = valid_j[None, :]
        if CAUSAL:
            allowed = allowed & (offs_j[None, :] <= offs_m_key[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
        # -- running max; a row with nothing allowed yet keeps m = -inf and uses 0 as its shift
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
    else:
        # -- every key allowed: the max is finite; scale and shift fuse into one FMA per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = m_new
        p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    # -- rescale the running denominator and accumulator, add this block (accumulating into acc in the MMA)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_v(v_base, v_desc, b, kvh, start_n, stride_vn, offs_j, offs_d, valid_j,
                MASKED, USE_TMA, BLOCK_N, HEAD_DIM)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_tile_loop(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, stride_kn, stride_vn,
                    offs_m_key, offs_n, offs_d, lo, hi, kv_lo, kv_hi, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
                    WARP_SPEC: tl.constexpr):
    """Online-softmax sweep over key blocks [lo, hi).

    MASKED=False is the fast path for blocks where every (query, key) pair is allowed; MASKED=True applies
    kv_lo <= j < kv_hi and the causal bound j <= offs_m_key, and keeps garbage (NaN/inf) of a static cache or
    of padding out of the sums. WARP_SPEC asks triton for a warp-specialised loop (producer/consumer warps).
    """
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES, warp_specialize=True):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, stride_kn,
                                       stride_vn, offs_m_key, offs_n, offs_d, start_n, kv_lo, kv_hi, qk_scale,
                                       MASKED, CAUSAL, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION)
    else:
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, stride_kn,
                                       stride_vn, offs_m_key, offs_n, offs_d, start_n, kv_lo, kv_hi, qk_scale,
                                       MASKED, CAUSAL, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(Q, K, V, KDesc, VDesc, Out, QOff, KVStart, KVEnd, q_off_int, kv_start_int, kv_end_int, qk_scale,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    HQ, SQ, SKV,
                    GROUP: tl.constexpr,          # Hq // Hkv: query heads sharing one KV head
                    HEAD_DIM: tl.constexpr,       # D, the tile width of q, k, v
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr,
                    HAS_QOFF: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_KV_END: tl.constexpr,
                    LEFT_PAD: tl.constexpr,       # some row may start after key 0 (kv_start given): edge loop
                    USE_TMA: tl.constexpr,        # K/V blocks through Hopper TMA descriptors (KDesc/VDesc)
                    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact), "tf32" otherwise (unused)
                    NUM_STAGES: tl.constexpr,     # pipelining depth of the unmasked key loop
                    MASKED_STAGES: tl.constexpr,  # pipelining depth of the masked edge loops (1-2 blocks each)
                    WARP_SPEC: tl.constexpr,      # warp-specialised unmasked loop (tl.range warp_specialize)
                    HEADS_FAST: tl.constexpr):    # grid (B * Hq, tiles): every head's heaviest tile first
    """One program = BLOCK_M queries of one (batch row, query head): FlashAttention-2 forward.

    For the queries i of the tile, O_i = sum_j softmax_j(q_i . k_j * sm_scale) v_j over allowed keys j, computed
    in one pass with the online softmax (Dao, "FlashAttention-2", 2023, Alg. 1): running max m, running
    denominator l, unnormalised accumulator acc, rescaled by exp2(m_old - m_new) as each key block arrives.
    Scores use exp2 with sm_scale * log2(e) folded into qk_scale. Key blocks are swept in up to three loops:
    a masked block at the left edge (kv_start, only when LEFT_PAD), unmasked full blocks, then masked blocks on
    the causal diagonal / right edge (kv_end). Rows with no allowed key keep l = 0 and store 0.
    """
    # Heavy causal tiles (late queries) first, so the grid's tail is light. HEADS_FAST puts the (row, head)
    # index on grid axis 0, which the hardware walks first: every head's heaviest tile starts before any lighter
    # one (longest-first scheduling), where axis-0 tiles would leave the last heads' heavy tiles for the tail.
    if HEADS_FAST:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        pid_bh = tl.program_id(0)
    else:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)  # 64-bit batch offsets: b * stride_b can pass 2**31 for big caches
    h = pid_bh % HQ
    kvh = h // GROUP

    q_off = _row_bound(QOff, q_off_int, b, HAS_QOFF)
    kv_lo = 0
    if LEFT_PAD:
        kv_lo = tl.maximum(_row_bound(KVStart, kv_start_int, b, HAS_KV_START), 0)
    kv_hi = tl.minimum(_row_bound(KVEnd, kv_end_int, b, HAS_KV_END), SKV)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m_key = q_off + offs_m  # the last key index each query may see (causal)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < SQ, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- key range of this tile: [kv_lo, hi). Blocks in [full_lo, full_hi) are allowed for every query of the
    #    tile and skip the mask; the blocks around them (left padding edge, causal diagonal, kv_end) are masked.
    hi = kv_hi
    full_end = kv_hi
    if CAUSAL:
        hi = tl.minimum(hi, q_off + pid_m * BLOCK_M + BLOCK_M)        # the tile's last query sees keys < hi
        full_end = tl.minimum(full_end, q_off + pid_m * BLOCK_M + 1)  # its first query sees keys < full_end
    full_lo = 0
    if LEFT_PAD:
        full_lo = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
        first = (kv_lo // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_tile_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kvh, stride_kn,
                                        stride_vn, offs_m_key, offs_n, offs_d, first, full_lo, kv_lo, kv_hi, qk_scale,
                                        True, CAUSAL, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION, MASKED_STAGES, False)
    full_hi = tl.maximum((full_end // BLOCK_N) * BLOCK_N, full_lo)
    acc, l_i, m_i = _attn_tile_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kvh, stride_kn, stride_vn,
                                    offs_m_key, offs_n, offs_d, full_lo, full_hi, kv_lo, kv_hi, qk_scale,
                                    False, CAUSAL, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION, NUM_STAGES,
                                    WARP_SPEC)
    acc, l_i, m_i = _attn_tile_loop(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kvh, stride_kn, stride_vn,
                                    offs_m_key, offs_n, offs_d, full_hi, hi, kv_lo, kv_hi, qk_scale,
                                    True, CAUSAL, BLOCK_N, HEAD_DIM, USE_TMA, DOT_PRECISION, MASKED_STAGES, False)

    # -- normalise; fully masked rows (l = 0) have acc = 0 and store exactly 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < SQ)


@dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch parameters (fixed per dtype, head_dim and query length; no autotune: no syncs,
    predictable under graphs). Sweeps: benchmarks/bench_attention.py --prefill-sweep, docs/BENCHMARKS.md."""
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3          # the unmasked key loop
    masked_stages: int = 3       # the masked edge loops (1-2 blocks each)
    use_tma: bool = False        # K/V through TMA descriptors (measured slower with triton 3.6: 331 vs 378 TFLOP/s)
    warp_spec: bool = False      # tl.range(warp_specialize=True) for the unmasked loop (measured no faster)
    heads_fast: bool = False     # grid (B * Hq, tiles) instead of (tiles, B * Hq); see _prefill_kernel


CPU_PREFILL = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=1, masked_stages=1)
GPU_PREFILL_FP32 = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2, masked_stages=1)
# bf16 / fp16: per head_dim (another one takes the 128 entry) the first (most queries, config) with Sq <= most
# queries. D 128 on the H200 (2026-11-28, B=1, GQA 32:8, same-run SDPA, docs/BENCHMARKS.md): at 2048 queries
# 64-query tiles with heads first make 0.98x SDPA (128-query tiles: 0.77x tiles first, 0.92x heads first); at
# 4096 and 8192 128-query tiles with heads first lead (0.90x / 0.86x vs 0.82x tiles first); at 16384 tiles first
# is 2% ahead of heads first (all 8 KV heads' keys in flight at once no longer fit in L2).
GPU_PREFILL: dict[int, tuple[tuple[int, PrefillConfig], ...]] = {
    64: ((2**62, PrefillConfig(num_warps=4)),),
    128: ((2048, PrefillConfig(block_m=64, num_warps=4, heads_fast=True)),
          (8192, PrefillConfig(heads_fast=True)),
          (2**62, PrefillConfig())),
}


def prefill_config(head_dim: int, sq: int, dtype: torch.dtype, on_gpu: bool) -> PrefillConfig:
    if not on_gpu:
        return CPU_PREFILL
    if dtype == torch.float32:
        return GPU_PREFILL_FP32
    return next(cfg for most_sq, cfg in GPU_PREFILL.get(head_dim, GPU_PREFILL[128]) if sq <= most_sq)


def _tma_ok(t: torch.Tensor) -> bool:
    """A Hopper TMA descriptor needs a 16-byte aligned base and 16-byte multiples for every outer stride."""
    if TensorDescriptor is None or not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    return t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def _prefill_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: torch.Tensor | None,
                    kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, q_offset_int: int,
                    kv_start_int: int, kv_end_int: int, causal: bool, sm_scale: float) -> torch.Tensor:
    # q: [B, Hq, Sq, D]  k, v: [B, Hkv, Skv, D]  (checked by prefill_attention)
    batch, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    out = empty_bhsd(batch, hq, sq, d, q)
    if out.numel() == 0:
        return out
    for t in (q, k, v):
        if t.stride(3) != 1:
            raise ValueError("prefill_attention: the head_dim axis of q, k, v must have stride 1")
    cfg = prefill_config(d, sq, q.dtype, q.is_cuda)
    tiles, heads = triton.cdiv(sq, cfg.block_m), batch * hq
    heads_fast = cfg.heads_fast or heads > 65535  # grid axis 1 holds at most 65535
    grid = (heads, tiles) if heads_fast else (tiles, heads)
    dummy = q_offset if q_offset is not None else (kv_start if kv_start is not None else kv_end)
    dummy = dummy if dummy is not None else out  # never read when its HAS_* flag is False
    use_tma = cfg.use_tma and _tma_ok(k) and _tma_ok(v)
    k_desc, v_desc = k, v  # unused placeholders unless use_tma
    if use_tma:
        k_desc = TensorDescriptor.from_tensor(k, [1, 1, cfg.block_n, d])
        v_desc = TensorDescriptor.from_tensor(v, [1, 1, cfg.block_n, d])
    _prefill_kernel[grid](
        q, k, v, k_desc, v_desc, out,
        q_offset if q_offset is not None else dummy,
        kv_start if kv_start is not None else dummy,
        kv_end if kv_end is not None else dummy,
        q_offset_int, kv_start_int, kv_end_int, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, sq, skv,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        HAS_QOFF=q_offset is not None, HAS_KV_START=kv_start is not None, HAS_KV_END=kv_end is not None,
        LEFT_PAD=kv_start is not None or kv_start_int > 0, USE_TMA=use_tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NUM_STAGES=cfg.num_stages, MASKED_STAGES=cfg.masked_stages, WARP_SPEC=cfg.warp_spec,
        HEADS_FAST=heads_fast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


_prefill_op = torch.library.custom_op("flashcore::prefill_attention", mutates_args=())(_prefill_launch)


@_prefill_op.register_fake
def _prefill_fake(q, k, v, q_offset, kv_start, kv_end, q_offset_int, kv_start_int, kv_end_int, causal, sm_scale):
    batch, hq, sq, d = q.shape
    return empty_bhsd(batch, hq, sq, d, q)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, q_offset=None,
                      kv_start=None, kv_end=None, sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, Sq, D] over k, v [B, Hkv, Skv, D]; returns [B, Hq, Sq, D] in q.dtype.

    q_offset / kv_start / kv_end: None, an int, or an integer tensor [B] on q's device (see flashcore.reference).
    """
    check_qkv("prefill_attention", q, k, v)
    batch, _, sq, d = q.shape
    skv = k.shape[2]
    q_off_t, q_off_i = split_row_arg("prefill_attention", "q_offset", q_offset, batch, skv - sq, q.device)
    start_t, start_i = split_row_arg("prefill_attention", "kv_start", kv_start, batch, 0, q.device)
    end_t, end_i = split_row_arg("prefill_attention", "kv_end", kv_end, batch, skv, q.device)
    scale = default_scale(sm_scale, d)
    if not scale > 0:  # the unmasked loop takes the row max before scaling, which needs a positive scale
        raise ValueError(f"prefill_attention: sm_scale must be positive, got {sm_scale!r}")
    launch = _prefill_op if use_custom_op() else _prefill_launch
    return launch(q, k, v, q_off_t, start_t, end_t, q_off_i, start_i, end_i, bool(causal), scale)
