"""The suite must be able to fail: deliberately wrong attention (built on the real kernels) gets a failing verdict
from the criteria themselves, and the correct kernels pass across several seeds (no false alarms).

Reduced suite on the CPU (the kernels run in the Triton interpreter): single token, a short teacher-forced
generation and the left-padded batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashcore.integrations import make_attention, register
from flashcore.ops import decode_attention, prefill_attention
from flashcore.parity.scenarios import SuiteConfig
from flashcore.parity.suite import run_suite

SCENARIOS = ("single_token", "generate_50", "batch_4")


def _config(seed: int) -> SuiteConfig:
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    return SuiteConfig.for_device(device_kind, scenarios=SCENARIOS, gen_short=12, chunk_short=6, batch_steps=4,
                                  chunk_batch=2, seed=seed, latency=False)


# -- three classic attention bugs, each on top of the real kernels -----------------------------------------

def _scale_of(q, sm_scale):
    return sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _wrong_scale():
    """1/D instead of 1/sqrt(D)."""
    def prefill(q, k, v, *, sm_scale=None, **kw):
        return prefill_attention(q, k, v, sm_scale=_scale_of(q, sm_scale) / math.sqrt(q.shape[-1]), **kw)

    def decode(q, k, v, kv_lens, *, sm_scale=None, **kw):
        return decode_attention(q, k, v, kv_lens, sm_scale=_scale_of(q, sm_scale) / math.sqrt(q.shape[-1]), **kw)
    return make_attention(prefill, decode)


def _causal_off_by_one():
    """Prefill queries also see the next key (j <= i + 1)."""
    def prefill(q, k, v, *, q_offset=None, **kw):
        q_offset = k.shape[2] - q.shape[2] if q_offset is None else q_offset
        return prefill_attention(q, k, v, q_offset=q_offset + 1, **kw)
    return make_attention(prefill, None)


def _wrong_gqa_mapping():
    """Query head h reads KV head h % Hkv (tiled) instead of h // (Hq / Hkv) (interleaved)."""
    def tile(q, k):
        return k.repeat(1, q.shape[1] // k.shape[1], 1, 1)

    def prefill(q, k, v, **kw):
        return prefill_attention(q, tile(q, k), tile(q, v), **kw)

    def decode(q, k, v, kv_lens, **kw):
        return decode_attention(q, tile(q, k), tile(q, v), kv_lens, **kw)
    return make_attention(prefill, decode)


BUGS = {"fcore_bug_scale": _wrong_scale, "fcore_bug_causal": _causal_off_by_one, "fcore_bug_gqa": _wrong_gqa_mapping}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_wrong_attention_fails_the_suite(bug):
    register(bug, BUGS[bug]())
    report = run_suite("tiny", config=_config(seed=0), attn=bug)
    assert not report.passed
    failing = [s for s in report.scenarios if not s.passed]
    # failed by the criteria (measured, evaluated), not by an exception
    assert failing and all(s.criterion != "(not evaluated)" and s.measured for s in failing), \
        [(s.name, s.summary) for s in failing]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_correct_attention_passes_across_seeds(seed):
    report = run_suite("tiny", config=_config(seed=seed))
    assert report.passed, [(s.name, s.summary, s.detail) for s in report.scenarios if not s.passed]
