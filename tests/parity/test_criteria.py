"""The parity criteria and the results document, on hand-made logits and documents (pure, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from flashcore.parity import criteria
from flashcore.parity.decoding import segments
from flashcore.parity.results import (SCHEMA, Environment, Latency, LatencyRow, Memory, ModelInfo, ParityReport,
                                      ScenarioResult, SchemaError)


def _ref(steps=6, vocab=50, seed=0):
    return torch.randn(steps, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _noise(ref, scale, seed):
    return ref + scale * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))


def test_within_twice_sdpa_noise_passes():
    ref = _ref()
    check = criteria.check_steps(_noise(ref, 0.01, 1), _noise(ref, 0.01, 2), ref)
    assert check.passed and check.worst_ratio < 1


def test_error_far_above_sdpa_noise_fails():
    ref = _ref()
    check = criteria.check_steps(_noise(ref, 0.2, 1), _noise(ref, 0.01, 2), ref)
    assert not check.passed and check.bound_violations


def test_nan_fails():
    ref = _ref()
    fc = ref.clone()
    fc[2, 3] = float("nan")
    check = criteria.check_steps(fc, _noise(ref, 0.01, 2), ref)
    assert not check.passed and not check.finite


def test_near_tie_flip_is_excused_but_confident_flip_is_not():
    ref = torch.zeros(2, 4)
    ref[0, :2] = torch.tensor([1.0, 0.9995])   # near-tie at step 0
    ref[1, :2] = torch.tensor([5.0, 1.0])      # confident at step 1
    sdpa = ref + 1e-3
    tie_flip = ref.clone()
    tie_flip[0, :2] = torch.tensor([0.9995, 1.0])
    check = criteria.check_steps(tie_flip, sdpa, ref)
    assert check.confident_steps == 1 and not check.confident_mismatches
    confident_flip = ref.clone()
    confident_flip[1, :2] = torch.tensor([1.0, 5.0])
    assert criteria.check_steps(confident_flip, sdpa, ref).confident_mismatches == [1]


def test_free_running_vllm_style():
    logits_a = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [3.0, 2.9, 0, 0, 0, 0, 0]])
    logits_b = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [2.9, 3.0, 0, 0, 0, 0, 0]])
    same = criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 0]), logits_a)
    assert same.passed and same.diverged_at is None
    plausible = criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 1]), logits_b)
    assert plausible.diverged_at == 1 and plausible.passed
    wild = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0, 9]])
    implausible = criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 6]), wild, k=2)
    assert not implausible.passed


@pytest.mark.parametrize("total,chunk,expected", [(4, 1, [1, 1, 1, 1]), (7, 4, [3, 1, 2, 1]), (1, 5, [1]),
                                                  (0, 3, [])])
def test_teacher_forcing_segments(total, chunk, expected):
    assert segments(total, chunk) == expected
    assert sum(segments(total, chunk)) == total


# -- the document ------------------------------------------------------------------------------------------

def _report() -> ParityReport:
    return ParityReport(
        passed=True,
        model=ModelInfo("tiny", "preset", "float16", 2, 4, 2, 64, 256, 512, 1000),
        environment=Environment("cpu", "cpu", "3.11", "2.13", "3.9", "5.24", "0.1.0", None, True),
        scenarios=[ScenarioResult("single_token", "t", True, "c", {"err": 0.5, "nan": float("nan"), "ok": True})],
        latency=Latency(2048, [LatencyRow("eager", 10.0, 20.0, 2.0, "n")], None),
        memory=Memory(100, 400, 4.0, None), started_at="2026-11-25T12:00:00+00:00", duration_s=1.5)


def test_document_round_trip_is_strict_json():
    text = _report().to_json()
    data = json.loads(text)
    assert data["schema"] == SCHEMA and data["scenarios"][0]["measured"]["nan"] == "nan"
    again = ParityReport.from_json(text)
    assert again.to_dict() == data


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d.update(schema="other/1"), "$.schema"),
    (lambda d: d["model"].pop("params"), "model.params"),
    (lambda d: d["scenarios"][0].update(name="made_up"), "scenarios[0].name"),
    (lambda d: d["latency"]["rows"][0].update(mode="warp"), "latency.rows[0].mode"),
    (lambda d: d["environment"].update(triton_interpret="yes"), "environment.triton_interpret"),
])
def test_document_validation_names_the_field(mutate, where):
    data = _report().to_dict()
    mutate(data)
    with pytest.raises(SchemaError, match=where.replace("[", r"\[").replace("$", r"\$")):
        ParityReport.from_dict(data)


def test_top1_agreement_must_keep_up_with_sdpa():
    ref = _ref(steps=40, vocab=8, seed=5)
    sdpa = ref.clone()                      # agrees everywhere
    worse = ref.clone()
    worse[:10] = -worse[:10]                # loses the argmax on 10 of 40 steps
    check = criteria.check_steps(worse, sdpa, ref)
    assert not check.agreement_ok
    one_flip = ref.clone()
    one_flip[0] = -one_flip[0]
    assert criteria.check_steps(one_flip, sdpa, ref).agreement_ok  # one step of slack
    assert criteria.agreement_slack(0.8, 200) == pytest.approx(2 * (0.8 * 0.2 / 200) ** 0.5)


def test_real_h100_document_validates():
    """The document the 8B suite wrote on an H100 (transformers 5.17) parses and re-serialises unchanged."""
    from pathlib import Path
    path = Path(__file__).parent / "fixtures" / "parity-llama-3.1-8b-h100.json"
    report = ParityReport.read(path)
    assert report.passed and report.model.params > 8_000_000_000 and report.memory.ratio == 4.0
    assert [s.name for s in report.scenarios] == list(__import__("flashcore.parity").parity.SCENARIO_NAMES)
    assert report.to_dict() == json.loads(path.read_text())
