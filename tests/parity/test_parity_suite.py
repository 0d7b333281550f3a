"""The parity suite as pytest: one run per session, one test per scenario, the JSON document always written.

    python -m pytest tests/parity/test_parity_suite.py --parity-model PRESET --parity-json PATH \
        [--parity-device cuda|cpu] --junitxml PATH
"""

from __future__ import annotations

import pytest

from flashcore.parity.results import SCENARIO_NAMES, ParityReport


@pytest.fixture(scope="session")
def parity_report(request) -> ParityReport:
    from flashcore.parity.suite import format_table, run_suite
    report = run_suite(request.config.getoption("--parity-model"),
                       device=request.config.getoption("--parity-device"),
                       json_path=request.config.getoption("--parity-json"))
    print("\n" + format_table(report))
    return report


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario(parity_report: ParityReport, name: str):
    result = parity_report.scenario(name)
    assert result.passed, f"{name}: {result.summary}\ncriterion: {result.criterion}\n{result.detail}"


def test_document_round_trips(parity_report: ParityReport):
    again = ParityReport.from_dict(parity_report.to_dict())
    assert again.to_dict() == parity_report.to_dict()
