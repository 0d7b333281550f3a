"""decode_attention against the fp32 reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from _attn_helpers import assert_close_to_reference, qkv, randn, sdpa_same_dtype
from flashcore.ops import decode_attention
from flashcore.ops.decode import choose_num_splits
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
    # The same shapes again (on CUDA: a launch from the LaunchCache) with new data, new lengths, and caches whose
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


def test_launch_cache_key_separates_specialisations():
    from flashcore.ops._common import _arg_class

    buf = torch.zeros(64)
    assert _arg_class(buf) != _arg_class(buf[1:])      # 16-byte aligned base vs not
    assert _arg_class(buf) == _arg_class(buf[4:])
    assert _arg_class(buf) != _arg_class(buf.half())   # dtype
    assert _arg_class(32) == _arg_class(4096) != _arg_class(33)
    assert _arg_class(1) != _arg_class(3) and _arg_class(2**31) != _arg_class(2**31 - 16)


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
    # B=1, 8 KV heads, 132 SMs: enough splits for ~2 waves, but no split under 256 keys.
    assert choose_num_splits(1, 8, 32768, 132, 64, 256) == 33
    assert choose_num_splits(1, 8, 2048, 132, 64, 256) == 8
    assert choose_num_splits(8, 8, 8192, 132, 64, 256) == 5
    assert choose_num_splits(64, 8, 512, 132, 64, 256) == 1


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


@pytest.mark.gpu
def test_cuda_graph_replay_follows_kv_lens(device):
    # Capture once, change kv_lens (and q) in place between replays: each replay must equal the reference.
    batch, hq, hkv, s_max, d = 2, 32, 8, 4096, 128
    q, k, v = qkv(batch, hq, hkv, 1, s_max, d, dtype=torch.bfloat16, device=device, seed=37)
    kv_lens = torch.tensor([1000, 20], device=device, dtype=torch.int32)
    decode_attention(q, k, v, kv_lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, kv_lens)
    for step, lens in enumerate([[1000, 20], [1001, 21], [4096, 1], [7, 3000]]):
        kv_lens.copy_(torch.tensor(lens, device=device))
        q.copy_(randn(batch, hq, 1, d, dtype=q.dtype, device=device, seed=100 + step))
        graph.replay()
        ref = decode_reference(q, k, v, kv_lens)
        sdpa = sdpa_same_dtype(q, k, v, causal=False, kv_end=kv_lens)
        assert_close_to_reference(out, ref, sdpa)


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
