"""The document is written whatever happens: a model that cannot load, a kernel that raises."""

from __future__ import annotations

import torch

from flashcore.integrations import make_attention, register
from flashcore.parity.results import SCENARIO_NAMES, ParityReport
from flashcore.parity.scenarios import SuiteConfig
from flashcore.parity.suite import run_suite


def test_unloadable_model_still_writes_a_valid_failing_document(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "parity.json"
    report = run_suite("example-org/not-cached", device="cpu", json_path=path)
    again = ParityReport.read(path)
    assert not again.passed and [s.name for s in again.scenarios] == list(SCENARIO_NAMES)
    assert all(not s.passed and "did not load" in s.summary for s in again.scenarios)
    assert again.model.source == "hub" and report.latency.skipped_reason


def test_a_raising_kernel_fails_its_scenarios_not_the_run(tmp_path):
    def broken(q, k, v, **kw):
        raise RuntimeError("kernel exploded")
    register("fcore_raises", make_attention(broken, broken))
    path = tmp_path / "parity.json"
    config = SuiteConfig.for_device("cuda" if torch.cuda.is_available() else "cpu",
                                    scenarios=("single_token", "gqa_memory"), latency=False)
    run_suite("tiny", config=config, attn="fcore_raises", json_path=path)
    report = ParityReport.read(path)
    assert not report.passed
    assert all(not s.passed and "kernel exploded" in s.summary + s.detail for s in report.scenarios)
