"""decode_attention against the fp32 reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from _attn_helpers import assert_close_to_reference, qkv, randn, sdpa_same_dtype
from flashcore.ops import decode_attention
from flashcore.ops import decode as decode_mod
from flashcore.ops.decode import DecodeConfig, choose_num_splits
from flashcore.reference import decode_reference

DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _check(q, k_cache, v_cache, kv_lens, *, kv_start=None, clean=None, **kwargs):
    """clean: (k, v) without the poison, for the reference and SDPA."""
    k_ref, v_ref = clean if clean is not None else (k_cache, v_cache)
    out = decode_attention(q, k_cache, v_cache, kv_lens, kv_start=kv_start, **kwargs)
    ref = decode_reference(q, k_ref, v_ref, kv_lens, kv_start=kv_start)
    sdpa = None
    if q.dtype != torch.float32:
        sdpa = sdpa_same_dtype(q, k_ref, v_ref, causal=False, kv_start=kv_start, kv_end=kv_lens)
    assert_close_to_reference(out, ref, sdpa)
    return out


def _poison_after(k, v, kv_lens):
    """A static cache: slots from kv_lens[b] on hold garbage (huge keys, NaN values)."""
    kp, vp = k.clone(), v.clone()
    for b, n in enumerate(kv_lens.tolist()):
        kp[b, :, n:] = 6e4 if k.dtype == torch.float16 else 1e30
        vp[b, :, n:] = float("nan")
    return kp, vp


# (batch, Hq, Hkv, S_max, D, kv_lens): odd lengths, MHA / GQA 4:1 / 2:1 / MQA, both head dims.
CASES = [
    (1, 4, 4, 7, 64, [7]),
    (2, 4, 1, 113, 64, [1, 113]),
    (2, 8, 2, 257, 64, [257, 113]),
    (1, 4, 2, 257, 128, [200]),
    (3, 4, 1, 64, 128, [1, 7, 64]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-S{}-D{}".format(*c[:5]))
def test_static_cache_matches_reference(case, dtype, device):
    batch, hq, hkv, s_max, d, lens = case
    q, k, v = qkv(batch, hq, hkv, 1, s_max, d, dtype=dtype, device=device, seed=s_max + d)
    kv_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    kp, vp = _poison_after(k, v, kv_lens)
    out = _check(q, kp, vp, kv_lens, clean=(k, v))
    assert out.dtype == dtype and out.shape == (batch, hq, 1, d)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_split_count_does_not_change_the_result(num_splits, device):
    q, k, v = qkv(2, 8, 2, 1, 257, 64, dtype=torch.float32, device=device, seed=7)
    kv_lens = torch.tensor([257, 30], device=device)
    _check(q, k, v, kv_lens, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_left_padding_and_empty_rows(dtype, device):
    # Row 0: left padding [0, 9) poisoned with NaN; row 1: kv_lens 0 -> exactly 0; row 2: kv_start == kv_lens -> 0.
    q, k, v = qkv(3, 4, 2, 1, 113, 64, dtype=dtype, device=device, seed=13)
    kv_lens = torch.tensor([100, 0, 50], device=device)
    kv_start = torch.tensor([9, 0, 50], device=device)
    kp, vp = _poison_after(k, v, kv_lens)
    kp[0, :, :9] = float("nan")
    vp[0, :, :9] = float("nan")
    out = _check(q, kp, vp, kv_lens, kv_start=kv_start, clean=(k, v))
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    assert out[0].abs().amax() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype, device):
    # q as a [B, 1, Hq, D] projection seen as [B, Hq, 1, D]; caches are head-sliced views of a larger buffer.
    q = randn(2, 1, 8, 64, dtype=dtype, device=device, seed=17).transpose(1, 2)
    k_buf = randn(2, 6, 99, 64, dtype=dtype, device=device, seed=18)
    v_buf = randn(2, 6, 99, 64, dtype=dtype, device=device, seed=19)
    k, v = k_buf[:, 1:3], v_buf[:, 3:5]
    assert not k.is_contiguous()
    _check(q, k, v, torch.tensor([99, 41], device=device))


def test_repeated_calls_follow_new_tensors_and_alignment(device):
    # The same shapes again (on CUDA: the cached plan's direct launch) with new data, new lengths, and caches whose
    # base is 16-byte aligned, then not (a different kernel specialisation): every call equals the reference.
    batch, hq, hkv, s_max, d = 2, 8, 2, 96, 64
    numel = batch * hkv * s_max * d
    for step, (offset, lens) in enumerate([(0, [96, 5]), (0, [1, 80]), (4, [96, 5]), (1, [33, 96]), (0, [7, 7])]):
        q, _, _ = qkv(batch, hq, hkv, 1, 1, d, dtype=torch.float32, device=device, seed=50 + step)
        flat_k = randn(numel + offset, dtype=torch.float32, device=device, seed=60 + step)
        flat_v = randn(numel + offset, dtype=torch.float32, device=device, seed=70 + step)
        k = flat_k[offset:].view(batch, hkv, s_max, d)
        v = flat_v[offset:].view(batch, hkv, s_max, d)
        assert (k.data_ptr() % 16 == 0) == (offset % 4 == 0)
        _check(q, k, v, torch.tensor(lens, device=device, dtype=torch.int32))


def test_plan_is_reused_and_bad_inputs_still_fail(device):
    # A repeat call takes the cached plan (no checks run); anything the checks look at makes a different key.
    q, k, v = qkv(2, 8, 2, 1, 96, 64, dtype=torch.float32, device=device, seed=41)
    kv_lens = torch.tensor([96, 5], device=device, dtype=torch.int32)
    decode_mod._PLANS.clear()
    for _ in range(3):
        _check(q, k, v, kv_lens)
    assert len(decode_mod._PLANS) == 1
    with pytest.raises(ValueError, match="integer tensor"):
        decode_attention(q, k, v, 96)
    with pytest.raises(ValueError, match="one entry per batch row"):
        decode_attention(q, k, v, kv_lens[:1])
    with pytest.raises(ValueError, match="share a dtype"):
        decode_attention(q, k.half(), v, kv_lens)
    _check(q, k, v, kv_lens.long())  # another dtype of kv_lens: a second plan
    assert len(decode_mod._PLANS) == 2


def test_strided_row_tensors_are_copied_every_call_but_keep_their_plan(device):
    # kv_lens / kv_start as strided views: the kernel reads row b at offset b, so each call copies them (the fast
    # path never takes such a call), and the plan built for them is reused, not rebuilt per call.
    q, k, v = qkv(2, 8, 2, 1, 96, 64, dtype=torch.float32, device=device, seed=44)
    lens = torch.tensor([[96, 0], [5, 0]], device=device, dtype=torch.int32)[:, 0]
    start = torch.tensor([[3, 0], [1, 0]], device=device, dtype=torch.int32)[:, 0]
    assert not lens.is_contiguous() and not start.is_contiguous()
    decode_mod._PLANS.clear()
    want = decode_attention(q, k, v, lens.contiguous(), kv_start=start.contiguous())
    plans = dict(decode_mod._PLANS)
    for _ in range(3):
        assert torch.equal(decode_attention(q, k, v, lens, kv_start=start), want)
    assert len(decode_mod._PLANS) == 2                       # the contiguous call's plan + one for the strided rows
    (strided,) = [p for key, p in decode_mod._PLANS.items() if key not in plans]
    decode_attention(q, k, v, lens, kv_start=start)
    assert strided in decode_mod._PLANS.values() and len(decode_mod._PLANS) == 2


def test_tickets_are_back_to_zero_after_each_call(device):
    # The last program of each (row, KV head) puts its ticket back: the next launch (or graph replay) starts at 0.
    q, k, v = qkv(3, 8, 2, 1, 300, 64, dtype=torch.float16, device=device, seed=43)
    kv_lens = torch.tensor([300, 1, 170], device=device, dtype=torch.int32)
    decode_mod._PLANS.clear()
    first = decode_attention(q, k, v, kv_lens, num_splits=5)
    for _ in range(2):  # the merge order is fixed (split 0 first), whichever program merges: same bits
        assert torch.equal(decode_attention(q, k, v, kv_lens, num_splits=5), first)
    (plan,) = decode_mod._PLANS.values()
    assert plan.num_splits == 5 and plan.eager
    assert all(int(tickets.count_nonzero()) == 0 for _, tickets in plan.eager.values())


@pytest.mark.parametrize("hq, hkv, s_max, num_splits", [(8, 1, 1100, 17), (2, 2, 4200, 70), (8, 2, 1400, 40)],
                         ids=["group8", "mha", "group4"])
def test_merge_over_many_splits(hq, hkv, s_max, num_splits, device):
    # More splits than one merge step takes (64 // group padded; 9-66 splits here, on CPU and GPU block sizes): the
    # merge's online max runs over several steps; a short row leaves most of its splits empty.
    q, k, v = qkv(2, hq, hkv, 1, s_max, 64, dtype=torch.float32, device=device, seed=s_max)
    kv_lens = torch.tensor([s_max, 40], device=device)
    _check(q, k, v, kv_lens, num_splits=num_splits)


def test_sm_scale_and_int_kv_start(device):
    q, k, v = qkv(1, 4, 1, 1, 57, 64, dtype=torch.float32, device=device, seed=23)
    kv_lens = torch.tensor([50], device=device)
    out = decode_attention(q, k, v, kv_lens, kv_start=5, sm_scale=0.2)
    assert_close_to_reference(out, decode_reference(q, k, v, kv_lens, kv_start=5, sm_scale=0.2), None)


def test_bad_inputs_raise_value_error():
    q = torch.zeros(1, 4, 2, 64)
    k = torch.zeros(1, 2, 16, 64)
    with pytest.raises(ValueError, match="one token per row"):
        decode_attention(q, k, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="integer tensor"):
        decode_attention(q[:, :, :1], k, k, 3)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q[:, :, :1], k, k, torch.tensor([3]), num_splits=0)


def test_choose_num_splits_fills_the_gpu():
    # 132 SMs: enough splits for ~2 waves, but no split under 256 keys and at most 64 splits.
    cfg = DecodeConfig(block_n=64, min_chunk=256, waves=2, max_splits=64)
    assert choose_num_splits(8, 32768, 132, cfg) == 33        # B=1, 8 KV heads
    assert choose_num_splits(8, 2048, 132, cfg) == 8
    assert choose_num_splits(64, 8192, 132, cfg) == 5         # B=8
    assert choose_num_splits(512, 512, 132, cfg) == 1         # B=64
    assert choose_num_splits(1, 131072, 132, cfg) == 64       # capped


def test_launch_table_covers_every_shape():
    # The first matching entry wins and the last one matches everything; cells grow along all three axes.
    table = decode_mod.GPU_TABLE
    assert table[-1][:3] == (2**62, 2**62, 2**62)
    for group in (1, 4, 5, 8, 32):
        for rows in (1, 8, 16, 17, 64, 129, 256, 257, 4096):
            for keys in (1, 512, 4096, 4097, 16384, 16385, 65537, 131072):
                cfg = decode_mod.decode_config(group, rows, keys, on_gpu=True)
                first = next(c for g, r, k, c in table if group <= g and rows <= r and keys <= k)
                assert cfg is first and cfg.block_n % 16 == 0 and cfg.min_chunk >= cfg.block_n
    # LLaMA's 32:8 and an 8:1 model at B=1 @8192 take different entries (measured: docs/BENCHMARKS.md)
    assert decode_mod.decode_config(4, 8, 8192, on_gpu=True) != decode_mod.decode_config(8, 8, 8192, on_gpu=True)
    assert decode_mod.decode_config(4, 8, 2048, on_gpu=False) is decode_mod.CPU_CONFIG


def test_torch_compile_fullgraph(device):
    q, k, v = qkv(2, 4, 2, 1, 64, 64, dtype=torch.float32, device=device, seed=29)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(q, k, v, kv_lens):
        return decode_attention(q * 1.0, k, v, kv_lens).sum(dim=1)

    kv_lens = torch.tensor([64, 10], device=device)
    out = step(q, k, v, kv_lens)
    ref = decode_reference(q, k, v, kv_lens).sum(dim=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, s_max", [(1, 2048), (8, 8192), (1, 32768)])
def test_llama_shape_bf16(batch, s_max, device):
    q, k, v = qkv(batch, 32, 8, 1, s_max, 128, dtype=torch.bfloat16, device=device, seed=batch)
    lens = [s_max - 17 * i for i in range(batch)]
    kv_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    kp, vp = _poison_after(k, v, kv_lens)
    _check(q, kp, vp, kv_lens, clean=(k, v))


def _capture(calls) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    return graph, outs


def _check_layers(layers, outs, kv_lens):
    for (q, k, v), out in zip(layers, outs):
        ref = decode_reference(q, k, v, kv_lens)
        assert_close_to_reference(out, ref, sdpa_same_dtype(q, k, v, causal=False, kv_end=kv_lens))


@pytest.mark.gpu
@pytest.mark.parametrize("arena, cfg", [(True, DecodeConfig()), (False, DecodeConfig()),
                                        (True, DecodeConfig(pdl=True, num_stages=2))],
                         ids=["ticket-arena", "memset-node", "pdl"])
def test_cuda_graph_replay_follows_kv_lens(arena, cfg, device, monkeypatch):
    # One graph holding 8 layers (separate caches, one kv_lens, as a model step), captured once; kv_lens and q
    # change in place between replays, eager calls on the same shapes run in between, and a second graph over
    # the same caches is replayed alternately: every output equals the reference each time (the tickets of each
    # captured call are its own and back at 0 after each replay). arena=False: the captured calls find no free
    # arena tickets and take zeros from the graph pool (a memset node per call). pdl: launched with programmatic
    # dependent launch (each kernel waits for the previous one before touching memory).
    monkeypatch.setattr(decode_mod, "GPU_TABLE", ((2**62, 2**62, 2**62, cfg),))
    monkeypatch.setattr(decode_mod, "_PLANS", {})  # plans of this configuration only, dropped after the test
    batch, hq, hkv, s_max, d = 2, 32, 8, 4096, 128
    layers = [qkv(batch, hq, hkv, 1, s_max, d, dtype=torch.bfloat16, device=device, seed=37 + 3 * i)
              for i in range(8)]
    kv_lens = torch.tensor([1000, 20], device=device, dtype=torch.int32)
    for q, k, v in layers:
        decode_attention(q, k, v, kv_lens)  # compile outside the capture
    torch.cuda.synchronize()
    if not arena:  # retire the arenas (kept alive, as for any graph that may point into them)
        decode_mod._FULL_ARENAS.extend(a[0] for a in decode_mod._ARENAS.values())
        decode_mod._ARENAS.clear()
    graph, outs = _capture([lambda t=t: decode_attention(*t, kv_lens) for t in layers])
    graph2, outs2 = _capture([lambda t=t: decode_attention(*t, kv_lens) for t in layers[::-1]])
    for step, lens in enumerate([[1000, 20], [1001, 21], [4096, 1], [7, 3000], [0, 4096], [64, 65]]):
        kv_lens.copy_(torch.tensor(lens, device=device))
        for q, _, _ in layers:
            q.copy_(randn(batch, hq, 1, d, dtype=q.dtype, device=device, seed=100 + step))
        graph.replay()
        eager = [decode_attention(*t, kv_lens) for t in layers[:2]]
        graph2.replay()
        _check_layers(layers, outs, kv_lens)
        _check_layers(layers[::-1], outs2, kv_lens)
        _check_layers(layers[:2], eager, kv_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, hq, hkv, s_max", [(4, 64, 8, 8192), (2, 32, 32, 2048), (64, 32, 8, 512)],
                         ids=["gqa8to1", "mha", "batch64"])
def test_sweep_head_layouts_bf16(batch, hq, hkv, s_max, device):
    q, k, v = qkv(batch, hq, hkv, 1, s_max, 128, dtype=torch.bfloat16, device=device, seed=hq + hkv)
    kv_lens = torch.randint(1, s_max + 1, (batch,), generator=torch.Generator().manual_seed(5)).to(device)
    kp, vp = _poison_after(k, v, kv_lens)
    _check(q, kp, vp, kv_lens, clean=(k, v))


def test_registered_op_and_fake_tensor(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(2, 4, 2, 1, 40, 64, dtype=torch.float32, device=device, seed=47)
    kv_lens = torch.tensor([40, 9], device=device)
    eager = decode_attention(q, k, v, kv_lens)
    via_op = torch.ops.flashcore.decode_attention(q, k, v, kv_lens, None, 0, 0.125, 0)
    torch.testing.assert_close(via_op, eager, rtol=0, atol=0)
    with FakeTensorMode() as mode:
        fake = decode_attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v),
                                mode.from_tensor(kv_lens))
    assert fake.shape == eager.shape and fake.stride() == eager.stride()
