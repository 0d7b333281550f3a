"""The regression rule (pipeline/regression.py), on synthetic series with planted steps and noise, and on the
project's real H100 series.

What is real: the four flashcore.parity/1 documents of the llama-3.1-8b preset on the project's H100 80GB HBM3
(2026-11-25 12:25, 12:33, 12:58 and 13:18 UTC; two kept in tests/pipeline/fixtures/history/ from git history,
one is tests/parity/fixtures/, one docs/reports/; read as one run each, so their metrics are `llama-3.1-8b.*`,
as a /2 document's run of that model), and the GPU facts and versions of the real report. What is
synthetic: the noise series below, and the nights after the real four (perturbed copies of the 13:18 document).
"""

from __future__ import annotations

import copy
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.gpu_result import GpuResult, gpu_results
from pipeline.regression import (MIN_BASELINE, Baseline, assess, baseline_of, fleet_shifts, is_flagged, spec_for,
                                 version_changes)
from pipeline.results import HostRunResult

ROOT = Path(__file__).resolve().parents[2]
REAL_DOCS = [ROOT / "tests/pipeline/fixtures/history/h100-20261125T122543Z.parity.json",
             ROOT / "tests/parity/fixtures/parity-llama-3.1-8b-h100.json",
             ROOT / "tests/pipeline/fixtures/history/h100-20261125T125804Z.parity.json",
             ROOT / "docs/reports/127.0.0.1_2222-20261125T131741Z.parity.json"]
REAL_REPORT = ROOT / "docs/reports/127.0.0.1_2222-20261125T131741Z.json"
GRAPHED = "llama-3.1-8b.decode.cuda_graph.flashcore_ms"   # what the real /1 documents give (the model first)
RATIO = "llama-3.1-8b.decode.cuda_graph.ratio"
VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "driver": "580.1", "code": "c0de"}


def night(i: int, metrics: dict[str, float], host="lab-a", idx=0, passed=True, scenarios=None, versions=None):
    return GpuResult(host=host, gpu_index=idx, gpu_uuid=f"GPU-{host}-{idx}", gpu_name="NVIDIA H100 80GB HBM3",
                     status="passed" if passed else "failed",
                     started_at=(datetime(2026, 1, 1, 2, 17, tzinfo=timezone.utc) + timedelta(days=i)).isoformat(),
                     metrics=metrics, scenarios=scenarios or {}, versions=dict(versions or VERSIONS))


def series(values, metric=GRAPHED, **kw) -> list[GpuResult]:
    return [night(i, {metric: v}, **kw) for i, v in enumerate(values)]


def labels(runs: list[GpuResult], metric=GRAPHED) -> list[str]:
    """The label of `metric` on each night, judged against the nights before it."""
    out = []
    for i, r in enumerate(runs):
        f = {x.metric: x for x in assess(r, runs[:i]).findings}.get(metric)
        out.append(f.label if f else "-")
    return out


# ------------------------------------------------------------------------------------------------- the pieces


def test_baseline_is_median_of_the_last_seven_with_a_noise_floor():
    assert baseline_of([10.0, 10.0]) is None and MIN_BASELINE == 3
    b = baseline_of([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])          # the 100 fell out of the window
    assert (b.median, b.n) == (4.0, 7)
    assert b.noise == pytest.approx(1.4826 * 2.0)                          # MAD of 1..7 is 2
    flat = baseline_of([10.0, 10.0, 10.0, 10.01])
    assert flat.noise == pytest.approx(0.3)                                # 3% of the baseline


def test_flag_needs_both_three_noise_units_and_five_percent():
    noisy, quiet = Baseline(100.0, 5.0, 7), Baseline(100.0, 1.0, 7)
    assert not is_flagged(114.9, noisy, "lower") and is_flagged(115.1, noisy, "lower")   # 3 x 5 = 15
    assert not is_flagged(104.9, quiet, "lower") and is_flagged(105.1, quiet, "lower")   # 5% binds here
    assert is_flagged(84.9, noisy, "higher") and not is_flagged(115.1, noisy, "higher")  # direction
    assert not is_flagged(50.0, noisy, "lower")                                          # better is never flagged


def test_metric_specs():
    assert spec_for(GRAPHED).gate and spec_for(RATIO).gate and spec_for("smollm2-135m.err_bound.new_scenario").gate
    assert spec_for("smollm2-135m.decode.cuda_graph_compiled.flashcore_ms").gate
    assert spec_for("llama-3.1-8b.decode.cuda_graph_compiled.ratio").gate
    assert not spec_for("tiny.decode.eager.flashcore_ms").gate and not spec_for("x.decode.paged.sdpa_ms").gate
    assert spec_for("suite_duration_s").gate is False and spec_for("llama-3.1-8b.duration_s").gate is False
    assert spec_for("power_w") is None
    assert spec_for("decode.cuda_graph.flashcore_ms") is None       # an unprefixed name of older records: kept,
                                                                    # shown, not judged


def test_version_changes_name_what_moved():
    old = {"torch": "2.11.0", "triton": "3.6.0", "driver": "580.1", "code": "aaa"}
    new = {"torch": "2.12.0", "triton": "3.6.0", "driver": "", "code": "bbb"}
    assert version_changes(old, new) == ["torch 2.11.0 -> 2.12.0"]


# ------------------------------------------------------------------------------------- synthetic: planted steps


@pytest.mark.parametrize("step", [1.15, 1.25, 1.6])
@pytest.mark.parametrize("seed", range(20))
def test_a_planted_step_is_flagged_exactly_where_planted(seed, step):
    rng = random.Random(seed)
    at = 20 + seed % 7
    values = [8.66 * (1 + 0.01 * rng.gauss(0, 1)) * (step if i >= at else 1) for i in range(40)]
    got = labels(series(values))
    first_flag = next(i for i, x in enumerate(got) if x in ("suspicious", "regression"))
    assert first_flag == at and got[at] == "suspicious" and got[at + 1] == "regression"
    assert all(x in ("insufficient data", "ok") for x in got[:at])
    assert all(x == "ok" for x in got[at + 4:])      # four nights later the new level is the baseline


def test_one_bad_night_is_suspicious_never_a_regression():
    rng = random.Random(7)
    values = [8.66 * (1 + 0.01 * rng.gauss(0, 1)) for _ in range(30)]
    values[15] *= 1.3
    got = labels(series(values))
    assert got[15] == "suspicious" and "regression" not in got and got.count("suspicious") == 1


def test_an_improvement_is_never_flagged():
    got = labels(series([8.66] * 10 + [6.0] * 10))
    assert set(got) <= {"insufficient data", "ok"}


def test_insufficient_data_until_three_passing_runs():
    runs = series([8.66, 8.7, 20.0, 8.7, 8.68])
    runs[1].status = "failed"                              # a failed night is not a baseline night
    assert labels(runs) == ["insufficient data"] * 4 + ["ok"]


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.02])
def test_pure_noise_flags_nothing_over_many_seeds(sigma, dist):
    """200 seeds x 60 nights of noise at up to 2% (the graphed decode step moved 0.2% over the real H100 runs):
    not one night flagged. Below the 3% floor the threshold is 9% of the baseline."""
    for seed in range(200):
        rng = random.Random(seed)
        noise = [rng.gauss(1, sigma) if dist == "normal" else rng.lognormvariate(0, sigma) for _ in range(60)]
        runs = series([8.66 * x for x in noise])
        got = labels(runs)
        assert not {"suspicious", "regression"} & set(got), (seed, got)


def test_large_noise_false_alarm_rate_is_measured_not_hidden():
    """At 5% noise (MAD of 7 runs now sets the threshold) pure noise does get flagged on a few nights: the reason
    eager decode (20-40% between real runs) is shown but not gated. Measured: 200 seeds x 60 nights."""
    flagged = regressions = 0
    for seed in range(200):
        rng = random.Random(seed)
        got = labels(series([8.66 * rng.gauss(1, 0.05) for _ in range(60)]))
        flagged += sum(x in ("suspicious", "regression") for x in got)
        regressions += got.count("regression")
    assert 0.005 < flagged / 12000 < 0.04 and regressions / 12000 < 0.003


def test_two_gpus_share_a_baseline_but_consecutive_means_the_same_gpu():
    """GPU 1 of a 2-GPU host goes bad while GPU 0 stays fine: nights interleave gpu0, gpu1 in the history."""
    runs = []
    for i in range(12):
        runs.append(night(2 * i, {GRAPHED: 8.66}, idx=0))
        runs.append(night(2 * i + 1, {GRAPHED: 8.66 * (1.3 if i >= 8 else 1.0)}, idx=1))
    got = labels(runs)
    gpu1 = got[1::2]
    assert gpu1[8] == "suspicious" and gpu1[9] == "regression" and set(got[0::2]) <= {"insufficient data", "ok"}


# --------------------------------------------------------------------------------- scenarios and environment


def test_a_scenario_that_newly_fails_is_a_regression_at_once():
    ok = {"smollm2-135m.batch_4": True, "llama-3.1-8b.batch_4": True}
    runs = [night(i, {}, scenarios=ok) for i in range(2)]
    bad = night(2, {}, passed=False, scenarios={**ok, "smollm2-135m.batch_4": False},
                versions={**VERSIONS, "torch": "2.12.0"})
    [f] = assess(bad, runs).findings
    assert (f.metric, f.label, f.fatal) == ("scenario smollm2-135m.batch_4", "regression", True)
    assert "newly fails" in f.text() and "environment changed: torch 2.11.0 -> 2.12.0" in f.text()
    still = night(3, {}, passed=False, scenarios={**ok, "smollm2-135m.batch_4": False})
    assert assess(still, [*runs, bad]).findings == []      # failing again: the verdict says so, not "newly"
    assert assess(bad, []).findings == []                  # no earlier run: nothing to compare


def test_environment_change_is_said_beside_the_flag():
    runs = series([8.66] * 8 + [10.0, 10.0])
    for r in runs[8:]:
        r.versions["torch"] = "2.12.0"
    a = assess(runs[9], runs[:9])
    [f] = a.flags
    assert f.label == "regression" and a.regressed and a.status == "regression"
    assert f.env == ["torch 2.11.0 -> 2.12.0"]
    assert f.text() == (f"{GRAPHED} 10 vs 8.66 (+15%, 5.2 noise units): regression; "
                        "environment changed: torch 2.11.0 -> 2.12.0")


def _latency(fc: float, sdpa: float, mode="cuda_graph") -> dict[str, float]:
    m = f"llama-3.1-8b.decode.{mode}"
    return {f"{m}.flashcore_ms": fc, f"{m}.sdpa_ms": sdpa, f"{m}.ratio": fc / sdpa}


def test_a_slower_host_is_not_blamed_on_flashcore():
    """flashcore and SDPA both 20% slower in the same run, ratio unchanged: "environment", not a regression."""
    runs = [night(i, _latency(8.66, 10.44)) for i in range(6)] + \
           [night(6 + i, _latency(8.66 * 1.2, 10.44 * 1.2)) for i in range(2)]
    a = assess(runs[7], runs[:7])
    f = {x.metric: x for x in a.findings}
    assert f[GRAPHED].label == "environment" and "SDPA in the same run slowed too (+20%)" in f[GRAPHED].note
    assert f[RATIO].label == "ok" and not a.regressed and a.status == "environment"


def test_flashcore_slower_while_sdpa_holds_is_a_regression():
    runs = [night(i, _latency(8.66, 10.44)) for i in range(6)] + \
           [night(6 + i, _latency(8.66 * 1.2, 10.44)) for i in range(2)]
    f = {x.metric: x for x in assess(runs[7], runs[:7]).findings}
    assert f[GRAPHED].label == "regression" and f[RATIO].label == "regression"


# ------------------------------------------------------------------------------------------------ fleet-wide


def _fleet(slow_hosts: set[str], hosts=("a", "b", "c", "d"), torch_after="2.11.0", code_after="c0de"):
    """Per host 6 normal nights then 2 nights where `slow_hosts` are 20% slower; returns the last night's
    assessments."""
    out = []
    for h in hosts:
        runs = [night(i, {GRAPHED: 8.66}, host=h) for i in range(6)]
        after = {**VERSIONS, "torch": torch_after, "code": code_after}
        runs += [night(6 + i, {GRAPHED: 8.66 * (1.2 if h in slow_hosts else 1.0)}, host=h, versions=after)
                 for i in range(2)]
        out.append(assess(runs[-1], runs[:-1]))
    return out


def test_most_of_the_fleet_shifting_is_an_environment_change():
    fleet = _fleet({"a", "b", "c"}, torch_after="2.12.0")
    [shift] = fleet_shifts(fleet)
    assert (shift.metric, shift.hosts, shift.judged, shift.label) == (GRAPHED, ["a", "b", "c"], 4,
                                                                       "environment change")
    assert shift.env == ["torch 2.11.0 -> 2.12.0"] and "3 of 4 hosts" in shift.text()
    assert not any(a.regressed for a in fleet)
    assert all(a.flags[0].label == "environment" and "fleet-wide" in a.flags[0].note for a in fleet[:3])


def test_a_fleet_wide_shift_after_a_code_change_alone_stays_a_regression():
    fleet = _fleet({"a", "b", "c", "d"}, code_after="new0")
    [shift] = fleet_shifts(fleet)
    assert shift.label == "code change" and shift.code == ["c0de -> new0"] and not shift.env
    assert all(a.regressed for a in fleet)


def test_one_host_of_four_is_that_host():
    fleet = _fleet({"b"}, torch_after="2.12.0")
    assert fleet_shifts(fleet) == []
    assert [a.regressed for a in fleet] == [False, True, False, False]


# ----------------------------------------------------------------------------------------- the real H100 series


def _real_nights() -> list[GpuResult]:
    report = json.loads(REAL_REPORT.read_text())
    out = []
    for path in REAL_DOCS:
        doc = json.loads(path.read_text())
        r = HostRunResult.from_dict(report)
        r.parity, r.started_at, r.host = doc, doc["started_at"], "h100-box"
        out.append(gpu_results(r)[0])
    return out


def test_real_h100_series_is_quiet_where_it_should_be():
    """The four real runs: nothing to judge before three passing runs; on the fourth, the graphed decode step,
    its ratio to SDPA and every error margin are "ok"; eager flashcore decode 65.4 ms vs a 46.3 baseline is
    flagged, but SDPA in that run slowed +35% too and the ratio held: "environment", not flashcore."""
    nights = _real_nights()
    assert [assess(n, nights[:i]).status for i, n in enumerate(nights[:3])] == ["insufficient data"] * 3
    a = assess(nights[3], nights[:3])
    f = {x.metric: x for x in a.findings}
    assert a.status == "ok" and not a.regressed
    assert all(f[m].label == "ok" for m in f if spec_for(m).gate)
    assert f[GRAPHED].value == pytest.approx(8.662, abs=1e-3) and f[GRAPHED].baseline == pytest.approx(8.678, abs=1e-3)
    eager = f["llama-3.1-8b.decode.eager.flashcore_ms"]
    assert eager.label == "environment" and eager.change == pytest.approx(0.411, abs=0.01)
    assert "SDPA in the same run slowed too (+35%)" in eager.note


def _perturbed(base: GpuResult, i: int, graphed_factor: float) -> GpuResult:
    n = copy.deepcopy(base)
    n.started_at = f"2026-11-{26 + i:02d}T02:17:00+00:00"
    n.metrics[GRAPHED] *= graphed_factor
    n.metrics[RATIO] *= graphed_factor
    return n


def test_real_series_then_a_synthetic_slowdown():
    """After the four real runs, synthetic nights: two copies of the last real run, then the graphed step 12%
    slower on two nights: suspicious on the first, regression on the second (ratio and ms both)."""
    nights = _real_nights()
    nights += [_perturbed(nights[3], i, 1.0) for i in range(2)] + [_perturbed(nights[3], 2 + i, 1.12) for i in range(2)]
    got = [assess(n, nights[:i]) for i, n in enumerate(nights)]
    assert [a.status for a in got] == ["insufficient data"] * 3 + ["ok"] * 3 + ["suspicious", "regression"]
    assert {f.metric for f in got[-1].findings if f.fatal} == {GRAPHED, RATIO}
