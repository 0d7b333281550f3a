"""Decode attention: one new query token per row against a KV cache, split-K ("flash-decoding"), GQA-aware.

    decode_attention(q, k_cache, v_cache, kv_lens, *, kv_start=None, sm_scale=None, num_splits=None)
    # q: [B, Hq, 1, D]  k_cache, v_cache: [B, Hkv, S_max, D]  kv_lens: int [B]  ->  [B, Hq, 1, D] in q.dtype

Only the first kv_lens[b] slots of row b are valid (the new token's key included); slots from kv_lens[b] on may
hold anything (a static cache) and never reach the result. Keys before kv_start[b] (left padding) are ignored.

One kernel launch per call: the programs of a (row, KV head) each reduce a split of the cache, and the last of them
to finish (an atomic ticket) merges the splits' partial results and puts the ticket back to 0 for the next launch.
The grid depends on shapes only and nothing is read back to the host: the op is CUDA-graph capturable, and a
captured graph stays correct when kv_lens changes between replays.

Host cost: everything that follows from the shapes, strides, dtypes and options of a call (checks, split count,
launch grid, the kernel's constant arguments, its compiled binary) is computed once and kept in a plan; a repeat
call builds one key, allocates the output and launches the compiled kernel directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from flashcore.ops._common import (LOG2E, CompiledLaunch, check_qkv, current_stream, default_scale, empty_bhsd,
                                   is_capturing, kept_buffer, split_row_arg, use_custom_op)


@triton.jit
def _merge_partials(Part, Out, lse_offset, b, kvh, HKV, NUM_SPLITS, stride_ob, stride_oh,
                    GROUP: tl.constexpr, MERGE_H: tl.constexpr, MERGE_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the NUM_SPLITS partials of the GROUP query heads of one (row, KV head) by log-sum-exp:
    out = sum_s w_s o_s / sum_s w_s, w_s = exp2(lse_s - max_s lse_s), MERGE_S splits at a time (an online max).
    A head whose splits are all empty (no valid key) outputs exactly 0. Partials are read from L2 (.cg): other
    programs wrote them."""
    offs_g = tl.arange(0, MERGE_H)
    offs_s = tl.arange(0, MERGE_S)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    first_row = (b * HKV * GROUP + heads) * NUM_SPLITS  # PartLse rows [B, Hq, NUM_SPLITS]
    m_i = tl.full([MERGE_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([MERGE_H], dtype=tl.float32)
    acc = tl.zeros([MERGE_H, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, MERGE_S):
        splits = s0 + offs_s
        ok = (offs_g[:, None] < GROUP) & (splits[None, :] < NUM_SPLITS)
        rows = first_row[:, None] + splits[None, :]
        lse = tl.load(Part + lse_offset + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(Part + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m_i, tl.max(lse, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse - m_shift[:, None])  # 0 for empty splits
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_g < GROUP)[:, None])


@triton.jit
def _decode_kernel(Q, K, V, KVLens, KVStart, Part, Tickets, Out,
                   kv_start_int, qk_scale, lse_offset,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh, HKV, S_MAX, CHUNK, NUM_SPLITS,
                   GROUP: tl.constexpr,        # Hq // Hkv: query heads served by one KV head
                   BLOCK_H: tl.constexpr,      # GROUP padded to a power of two >= 16 (the tl.dot M dimension)
                   MERGE_H: tl.constexpr,      # GROUP padded to a power of two (the merge's head axis)
                   MERGE_S: tl.constexpr,      # splits merged per step
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   USE_PDL: tl.constexpr):   # launched with programmatic dependent launch (GPU only)
    """One program = one (batch row, KV head, split of the cache): the flash-decoding partial pass, then, in the
    last program of the (row, KV head) to finish, the merge.

    All GROUP query heads of the KV head form the rows of one tile, so each K/V block is read once per group
    (GQA-aware). Over its keys j in [split * CHUNK, (split + 1) * CHUNK) within [kv_start, kv_len) the program
    runs the FlashAttention online softmax (running max m, denominator l, accumulator acc; exp2 with
    sm_scale * log2(e) folded in). With one split it writes the output; otherwise the normalised partial
    acc / l and its log-sum-exp lse = m + log2(l) (log2 units; -inf for an empty split), then takes a ticket:
    the program that draws NUM_SPLITS - 1 sees every other partial written (acq_rel atomic after a barrier) and
    merges them (_merge_partials), then resets the ticket to 0 for the next launch or graph replay.
    Dao et al., "Flash-Decoding for long-context inference", 2023; FlashAttention-2 (Dao, 2023); the last-block
    reduction is CUDA's threadFenceReduction pattern.
    With USE_PDL the launch may begin while the previous kernel on the stream still runs (its launch latency
    hidden); griddepcontrol.wait, before any memory access, then waits for that kernel to finish and flush.
    """
    if USE_PDL:
        gdc_wait()
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
    head_ok = offs_h < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None], other=0.0)
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

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if NUM_SPLITS == 1:  # the whole cache in one program: its result is the output (0 when it saw no key)
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=head_ok[:, None])
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        rows = (b * HKV * GROUP + heads) * NUM_SPLITS + split  # PartLse: [B, Hq, NUM_SPLITS]
        tl.store(Part + lse_offset + rows, lse, mask=head_ok)
        tl.store(Part + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=head_ok[:, None])
        tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
        ticket = tl.atomic_add(Tickets + pid_bk, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_SPLITS - 1:
            _merge_partials(Part, Out, lse_offset, b, kvh, HKV, NUM_SPLITS, stride_ob, stride_oh,
                            GROUP, MERGE_H, MERGE_S, HEAD_DIM)
            tl.store(Tickets + pid_bk, 0)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class DecodeConfig:
    """Key block, warps and pipeline depth of the kernel, and how the cache is split."""
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    min_chunk: int = 256   # no split shorter than this many keys (each split costs a partial write and a merge)
    waves: int = 2         # splits aim for this many programs per multiprocessor
    max_splits: int = 64   # the last program of a (row, KV head) merges them all
    pdl: bool = False      # programmatic dependent launch (overlaps the launch with the previous kernel's tail)


CPU_CONFIG = DecodeConfig(block_n=32, num_warps=4, num_stages=1, min_chunk=64, waves=2)
# (most group, most rows, most keys, config): the first entry with group = Hq // Hkv <= most group, rows =
# batch * KV heads <= most rows and cache slots <= most keys wins. The group is the kernel's M dimension and sets
# how much each program merges, so MHA (group 1), groups up to 4 (LLaMA's 32:8) and larger ones (8:1) have
# tables of their own. Picked by `benchmarks/bench_attention.py --tune` (2026-11-28, H200; docs/BENCHMARKS.md):
# per cell the fastest of eleven candidates in a 32-layer CUDA graph at 32:32, 32:8 and 64:8 heads, the default
# unless one is >= 3% faster.
GPU_TABLE: tuple[tuple[int, int, int, DecodeConfig], ...] = (
    (1, 16, 4096, DecodeConfig()),
    (1, 16, 16384, DecodeConfig()),
    (1, 16, 65536, DecodeConfig()),
    (1, 16, 2**62, DecodeConfig()),
    (1, 128, 4096, DecodeConfig()),
    (1, 128, 16384, DecodeConfig(num_stages=2, min_chunk=128, waves=4)),
    (1, 128, 65536, DecodeConfig(min_chunk=512, waves=1)),
    (1, 128, 2**62, DecodeConfig(min_chunk=512, waves=1)),
    (1, 256, 4096, DecodeConfig(min_chunk=512, waves=1)),
    (1, 256, 16384, DecodeConfig(min_chunk=512, waves=1)),
    (1, 256, 65536, DecodeConfig(num_stages=2, pdl=True)),
    (1, 256, 2**62, DecodeConfig(min_chunk=512, waves=1)),
    (1, 2**62, 4096, DecodeConfig(num_stages=2, pdl=True)),
    (1, 2**62, 16384, DecodeConfig(num_stages=2)),
    (1, 2**62, 65536, DecodeConfig(num_stages=2)),
    (1, 2**62, 2**62, DecodeConfig(num_stages=2)),
    (4, 16, 4096, DecodeConfig(min_chunk=128, waves=4)),
    (4, 16, 16384, DecodeConfig()),
    (4, 16, 65536, DecodeConfig()),
    (4, 16, 2**62, DecodeConfig()),
    (4, 128, 4096, DecodeConfig()),
    (4, 128, 16384, DecodeConfig(min_chunk=512, waves=1)),
    (4, 128, 65536, DecodeConfig(min_chunk=512, waves=1)),
    (4, 128, 2**62, DecodeConfig(min_chunk=512, waves=1)),
    (4, 256, 4096, DecodeConfig(min_chunk=512, waves=1)),
    (4, 256, 16384, DecodeConfig(min_chunk=512, waves=1)),
    (4, 256, 65536, DecodeConfig(num_warps=8, min_chunk=512, waves=1)),
    (4, 256, 2**62, DecodeConfig(num_stages=2, pdl=True)),
    (4, 2**62, 4096, DecodeConfig(num_stages=2, pdl=True)),
    (4, 2**62, 16384, DecodeConfig(num_stages=2, min_chunk=512, waves=1)),
    (4, 2**62, 65536, DecodeConfig(num_stages=2, min_chunk=512, waves=1)),
    (4, 2**62, 2**62, DecodeConfig(num_stages=2, pdl=True)),
    (2**62, 16, 4096, DecodeConfig()),
    (2**62, 16, 16384, DecodeConfig(num_warps=8, min_chunk=512, waves=1)),
    (2**62, 16, 65536, DecodeConfig(num_warps=8)),
    (2**62, 16, 2**62, DecodeConfig()),
    (2**62, 128, 4096, DecodeConfig()),
    (2**62, 128, 16384, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 128, 65536, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 128, 2**62, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 256, 4096, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 256, 16384, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 256, 65536, DecodeConfig(num_warps=8, min_chunk=512, waves=1)),
    (2**62, 256, 2**62, DecodeConfig(min_chunk=512, waves=1)),
    (2**62, 2**62, 4096, DecodeConfig(num_stages=2, pdl=True)),
    (2**62, 2**62, 16384, DecodeConfig(num_stages=2, pdl=True)),
    (2**62, 2**62, 65536, DecodeConfig(num_stages=2, pdl=True)),
    (2**62, 2**62, 2**62, DecodeConfig(num_stages=2)),
)


def decode_config(group: int, rows: int, s_max: int, on_gpu: bool) -> DecodeConfig:
    if not on_gpu:
        return CPU_CONFIG
    for most_group, most_rows, most_keys, cfg in GPU_TABLE:
        if group <= most_group and rows <= most_rows and s_max <= most_keys:
            return cfg
    return DecodeConfig()


def choose_num_splits(rows: int, s_max: int, sm_count: int, cfg: DecodeConfig) -> int:
    """Splits of the cache per (row, KV head): enough programs for cfg.waves per multiprocessor (more waves shrink
    the idle tail of the last one), but no split shorter than cfg.min_chunk keys and at most cfg.max_splits."""
    want = triton.cdiv(cfg.waves * sm_count, rows)
    most = max(1, triton.cdiv(s_max, max(cfg.min_chunk, cfg.block_n)))
    return max(1, min(want, most, cfg.max_splits))


def _split_chunk(s_max: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """Chunk length (a multiple of block_n) and the number of non-empty splits it gives."""
    chunk = triton.cdiv(triton.cdiv(s_max, num_splits), block_n) * block_n
    return chunk, max(1, triton.cdiv(s_max, chunk))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: a host query, no device sync); 8 on CPU (interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ---------------------------------------------------------------------------------------------------------------
# Workspace: the partials and the tickets


_ARENA_TICKETS = 1 << 18
_ARENAS: dict[int, list] = {}  # device index -> [zeroed int32 tickets, next free offset]
_FULL_ARENAS: list[torch.Tensor] = []  # kept for good: captured graphs point into them


def _reserve_arena(device: torch.device) -> None:
    """Make sure the device has free captured-call tickets; called outside capture (allocation and memset)."""
    arena = _ARENAS.get(device.index)
    if arena is None or arena[1] > _ARENA_TICKETS // 2:
        if arena is not None:
            _FULL_ARENAS.append(arena[0])
        _ARENAS[device.index] = [kept_buffer(lambda: torch.zeros(_ARENA_TICKETS, dtype=torch.int32, device=device)), 0]


def _captured_tickets(device: torch.device, count: int) -> torch.Tensor:
    """Tickets for a call being captured into a CUDA graph: a slice of the device's zeroed arena that this call
    owns for good (the kernel leaves it at 0 after every replay, and no other graph or stream uses it). Without a
    free slice: fresh zeros from the graph's pool, i.e. a memset node that runs before the kernel at each replay."""
    arena = _ARENAS.get(device.index)
    if arena is None or arena[1] + count > _ARENA_TICKETS:
        return torch.zeros(count, dtype=torch.int32, device=device)
    start = arena[1]
    arena[1] += count
    return arena[0][start:start + count]


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16  # slices of the arena stay 64-byte aligned


class _DecodePlan:
    """Everything about a decode call that follows from its shapes, strides, dtypes and options: the split
    count, the launch grid, the kernel's constant arguments, its compiled launches (one per pointer alignment
    class, what triton specialises on) and, per CUDA stream, an eager workspace (partials + zeroed tickets)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_kv_start: bool, kv_start_int: int,
                 sm_scale: float, num_splits: int):
        batch, hq, _, d = q.shape
        hkv, s_max = k.shape[1], k.shape[2]
        for t in (q, k, v):
            if t.stride(3) != 1:
                raise ValueError("decode_attention: the head_dim axis of q and the caches must have stride 1")
        self.device, self.dtype, self.on_gpu = q.device, q.dtype, q.is_cuda
        self.out_shape, self.out_stride = (batch, hq, 1, d), (hq * d, d, hq * d, 1)  # [B, 1, Hq, D] memory
        self.empty = batch * hq * d == 0
        rows, group = batch * hkv, hq // hkv
        self.cfg = decode_config(group, rows, s_max, self.on_gpu)
        if num_splits <= 0:
            num_splits = choose_num_splits(rows, s_max, _sm_count(q.device), self.cfg)
        chunk, self.num_splits = _split_chunk(s_max, num_splits, self.cfg.block_n)
        part_rows = batch * hq * self.num_splits
        self.n_part = part_rows * (d + 1) if self.num_splits > 1 else 1
        self.n_tickets = _round16(rows) if self.num_splits > 1 else 16
        merge_h = triton.next_power_of_2(group)
        self.grid = (rows, self.num_splits)
        self.consts = (
            kv_start_int, sm_scale * LOG2E, part_rows * d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            hq * d, d, hkv, s_max, chunk, self.num_splits,
            group, max(16, triton.next_power_of_2(group)), merge_h,
            max(1, min(triton.next_power_of_2(self.num_splits), 64 // merge_h)),
            d, self.cfg.block_n, has_kv_start, "ieee" if q.dtype == torch.float32 else "tf32", self.cfg.pdl,
        )
        self.options = dict(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
        if self.cfg.pdl:
            self.options["launch_pdl"] = True
        self.launches: dict[tuple, CompiledLaunch] = {}
        self.eager: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def workspace(self, stream: int, capturing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(partials fp32, tickets int32). Eager calls on one stream run in order, so they share one workspace;
        a call captured into a CUDA graph gets partials from the graph's pool and tickets of its own."""
        if capturing:
            part = torch.empty(self.n_part, dtype=torch.float32, device=self.device)
            return part, _captured_tickets(self.device, self.n_tickets)
        ws = self.eager.get(stream)
        if ws is None:
            part = lambda: torch.empty(self.n_part, dtype=torch.float32, device=self.device)  # noqa: E731
            tickets = lambda: torch.zeros(self.n_tickets, dtype=torch.int32, device=self.device)  # noqa: E731
            if self.on_gpu:  # kept across calls: out of any CUDA graph pool (torch.compile's warm-up)
                ws = (kept_buffer(part, stream), kept_buffer(tickets, stream))
                _reserve_arena(self.device)
            else:
                ws = (part(), tickets())
            self.eager[stream] = ws
        return ws

    def __call__(self, q, k, v, kv_lens: torch.Tensor, kv_start: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty_strided(self.out_shape, self.out_stride, dtype=self.dtype, device=self.device)
        if self.empty:
            return out
        if kv_start is None:
            kv_start = kv_lens  # never read (HAS_KV_START is off): any valid pointer
        if not self.on_gpu:
            self._compile(q, k, v, kv_lens, kv_start, self.workspace(0, False), out)
            return out
        stream = current_stream(self.device.index)
        part, tickets = self.workspace(stream, is_capturing())
        ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), kv_lens.data_ptr(), kv_start.data_ptr())
        align = tuple(p % 16 == 0 for p in ptrs)  # what triton specialises a pointer on
        launch = self.launches.get(align)
        if launch is None:
            compiled = self._compile(q, k, v, kv_lens, kv_start, (part, tickets), out)
            if hasattr(compiled, "packed_metadata"):
                self.launches[align] = CompiledLaunch(compiled, self.grid)
            return out
        launch(stream, ptrs + (part.data_ptr(), tickets.data_ptr(), out.data_ptr()) + self.consts)
        return out

    def _compile(self, q, k, v, kv_lens, kv_start, workspace, out):
        """A launch through triton's JIT (compiles on first use; the CPU interpreter always goes this way)."""
        return _decode_kernel[self.grid](q, k, v, kv_lens, kv_start, *workspace, out, *self.consts, **self.options)


_PLANS: dict[tuple, _DecodePlan] = {}
_MAX_PLANS = 1024


def _plan(key: tuple | None, build) -> _DecodePlan:
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = build()
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _row_key(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype, value.get_device())
    return (type(value), value)


def _call_key(q, k, v, kv_lens, kv_start, sm_scale, num_splits) -> tuple:
    """What a plan depends on (and what decode_attention's checks look at), read off the arguments cheaply."""
    return (q.shape, q.stride(), q.dtype, q.get_device(), k.shape, k.stride(), k.dtype, k.get_device(),
            v.shape, v.stride(), v.dtype, v.get_device(), _row_key(kv_lens), _row_key(kv_start), sm_scale, num_splits)


def _decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor,
                   kv_start: torch.Tensor | None, kv_start_int: int, sm_scale: float, num_splits: int) -> torch.Tensor:
    # q: [B, Hq, 1, D]  k_cache, v_cache: [B, Hkv, S_max, D]  kv_lens: [B] contiguous  (checked by decode_attention)
    key = ("op",) + _call_key(q, k_cache, v_cache, kv_lens, kv_start if kv_start is not None else kv_start_int,
                              sm_scale, num_splits)
    plan = _plan(key, lambda: _DecodePlan(q, k_cache, v_cache, kv_start is not None, kv_start_int, sm_scale,
                                          num_splits))
    return plan(q, k_cache, v_cache, kv_lens, kv_start)


_decode_op = torch.library.custom_op("flashcore::decode_attention", mutates_args=())(_decode_launch)


@_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, kv_lens, kv_start, kv_start_int, sm_scale, num_splits):
    batch, hq, _, d = q.shape
    return empty_bhsd(batch, hq, 1, d, q)


def _row_tensor(what: str, value, batch: int, default: int, device) -> tuple[torch.Tensor | None, int]:
    tensor, fallback = split_row_arg("decode_attention", what, value, batch, default, device)
    if tensor is not None and tensor.stride(0) != 1:
        tensor = tensor.contiguous()  # the kernel reads row b at offset b
    return tensor, fallback


def _checked(q, k_cache, v_cache, kv_lens, kv_start, num_splits) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """decode_attention's argument checks (ValueError); returns (kv_lens [B], kv_start [B] or None, kv_start int)."""
    check_qkv("decode_attention", q, k_cache, v_cache)
    batch = q.shape[0]
    if q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must hold one token per row [B, Hq, 1, D], got {tuple(q.shape)}")
    if not isinstance(kv_lens, torch.Tensor):
        raise ValueError(f"decode_attention: kv_lens must be an integer tensor [B] on q's device, got {type(kv_lens)}")
    lens_t, _ = _row_tensor("kv_lens", kv_lens, batch, 0, q.device)
    start_t, start_i = _row_tensor("kv_start", kv_start, batch, 0, q.device)
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"decode_attention: num_splits must be a positive int or None, got {num_splits!r}")
    return lens_t, start_t, start_i


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                     kv_start=None, sm_scale: float | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One query token per row, q [B, Hq, 1, D], against caches [B, Hkv, S_max, D] whose first kv_lens[b]
    slots are valid; returns [B, Hq, 1, D] in q.dtype. num_splits=None picks a split count from the shapes."""
    if use_custom_op():  # torch.compile tracing, fake tensors: through the registered op
        lens_t, start_t, start_i = _checked(q, k_cache, v_cache, kv_lens, kv_start, num_splits)
        return _decode_op(q, k_cache, v_cache, lens_t, start_t, start_i, default_scale(sm_scale, q.shape[3]),
                          num_splits or 0)
    try:
        key = _call_key(q, k_cache, v_cache, kv_lens, kv_start, sm_scale, num_splits)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, unhashable options: the checks say what is wrong
        key, plan = None, None
    if plan is not None:  # the same shapes, strides, dtypes, devices and options passed the checks before
        return plan(q, k_cache, v_cache, kv_lens, kv_start if isinstance(kv_start, torch.Tensor) else None)
    lens_t, start_t, start_i = _checked(q, k_cache, v_cache, kv_lens, kv_start, num_splits)
    if key is not None and (not kv_lens.is_contiguous() or (start_t is not None and not kv_start.is_contiguous())):
        key = ("copied rows",) + key  # the plan is kept, under a key the fast path above never finds: such calls
        #                               are checked (their row tensors copied) every time, then reuse the plan
    plan = _plan(key, lambda: _DecodePlan(q, k_cache, v_cache, start_t is not None, start_i,
                                          default_scale(sm_scale, q.shape[3]), num_splits or 0))
    return plan(q, k_cache, v_cache, lens_t, start_t)
