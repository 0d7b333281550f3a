"""The parity suite as pytest: one run per session, one test per (model, scenario), the JSON document always written.

    python -m pytest tests/parity/test_parity_suite.py [--parity-model default|M[,M2]] [--parity-seed N] \
        [--parity-scenarios a,b] [--parity-json PATH] [--parity-device cuda|cpu] --junitxml PATH

Without --parity-model a GPU runs llama-3.1-8b and smollm2-135m, the CPU tiny (flashcore.parity.suite).
"""

from __future__ import annotations

import pytest

from flashcore.parity.results import ParityReport


def _device_kind(config) -> str:
    import torch
    device = config.getoption("--parity-device")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _scenarios(config) -> tuple[str, ...]:
    from flashcore.parity.scenarios import scenario_names
    asked = tuple(s for s in config.getoption("--parity-scenarios").split(",") if s)
    return asked or scenario_names()


def pytest_generate_tests(metafunc):
    if "model_name" in metafunc.fixturenames:
        from flashcore.parity.suite import parse_models
        config = metafunc.config
        models = parse_models(config.getoption("--parity-model"), _device_kind(config))
        cases = [(m, s) for m in models for s in _scenarios(config)]
        metafunc.parametrize("model_name,scenario_name", cases, ids=[f"{m}-{s}" for m, s in cases])


@pytest.fixture(scope="session")
def parity_report(request) -> ParityReport:
    from flashcore.parity.scenarios import SuiteConfig
    from flashcore.parity.suite import format_table, run_suite
    config = request.config
    suite_config = SuiteConfig.for_device(_device_kind(config), scenarios=_scenarios(config),
                                          seed=config.getoption("--parity-seed"))
    report = run_suite(config.getoption("--parity-model"), device=config.getoption("--parity-device"),
                       config=suite_config, json_path=config.getoption("--parity-json"))
    print("\n" + format_table(report))
    return report


def test_scenario(parity_report: ParityReport, model_name: str, scenario_name: str):
    run = parity_report.run(model_name)
    result = run.scenario(scenario_name)
    assert result.passed, f"{model_name} {scenario_name}: {result.summary}\ncriterion: {result.criterion}\n{result.detail}"


def test_model_runs_completed(parity_report: ParityReport):
    """Everything outside the scenarios: each model loaded, its chat samples (real models) generated."""
    assert all(not run.error for run in parity_report.runs), [run.error for run in parity_report.runs if run.error]


def test_document_round_trips(parity_report: ParityReport):
    again = ParityReport.from_dict(parity_report.to_dict())
    assert again.to_dict() == parity_report.to_dict()
