"""prefill_attention against the fp32 reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _attn_helpers import assert_close_to_reference, qkv, sdpa_same_dtype
from flashcore.ops import prefill as prefill_mod
from flashcore.ops import prefill_attention
from flashcore.reference import attention_reference

DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (batch, Hq, Hkv, Sq, Skv, D): odd lengths 1/7/113/257, MHA, MQA, GQA 4:1 (the 32:8 ratio), 2:1, both head dims,
# and queries after a cache (Skv > Sq).
SHAPES = [
    (1, 4, 4, 1, 1, 64),
    (2, 4, 1, 7, 7, 64),
    (1, 8, 2, 113, 113, 64),
    (1, 4, 2, 257, 257, 64),
    (1, 4, 1, 113, 113, 128),
    (2, 4, 2, 7, 257, 64),
    (1, 4, 4, 113, 257, 128),
    (1, 4, 1, 1, 113, 64),
]


def _check(q, k, v, **mask):
    out = prefill_attention(q, k, v, **mask)
    ref = attention_reference(q, k, v, **mask)
    sdpa = None if q.dtype == torch.float32 else sdpa_same_dtype(q, k, v, **mask)
    assert_close_to_reference(out, ref, sdpa)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Sq{}-Skv{}-D{}".format(*s))
def test_causal_matches_reference(shape, dtype, device):
    batch, hq, hkv, sq, skv, d = shape
    q, k, v = qkv(batch, hq, hkv, sq, skv, d, dtype=dtype, device=device, seed=sq + skv)
    out, _ = _check(q, k, v)
    assert out.dtype == dtype and out.shape == (batch, hq, sq, d)
    # layout contract: a [B, Sq, Hq, D] buffer seen as [B, Hq, Sq, D]
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_not_causal(dtype, device):
    q, k, v = qkv(2, 4, 2, 7, 113, 64, dtype=dtype, device=device, seed=3)
    _check(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padding_static_cache_garbage_does_not_leak(dtype, device):
    # Per-row bounds as tensors; keys before kv_start (padding) and from kv_end on (an unwritten static cache)
    # are poisoned with NaN / huge values: the reference sees zeros there, the kernel must never read them in.
    batch, hq, hkv, sq, skv, d = 3, 4, 2, 7, 113, 64
    q, k, v = qkv(batch, hq, hkv, sq, skv, d, dtype=dtype, device=device, seed=11)
    kv_start = torch.tensor([0, 5, 40], device=device)
    kv_end = torch.tensor([113, 90, 47], device=device)
    q_offset = torch.tensor([106, 83, 40], device=device)  # queries sit at the end of each row's valid keys
    mask = dict(q_offset=q_offset, kv_start=kv_start, kv_end=kv_end)
    ref = attention_reference(q, k, v, **mask)
    sdpa = None if dtype == torch.float32 else sdpa_same_dtype(q, k, v, **mask)
    kp, vp = k.clone(), v.clone()
    for b in range(batch):
        s, e = int(kv_start[b]), int(kv_end[b])
        kp[b, :, :s] = float("nan")
        vp[b, :, :s] = float("nan")
        kp[b, :, e:] = 6e4 if dtype == torch.float16 else 1e30
        vp[b, :, e:] = float("nan")
    out = prefill_attention(q, kp, vp, **mask)
    assert_close_to_reference(out, ref, sdpa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fully_masked_rows_are_exactly_zero(dtype, device):
    # Row 0: the first 20 queries precede kv_start (causal) -> no key. Row 1: kv_end = 0 -> no key at all.
    q, k, v = qkv(2, 4, 2, 113, 113, 64, dtype=dtype, device=device, seed=5)
    mask = dict(q_offset=0, kv_start=torch.tensor([20, 0], device=device), kv_end=torch.tensor([113, 0], device=device))
    out, ref = _check(q, k, v, **mask)
    assert torch.equal(out[0, :, :20], torch.zeros_like(out[0, :, :20]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, :, 20:].abs().amax() > 0


def test_python_int_bounds_equal_tensor_bounds(device):
    q, k, v = qkv(2, 4, 1, 7, 113, 64, dtype=torch.float32, device=device, seed=9)
    ints = prefill_attention(q, k, v, q_offset=50, kv_start=3, kv_end=100)
    row = lambda x: torch.full((2,), x, device=device)  # noqa: E731
    tens = prefill_attention(q, k, v, q_offset=row(50), kv_start=row(3), kv_end=row(100))
    torch.testing.assert_close(ints, tens, rtol=0, atol=0)
    assert_close_to_reference(ints, attention_reference(q, k, v, q_offset=50, kv_start=3, kv_end=100), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype, device):
    # transformers hands over views: q from a [B, S, H, D] projection, k/v sliced out of a larger cache buffer.
    batch, hq, hkv, sq, skv, d = 2, 4, 2, 7, 57, 64
    q_bshd, _, _ = qkv(batch, sq, 1, hq, 1, d, dtype=dtype, device=device, seed=21)
    q = q_bshd.transpose(1, 2)
    _, k_buf, v_buf = qkv(batch, 1, hkv, 1, 96, d, dtype=dtype, device=device, seed=22)
    k, v = k_buf[:, :, 10:10 + skv], v_buf[:, :, 10:10 + skv]
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, v)


def test_sm_scale(device):
    q, k, v = qkv(1, 4, 4, 7, 7, 64, dtype=torch.float32, device=device, seed=31)
    out = prefill_attention(q, k, v, sm_scale=0.3)
    assert_close_to_reference(out, attention_reference(q, k, v, sm_scale=0.3), None)


@pytest.mark.parametrize("bad, message", [
    (dict(k_heads=4), "multiple of KV heads"),
    (dict(d=96), "head_dim 96"),
    (dict(dtype_k=torch.float32), "share a dtype"),
    (dict(q_offset=torch.tensor([1.0])), "integer tensor"),
    (dict(kv_end=torch.tensor([1, 2, 3])), "one entry per batch row"),
    (dict(sm_scale=-0.1), "sm_scale must be positive"),
])
def test_bad_inputs_raise_value_error(bad, message):
    d = bad.get("d", 64)
    q = torch.zeros(1, 6, 3, d, dtype=torch.float16)
    k = torch.zeros(1, bad.get("k_heads", 2), 5, d, dtype=bad.get("dtype_k", torch.float16))
    v = torch.zeros(1, bad.get("k_heads", 2), 5, d, dtype=torch.float16)
    kwargs = {key: bad[key] for key in ("q_offset", "kv_end", "sm_scale") if key in bad}
    with pytest.raises(ValueError, match=message):
        prefill_attention(q, k, v.to(k.dtype) if "dtype_k" not in bad else v, **kwargs)


def test_torch_compile_fullgraph(device):
    q, k, v = qkv(1, 4, 2, 7, 33, 64, dtype=torch.float32, device=device, seed=41)

    @torch.compile(fullgraph=True, backend="inductor")
    def attend(q, k, v, kv_start):
        return prefill_attention(q * 1.0, k, v, kv_start=kv_start) + 1.0

    kv_start = torch.tensor([4], device=device)
    out = attend(q, k, v, kv_start)
    ref = attention_reference(q, k, v, kv_start=kv_start) + 1.0
    assert_close_to_reference(out, ref, None)


@pytest.mark.gpu
@pytest.mark.parametrize("sq, skv", [(1, 1), (113, 113), (1023, 1023), (7, 2048), (2048, 2048)])
def test_llama_shape_bf16(sq, skv, device):
    # LLaMA 3.1 8B heads: Hq 32, Hkv 8, D 128, bf16; a left-padded batch of 2.
    q, k, v = qkv(2, 32, 8, sq, skv, 128, dtype=torch.bfloat16, device=device, seed=sq)
    _check(q, k, v)
    _check(q, k, v, kv_start=torch.tensor([0, skv // 3], device=device))


def test_registered_op_and_fake_tensor(device):
    # The dispatcher path (torch.ops.flashcore.*) equals the eager path; under fake tensors the fake kernel
    # gives the output's shape and [B, Sq, Hq, D]-buffer strides without launching anything.
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(1, 4, 2, 7, 33, 64, dtype=torch.float32, device=device, seed=43)
    eager = prefill_attention(q, k, v)
    via_op = torch.ops.flashcore.prefill_attention(q, k, v, None, None, None, 26, 0, 33, True, 0.125)
    torch.testing.assert_close(via_op, eager, rtol=0, atol=0)
    with FakeTensorMode() as mode:
        fake = prefill_attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v))
    assert fake.shape == eager.shape and fake.stride() == eager.stride()


def _table_configs():
    """Every configuration the launch path can pick here: the interpreter's (in both grid orders) on the CPU,
    each entry of the bf16/fp16 tables on a GPU."""
    if not torch.cuda.is_available():
        return [prefill_mod.CPU_PREFILL, dataclasses.replace(prefill_mod.CPU_PREFILL, heads_fast=True)]
    return [cfg for entries in prefill_mod.GPU_PREFILL.values() for _, cfg in entries]


@pytest.mark.parametrize("cfg", _table_configs(), ids=str)
def test_every_table_config_matches_reference(cfg, device, monkeypatch):
    # Each configuration forced for every length: ragged rows (left padding, kv_end, queries after a cache, a
    # row with no key for its first queries), GQA 4:1, several query tiles and both head dims.
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    monkeypatch.setattr(prefill_mod, "CPU_PREFILL", cfg)
    monkeypatch.setattr(prefill_mod, "GPU_PREFILL", {64: ((2**62, cfg),), 128: ((2**62, cfg),)})
    for d in (64, 128):
        q, k, v = qkv(3, 8, 2, 150, 190, d, dtype=dtype, device=device, seed=d)
        _check(q, k, v)
        _check(q, k, v, q_offset=torch.tensor([40, 0, 25], device=device),
               kv_start=torch.tensor([0, 30, 77], device=device), kv_end=torch.tensor([190, 150, 180], device=device))


def test_config_follows_dtype_head_dim_and_length():
    table = prefill_mod.GPU_PREFILL[128]
    assert table[-1][0] == 2**62 and [most for most, _ in table] == sorted(most for most, _ in table)
    for sq in (1, 2048, 4096, 4097, 8192, 8193, 10**6):
        assert prefill_mod.prefill_config(128, sq, torch.bfloat16, True) is next(c for m, c in table if sq <= m)
        assert prefill_mod.prefill_config(96, sq, torch.float16, True) is next(c for m, c in table if sq <= m)
    assert prefill_mod.prefill_config(128, 8, torch.float32, True) is prefill_mod.GPU_PREFILL_FP32
    assert prefill_mod.prefill_config(64, 8, torch.float16, False) is prefill_mod.CPU_PREFILL
